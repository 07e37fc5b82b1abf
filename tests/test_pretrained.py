"""kdjax.models.pretrained: torchvision / timm state dicts (random weights; the hubs cannot be reached
here) load into kdjax's models with the same eval-mode logits, and bad files stop with one line.

torch, torchvision and timm are test-only dependencies (pyproject's `test` extra); kdjax never imports
them. Each torch model is built once per module (`_torch_model`)."""
from __future__ import annotations

import argparse
import functools
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from kdjax import data as kdata  # noqa: E402
from kdjax import models  # noqa: E402
from kdjax.models import pretrained  # noqa: E402
from kdjax.models.vit import resample_pos_embed  # noqa: E402

# (arch, how torch builds it)
BUILD = {
    "torchvision/resnet18": lambda: torchvision.models.resnet18(),
    "torchvision/resnet34": lambda: torchvision.models.resnet34(),
    "torchvision/resnet50": lambda: torchvision.models.resnet50(),
    "torchvision/mobilenet_v2": lambda: torchvision.models.mobilenet_v2(),
    "timm/resnet50": lambda: timm.create_model("resnet50"),
    # dynamic_img_size: timm resamples the position embedding for the input's grid on every call
    # (resample_abs_pos_embed, bicubic, antialias) -- what kdjax's ViT does for a non-native size
    **{f"timm/{n}": functools.partial(timm.create_model, n, dynamic_img_size=True) for n in (
        "vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224",
        "deit_tiny_distilled_patch16_224", "deit_small_distilled_patch16_224")},
}
# Small images keep the CNNs cheap; the ViTs at 224 (native grid) and at other sizes (resampled grid).
RESOLUTION = {"torchvision/resnet18": 64, "torchvision/resnet34": 64, "torchvision/resnet50": 64,
              "torchvision/mobilenet_v2": 64, "timm/resnet50": 64, "timm/vit_tiny_patch16_224": 224,
              "timm/vit_small_patch16_224": 96, "timm/vit_base_patch16_224": 64,
              "timm/deit_tiny_distilled_patch16_224": 80, "timm/deit_small_distilled_patch16_224": 224}


@functools.lru_cache(maxsize=None)
def _torch_model(arch):
    """A torch model with random weights, eval mode; BatchNorm statistics, affine parameters and the
    ViTs' tokens / position embeddings drawn wide enough that a wrong mapping shows in the logits."""
    torch.manual_seed(0)
    m = BUILD[arch]()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.5, 0.5)
        for name, p in m.named_parameters():
            if "pos_embed" in name or "token" in name:
                p.normal_(0.0, 0.5)
            if name.startswith("head"):
                p.normal_(0.0, 0.05)
    return m.eval()


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("weights")


def _save(arch, directory, fmt="safetensors") -> str:
    sd = {k: v.contiguous() for k, v in _torch_model(arch).state_dict().items()}
    path = os.path.join(directory, arch.replace("/", "_") + "." + fmt)
    if not os.path.exists(path):
        if fmt == "safetensors":
            safetensors_torch.save_file(sd, path)
        else:
            torch.save(sd, path)
    return path


def _images(res, batch=2):
    return np.random.RandomState(1).randn(batch, 3, res, res).astype(np.float32)


def _kdjax_logits(module, variables, x_nchw):
    return np.asarray(jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, jnp.asarray(x_nchw.transpose(0, 2, 3, 1))))


@pytest.mark.parametrize("arch", list(BUILD))
def test_logits_match_torch(arch, weights_dir):
    """Eval-mode logits of the loaded model equal torch's: rtol 1e-4 in float32 (and atol 1e-5 of the
    largest logit, for the logits near 0: float32 sums in another order differ by that), batch 2.
    The torchvision ResNet-18 goes through a .pth file (kdjax's weights-only reader), the rest through
    .safetensors; the architecture is inferred from the keys except for timm's resnet50 (torchvision's
    keys), which is named."""
    path = _save(arch, weights_dir, "pth" if arch == "torchvision/resnet18" else "safetensors")
    named = arch if arch == "timm/resnet50" else None
    if named is None:
        assert pretrained.infer_arch(pretrained.read_state_dict(path)) == arch
    module, variables = pretrained.load(path, named)
    assert module == models.get_model(pretrained.arch_of(path, named).model, 1000)
    x = _images(RESOLUTION[arch])
    with torch.no_grad():
        want = _torch_model(arch)(torch.from_numpy(x)).numpy()
    got = _kdjax_logits(module, variables, x)
    assert got.shape == want.shape == (2, 1000)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_models_are_the_registered_imagenet_layouts(weights_dir):
    """load returns the registry's ImageNet models (torch's padding: 7x7/2 pad 3 stem, 3x3/2 pad 1
    max-pool), its variables exactly the model's, and float32."""
    module, variables = pretrained.load(_save("torchvision/resnet18", weights_dir))
    assert module == models.get_model("resnet18_imagenet", 1000)
    shapes = jax.tree.map(lambda a: a.shape, models.param_shapes(module, (64, 64, 3)))
    assert jax.tree.map(lambda a: a.shape, variables) == shapes
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))
    assert set(variables) == {"params", "batch_stats"}
    # the stage maps of a 64x64 input: 16, 8, 4, 2 (the stem and max-pool each halve)
    feats = models.feature_shapes(module, (64, 64, 3))
    assert [feats[f"stage{i}"][1] for i in range(1, 5)] == [16, 8, 4, 2]


def test_pos_embed_resampling_matches_timm():
    """kdjax's grid resampling equals timm's resample_abs_pos_embed (bicubic, antialias) up (14 ->
    24, as for a 384 input) and down (14 -> 5), prefix tokens untouched."""
    from timm.layers import resample_abs_pos_embed
    pos = np.random.RandomState(2).randn(1, 2 + 14 * 14, 8).astype(np.float32)
    for new in (24, 5):
        want = resample_abs_pos_embed(torch.from_numpy(pos), new_size=(new, new), num_prefix_tokens=2).numpy()
        got = np.asarray(resample_pos_embed(jnp.asarray(pos), (14, 14), (new, new), 2))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_deit_heads_are_sown(weights_dir):
    """A distilled DeiT's logits are the mean of its two heads' (timm's eval output); the two
    heads' own logits are the features logits_cls and logits_dist; the tokens after each block
    are block1..block12."""
    arch = "timm/deit_tiny_distilled_patch16_224"
    module, variables = pretrained.load(_save(arch, weights_dir))
    x = jnp.asarray(_images(32).transpose(0, 2, 3, 1))
    logits, feats, _ = models.apply_model(module, variables, x, train=False)
    np.testing.assert_allclose(logits, (feats["logits_cls"] + feats["logits_dist"]) / 2, rtol=1e-6)
    assert [k for k in feats if k.startswith("block")] == [f"block{i}" for i in range(1, 13)]
    assert feats["block12"].shape == (2, 2 + 4, 192)
    with torch.no_grad():  # the class token's head alone, as torch computes it
        t = _torch_model(arch)
        tokens = t.forward_features(torch.from_numpy(_images(32)))
        want_cls = t.head(tokens[:, 0]).numpy()
    np.testing.assert_allclose(feats["logits_cls"], want_cls, rtol=1e-4, atol=1e-5)


def test_wrapped_and_prefixed_checkpoints_are_unwrapped(weights_dir):
    """{'model': state_dict} (DeiT's checkpoints) and DataParallel's 'module.' prefix load as the
    bare state dict does."""
    sd = _torch_model("torchvision/mobilenet_v2").state_dict()
    path = os.path.join(weights_dir, "wrapped.pth")
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, path)
    _, variables = pretrained.load(path)
    _, plain = pretrained.load(_save("torchvision/mobilenet_v2", weights_dir))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), variables, plain))


def _one_line_error(match, *args):
    with pytest.raises(ValueError, match=match) as e:
        pretrained.load(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_files_stop_with_one_line(weights_dir, tmp_path):
    good = _save("torchvision/resnet18", weights_dir)
    data = open(good, "rb").read()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    _one_line_error("truncated or corrupt", str(truncated))
    pth = _save("torchvision/resnet18", weights_dir, "pth")
    tpth = tmp_path / "truncated.pth"
    tpth.write_bytes(open(pth, "rb").read()[:100_000])
    _one_line_error("truncated or corrupt", str(tpth))
    import zipfile  # an intact zip whose pickle stream is cut short: corrupt, not "needs pickle"
    cut = tmp_path / "cut_pickle.pth"
    with zipfile.ZipFile(pth) as src, zipfile.ZipFile(cut, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, data[: len(data) // 2] if info.filename.endswith("data.pkl") else data)
    _one_line_error("truncated or corrupt torch file", str(cut))

    # a .pth that needs pickle: an argparse.Namespace beside the weights (and a whole pickled module)
    sd = _torch_model("torchvision/resnet18").state_dict()
    pickled = tmp_path / "with_args.pth"
    torch.save({"state_dict": sd, "args": argparse.Namespace(lr=0.1)}, pickled)
    msg = _one_line_error("needs pickle", str(pickled))
    assert "argparse.Namespace" in msg
    whole = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), whole)
    _one_line_error("needs pickle", str(whole))

    # a state dict of another architecture
    _one_line_error("the keys are those of a torchvision/resnet18 state dict, not a torchvision/mobilenet_v2",
                    good, "torchvision/mobilenet_v2")
    r50 = _save("torchvision/resnet50", weights_dir)
    _one_line_error("the keys are those of a torchvision/resnet50 state dict, not a torchvision/resnet18", r50, "resnet18")
    partial = tmp_path / "partial.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in sd.items() if not k.startswith("layer4.1.")}, str(partial))
    _one_line_error(r"no weights for 10 of torchvision/resnet18's variables \(batch_stats/layer4_1/bn1/mean", str(partial),
                    "torchvision/resnet18")
    squeeze = tmp_path / "squeezenet.safetensors"
    safetensors_torch.save_file(torchvision.models.squeezenet1_1().state_dict(), str(squeeze))
    _one_line_error("cannot tell the architecture from its keys", str(squeeze))
    _one_line_error("no 'fc.weight' key, so not a torchvision/resnet18 state dict", str(squeeze), "resnet18")
    _one_line_error("unknown arch 'resnet101'", good, "resnet101")

    # a shape that does not match, a key no pattern maps
    bad = dict(sd, **{"conv1.weight": torch.zeros(64, 3, 3, 3)})
    safetensors_torch.save_file({k: v.contiguous() for k, v in bad.items()}, str(tmp_path / "shape.safetensors"))
    _one_line_error(r"key 'conv1.weight' has shape \(64, 3, 3, 3\).*needs \(7, 7, 3, 64\)", str(tmp_path / "shape.safetensors"))
    extra = dict(sd, **{"layer1.0.se.weight": torch.zeros(4)})
    safetensors_torch.save_file({k: v.contiguous() for k, v in extra.items()}, str(tmp_path / "extra.safetensors"))
    _one_line_error("key 'layer1.0.se.weight' has no place in a torchvision/resnet18", str(tmp_path / "extra.safetensors"))


def test_a_key_used_twice_stops(weights_dir, tmp_path, monkeypatch):
    """Two torch keys for one Flax variable, or one key that two patterns match, is an error, never
    a silent overwrite."""
    table = pretrained.TABLES["resnet"]
    monkeypatch.setitem(pretrained.TABLES, "resnet",
                        lambda: table() + [(r"^fc_copy\.weight$", "params/fc/kernel", pretrained._linear)])
    sd = dict(_torch_model("torchvision/resnet18").state_dict())
    sd["fc_copy.weight"] = sd["fc.weight"].clone()
    path = tmp_path / "dup.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    _one_line_error(r"keys 'fc.weight' and 'fc_copy.weight' both map to params/fc/kernel", str(path))
    monkeypatch.setitem(pretrained.TABLES, "resnet",
                        lambda: table() + [(r"^fc\.weight$", "params/fc/kernel", pretrained._linear)])
    _one_line_error(r"key 'fc.weight' matches 2 patterns", _save("torchvision/resnet18", weights_dir))


def test_preprocessing_spec():
    """Each architecture carries its weights' eval transform; applied to a flat grey image it gives
    the crop size and (v / 255 - mean) / std."""
    spec = pretrained.ARCHS["torchvision/resnet50"].preprocess
    assert (spec.resize, spec.input_size, spec.interpolation) == (232, 224, "bilinear")
    assert pretrained.ARCHS["timm/vit_base_patch16_224"].preprocess.mean == (0.5, 0.5, 0.5)
    assert pretrained.ARCHS["timm/deit_small_distilled_patch16_224"].preprocess.resize == 248
    x = spec(np.full((300, 400, 3), 128, np.uint8))
    assert x.shape == (1, 224, 224, 3)
    want = (128 / 255 - np.array(spec.mean)) / np.array(spec.std)
    np.testing.assert_allclose(np.asarray(x)[0, 100, 100], want, rtol=1e-5)
    assert "centre crop 224" in spec.describe()


# ---------------------------------------------------------------- config.<role>.weights, end to end

def _cifar_like(n_train=32, n_test=16, classes=10):
    from kdjax import data as kdata
    rng = np.random.RandomState(3)
    split = lambda n: kdata.Split(rng.randint(0, 256, (n, 32, 32, 3)).astype(np.uint8),  # noqa: E731
                                  (np.arange(n) % classes).astype(np.int32))
    return kdata.Dataset("cifar10", split(n_train), None, split(n_test), classes, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))


def test_weights_start_the_teacher_and_the_student(weights_dir, tmp_path, monkeypatch):
    """teacher.weights with teacher.epochs=0: the imported 10-class torchvision ResNet-18 is the
    teacher as it is (its test accuracy is torch's on the same normalised images; no teacher stage);
    student.weights: the student starts from the 1000-class ResNet-18 weights with a new 10-class head,
    here with its body frozen (optimizer.freeze), so after training it still holds them exactly."""
    from kdjax import optim, train
    from tests.test_train import final_params, tiny_digits_config

    torch.manual_seed(5)
    teacher = torchvision.models.resnet18(num_classes=10).eval()
    teacher_path = str(tmp_path / "teacher10.safetensors")
    safetensors_torch.save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, teacher_path)
    student_path = _save("torchvision/resnet18", weights_dir)
    ds = _cifar_like()
    monkeypatch.setattr(train.kdata, "load", lambda *a, **k: ds)  # train.load_dataset still normalises
    config = tiny_digits_config(**{
        "dataset.name": "cifar10", "stages": "teacher,student", "batch_size": 16,
        "teacher.model": "resnet18_imagenet", "teacher.weights": teacher_path, "teacher.epochs": 0,
        "student.model": "resnet18_imagenet", "student.weights": student_path, "optimizer.freeze": "^(?!fc/)"})
    workdir = str(tmp_path / "run")
    summary = train.run(config, workdir)

    t = summary["teacher"]
    assert t["weights_arch"] == "torchvision/resnet18" and "centre crop 224" in t["weights_preprocess"]
    assert not os.path.exists(os.path.join(workdir, "teacher"))  # no teacher stage ran
    # every model's input is normalised as the weights expect (ImageNet's statistics), not the data set's
    assert t["input_normalization"] == summary["student"]["input_normalization"] == "imagenet"
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["dataset"]["normalize"] == "imagenet"
    x = (ds.test.images / 255.0 - np.array(kdata.NORMALIZATIONS["imagenet"][0])) / np.array(kdata.NORMALIZATIONS["imagenet"][1])
    with torch.no_grad():
        torch_pred = teacher(torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32))).argmax(-1).numpy()
    assert t["test_accuracy"] == pytest.approx(np.mean(torch_pred == ds.test.labels))

    _, params = final_params(workdir, "student")
    _, imported = pretrained.load(student_path)
    flat_new = optim.flat_paths({"params": params["student"]})
    flat_src = optim.flat_paths({"params": imported["params"]})
    assert flat_new["params/fc/kernel"].shape == (512, 10)
    for path, value in flat_new.items():
        if not path.startswith("params/fc/"):
            np.testing.assert_array_equal(value, flat_src[path], err_msg=path)
    assert summary["student"]["epochs"] == 1
    assert summary["student"]["weights_arch"] == "torchvision/resnet18"
    from kdjax import evaluate  # the report says how inputs were normalised and what the student started from

    rep = evaluate.report(workdir, latency_calls=evaluate.MIN_LATENCY_CALLS, plots=False)
    md = open(os.path.join(workdir, "report.md")).read()
    assert rep["input_normalization"] == "imagenet" and "Inputs normalised with 'imagenet' statistics" in md
    assert "- student: started from torchvision/resnet18 weights, made for: resize shorter side to 256" in md


def test_weights_config_errors_are_one_line(weights_dir, tmp_path):
    from kdjax import config as kconfig
    from tests.test_train import tiny_digits_config

    path = _save("torchvision/resnet18", weights_dir)
    cases = [
        ({"teacher.weights": path}, r"holds torchvision/resnet18 weights, which load into kdjax's 'resnet18_imagenet'; "
                                    r"set config.teacher.model=resnet18_imagenet"),
        ({"teacher.model": "resnet18_imagenet", "teacher.weights": path, "teacher.checkpoint": str(tmp_path)},
         "config.teacher.weights and config.teacher.checkpoint both give the teacher"),
        ({"teacher.epochs": 0}, r"config.teacher.epochs must be > 0, got 0 \(0 only with config.teacher.weights"),
        ({"student.model": "resnet18_imagenet", "student.weights": str(tmp_path / "nope.pth")}, "no weights file"),
    ]
    for overrides, match in cases:
        with pytest.raises(ValueError, match=match) as e:
            kconfig.validate(tiny_digits_config(**overrides))
        assert "\n" not in str(e.value)


def test_normalization_follows_the_weights(weights_dir, tmp_path):
    """config.dataset.normalize '' resolves to what the roles' weights expect (torchvision's ImageNet
    statistics, timm's augreg ViT's Inception scaling), to 'data' without weights, and to the name
    given; weights that want different statistics, an unknown name, or 3-channel statistics on
    1-channel images are refused in one line."""
    from kdjax import config as kconfig
    from kdjax import train
    from tests.test_train import tiny_digits_config

    resnet = {"student.model": "resnet18_imagenet", "student.weights": _save("torchvision/resnet18", weights_dir)}
    vit = {"teacher.model": "vit_tiny_patch16", "teacher.weights": _save("timm/vit_tiny_patch16_224", weights_dir)}
    assert kconfig.resolve_normalization(tiny_digits_config()) == "data"
    assert kconfig.resolve_normalization(tiny_digits_config(**resnet)) == "imagenet"
    assert kconfig.resolve_normalization(tiny_digits_config(**vit)) == "inception"
    assert kconfig.resolve_normalization(tiny_digits_config(**vit, **{"dataset.normalize": "imagenet"})) == "imagenet"
    earlier = tmp_path / "earlier"  # a teacher trained by an earlier run keeps its run's normalisation
    earlier.mkdir()
    (earlier / "config.json").write_text(json.dumps({"dataset": {"normalize": "imagenet"}}))
    assert kconfig.resolve_normalization(tiny_digits_config(**{"teacher.checkpoint": str(earlier)})) == "imagenet"
    with pytest.raises(ValueError, match=f"teacher run {earlier}: its config.json 'imagenet'"):
        kconfig.resolve_normalization(tiny_digits_config(**vit, **{"teacher.checkpoint": str(earlier)}))
    for overrides, match in [
        ({**vit, **resnet}, r"the teachers and weights expect different input statistics \(teacher.weights: "
                            r"timm/vit_tiny_patch16_224 'inception', student.weights: torchvision/resnet18 "
                            r"'imagenet'\).*set config.dataset.normalize"),
        ({"dataset.normalize": "imagenet21k"}, "unknown config.dataset.normalize 'imagenet21k'; choose one of: data, "
                                               "imagenet, inception"),
    ]:
        with pytest.raises(ValueError, match=match) as e:
            kconfig.validate(tiny_digits_config(**overrides))
        assert "\n" not in str(e.value)
    with pytest.raises(kdata.DataError, match="'imagenet' has 3-channel statistics and digits's images have 1"):
        train.load_dataset({"name": "digits", "normalize": "imagenet"}, 0)
    ds = train.load_dataset({"name": "digits", "normalize": ""}, 0)
    assert ds.mean == train.load_dataset({"name": "digits", "normalize": "data"}, 0).mean != (0.5,)


def test_imported_teacher_of_other_classes_is_refused(weights_dir, tmp_path, monkeypatch):
    """A teacher used as it is must classify the data set's classes (1000 ImageNet classes here, 10
    in the data): one line, before the workdir is touched."""
    from kdjax import train
    from tests.test_train import tiny_digits_config

    monkeypatch.setattr(train, "load_dataset", lambda ds_cfg, seed: _cifar_like())
    config = tiny_digits_config(**{"dataset.name": "cifar10", "teacher.model": "resnet18_imagenet",
                                   "teacher.weights": _save("torchvision/resnet18", weights_dir), "teacher.epochs": 0})
    with pytest.raises(ValueError, match="classifies 1000 classes and cifar10 has 10: a teacher used as it is") as e:
        train.run(config, str(tmp_path / "run"))
    assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "run")


def test_half_precision_files_load_as_float32(weights_dir, tmp_path):
    """bfloat16 (.pth, .safetensors) and float16 weights are read and converted to float32."""
    sd = _torch_model("torchvision/mobilenet_v2").state_dict()
    half = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    safetensors_torch.save_file(half, str(tmp_path / "bf16.safetensors"))
    torch.save({k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}, tmp_path / "fp16.pth")
    _, full = pretrained.load(_save("torchvision/mobilenet_v2", weights_dir))
    for path, dtype in ((tmp_path / "bf16.safetensors", jnp.bfloat16), (tmp_path / "fp16.pth", jnp.float16)):
        _, variables = pretrained.load(str(path))
        assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b.astype(dtype).astype(jnp.float32)), variables, full)
