"""Export for deployment: the artifact loads and runs where neither kdjax nor flax can be imported,
and gives kdjax's own eval-mode logits."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import data as kdata
from kdjax import models, runs, train
from tests.test_train import REPO, tiny_digits_config

# Runs in a fresh interpreter: kdjax and flax are made unimportable before anything else.
LOADER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('kdjax', 'flax'):
            raise ImportError(f'{name} is not available here')
sys.meta_path.insert(0, Block())
try:
    import kdjax
    raise SystemExit('kdjax should not be importable')
except ImportError:
    pass
import jax, numpy as np
with open(sys.argv[1], 'rb') as f:
    model = jax.export.deserialize(bytearray(f.read()))
images = np.load(sys.argv[2])
np.save(sys.argv[3], np.asarray(model.call(images)))
print('flax' in sys.modules, 'kdjax' in sys.modules)
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    train.run(tiny_digits_config(), workdir)  # cnn_tiny teacher (BatchNorm), mlp student
    return workdir


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_export_round_trip_without_kdjax(run_dir, tmp_path, role):
    out = subprocess.run([sys.executable, "-m", "experiments.export", f"--workdir={run_dir}", f"--model={role}",
                          f"--out={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    meta = json.load(open(tmp_path / f"{role}.json"))
    assert meta["input"] == {"shape": ["batch", 8, 8, 1], "dtype": "uint8", "layout": "NHWC",
                             "pixels": "as kdjax's loaders hold them (0-255)"}
    assert meta["stage"] == role and meta["class_names"] == [str(i) for i in range(10)]
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert meta["test_accuracy"] == summary[role]["test_accuracy"]
    weights = np.load(tmp_path / f"{role}.npz")
    assert sum(weights[k].size for k in weights.files if k.startswith("params/")) == summary[role]["num_params"]

    with open(tmp_path / f"{role}.jaxexport", "rb") as f:  # no directory of the exporting machine
        assert os.path.dirname(REPO).encode() not in f.read()

    dataset = kdata.load("digits")
    images = dataset.test.images[:37]  # an odd batch: the batch dimension is symbolic
    np.save(tmp_path / "images.npy", images)
    loaded = subprocess.run([sys.executable, "-c", LOADER, str(tmp_path / f"{role}.jaxexport"),
                             str(tmp_path / "images.npy"), str(tmp_path / "logits.npy")],
                            cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.split() == ["False", "False"]  # neither flax nor kdjax was imported
    model, variables, _ = runs.load_trained_model(run_dir, role, dataset, jnp.float32)
    want = models.apply_model(model, variables, kdata.normalize(images, dataset.mean, dataset.std), train=False)[0]
    got = np.load(tmp_path / "logits.npy")
    assert got.dtype == np.float32 and got.shape == (37, 10)
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-5, rtol=0)


def test_export_of_a_missing_run_or_stage_is_one_line(run_dir, tmp_path):
    for args, message in (([f"--workdir={tmp_path / 'nope'}"], "not a kdjax run directory"),
                          ([f"--workdir={run_dir}", "--model=student_scratch"], "no student_scratch checkpoint")):
        out = subprocess.run([sys.executable, "-m", "experiments.export", *args], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 2, out.stderr[-2000:]
        errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in out.stderr
    assert not os.path.exists(os.path.join(run_dir, "export"))
    assert not os.path.exists(os.path.join(run_dir, "student_scratch"))  # nothing created in the run


# ------------------------------------------------------------- quantised (kdjax.quantize) exports

@pytest.fixture(scope="module")
def small_models():
    from kdjax import quantize

    dataset = kdata.load("digits")
    shape = dataset.image_shape
    mlp = models.get_model("mlp", num_classes=10, hidden=(256, 128))  # 50,826 params
    mlp_vars = models.init_model(mlp, jax.random.key(0), shape)
    cnn = models.get_model("cnn_small", num_classes=10)
    cnn_vars = models.init_model(cnn, jax.random.key(0), shape)
    calibration = [kdata.normalize(dataset.train.images[i * 32:(i + 1) * 32], dataset.mean, dataset.std)
                   for i in range(2)]
    return dataset, {
        "mlp_float": (mlp, mlp_vars),
        "mlp_int8": quantize.ptq(mlp, mlp_vars, "weights", input_shape=shape),
        "mlp_bf16": (mlp, quantize.bf16(mlp_vars)),
        "cnn_static": quantize.ptq(cnn, cnn_vars, "static", calibration),
        "cnn_float": (cnn, cnn_vars),
    }


def _export(dataset, model, variables, out_dir, name, metadata=None):
    from kdjax import export

    return export.export_model(model, variables, image_shape=dataset.image_shape, mean=dataset.mean,
                               std=dataset.std, out_dir=str(out_dir), name=name, metadata=metadata)


@pytest.mark.parametrize("name,dtype,mode", [("mlp_int8", "int8", "weights"), ("cnn_static", "int8", "static"),
                                             ("mlp_bf16", "bfloat16", None)])
def test_quantised_export_round_trip_without_kdjax(small_models, tmp_path, name, dtype, mode):
    from kdjax import quantize

    dataset, zoo = small_models
    model, variables = zoo[name]
    paths = _export(dataset, model, variables, tmp_path, name)
    meta = json.load(open(paths["json"]))
    assert meta["weights_dtype"] == dtype and meta["quantization"] == mode
    float_vars = zoo[name.split("_")[0] + "_float"][1] if name.startswith("mlp") else None
    if float_vars is not None:
        assert meta["num_params"] == models.num_params(float_vars["params"]) == 50826  # logical weights, no scales
    stored = np.load(paths["npz"])
    want_arrays = quantize.storage(variables)
    assert stored.files == list(want_arrays)
    assert all(stored[k].dtype == v.dtype and np.array_equal(stored[k], v) for k, v in want_arrays.items())

    images = dataset.test.images[:101]  # an odd batch: the batch dimension is symbolic
    np.save(tmp_path / "images.npy", images)
    loaded = subprocess.run([sys.executable, "-c", LOADER, paths["jaxexport"], str(tmp_path / "images.npy"),
                             str(tmp_path / "logits.npy")], cwd=str(tmp_path), capture_output=True, text=True,
                            timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.split() == ["False", "False"]  # neither flax nor kdjax was imported
    got = np.load(tmp_path / "logits.npy")
    want = np.asarray(models.apply_model(model, variables, kdata.normalize(images, dataset.mean, dataset.std),
                                         train=False)[0])
    assert got.dtype == np.float32 and got.shape == (101, 10)
    np.testing.assert_array_equal(got.argmax(1), want.argmax(1))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_int8_artifact_embeds_int8_weights(small_models, tmp_path):
    dataset, zoo = small_models
    sizes = {}
    for name in ("mlp_float", "mlp_int8", "mlp_bf16"):
        paths = _export(dataset, *zoo[name], tmp_path, name, metadata={"stage": "student"})
        sizes[name] = {ext: os.path.getsize(p) for ext, p in paths.items() if ext != "json"}
    # measured: jaxexport 206,484 (float32) / 58,132 (int8: 0.28) / 106,064 (bf16: 0.51) bytes;
    # npz 204,914 / 56,072 (0.27) / 103,262 (0.50)
    for ext in ("jaxexport", "npz"):
        assert sizes["mlp_int8"][ext] <= 0.30 * sizes["mlp_float"][ext], sizes
        assert sizes["mlp_bf16"][ext] <= 0.55 * sizes["mlp_float"][ext], sizes
    meta = json.load(open(tmp_path / "mlp_float.json"))
    assert meta["weights_dtype"] == "float32" and meta["quantization"] is None and meta["stage"] == "student"
    meta = json.load(open(_export(dataset, *zoo["mlp_int8"], tmp_path, "x", metadata={"quantization": "qat"})["json"]))
    assert meta["quantization"] == "qat"  # metadata overrides what is detected


def test_export_is_traced_portable(small_models, tmp_path):
    """The artifact is lowered for CPU, CUDA and TPU, so it is traced inside `layers.portable()`:
    none of the conditionals `layers.materialize` puts in front of XLA:CPU's convolutions."""
    dataset, zoo = small_models
    model, variables = zoo["cnn_float"]
    paths = _export(dataset, model, variables, tmp_path, "cnn")
    with open(paths["jaxexport"], "rb") as f:
        text = jax.export.deserialize(bytearray(f.read())).mlir_module()
    assert "stablehlo.convolution" in text and "is_finite" not in text  # materialize's predicate
    x = jnp.zeros((2, *dataset.image_shape))
    plain = jax.jit(lambda x: models.apply_model(model, variables, x, train=False)[0]).lower(x).as_text()
    assert ("is_finite" in plain) == (jax.default_backend() == "cpu")
