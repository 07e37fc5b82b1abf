"""int8 quantisation with Qwix (kdjax.quantize): PTQ weights / static against independent numpy
arithmetic, the one-line refusals, QAT's fake quantisation and gradients, storage sizes."""

import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import data as kdata
from kdjax import models, optim
from kdjax import quantize as Q

SHAPE = (8, 8, 1)


def _absmax_int8(w):
    """Symmetric per-output-channel int8 in numpy: scale = max|w| over the input axes / 127."""
    w = np.asarray(w, np.float32)
    scale = np.abs(w).max(axis=tuple(range(w.ndim - 1)), keepdims=True) / np.float32(127)
    scale = np.where(scale == 0, np.float32(1), scale)  # an all-zero channel: Qwix uses scale 1
    return np.round(w / scale).astype(np.int8), scale


def _npz_bytes(arrays) -> int:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getbuffer().nbytes


@pytest.fixture(scope="module")
def digits():
    ds = kdata.load("digits")
    test_x = kdata.normalize(ds.test.images, ds.mean, ds.std)
    calibration = [kdata.normalize(ds.train.images[i * 32:(i + 1) * 32], ds.mean, ds.std) for i in range(2)]
    return ds, test_x, calibration


@pytest.fixture(scope="module")
def mlp():
    model = models.get_model("mlp", num_classes=10, hidden=(256, 128))  # 50,826 params
    return model, models.init_model(model, jax.random.key(0), SHAPE)


@pytest.fixture(scope="module")
def mlp_int8(mlp):
    return Q.ptq(*mlp, "weights", input_shape=SHAPE)


@pytest.fixture(scope="module")
def cnn():
    model = models.get_model("cnn_small", num_classes=10)
    return model, models.init_model(model, jax.random.key(1), SHAPE)


@pytest.fixture(scope="module")
def cnn_static(cnn, digits):
    return Q.ptq(*cnn, "static", digits[2])


def test_layers_in_forward_order(mlp, cnn):
    assert Q.layers(mlp[0], SHAPE) == ["fc1", "fc2", "head"]
    assert Q.layers(cnn[0], SHAPE) == ["conv1_0", "conv1_1", "conv2_0", "conv2_1", "head"]
    deep = models.get_model("mlp", num_classes=10, hidden=(4,) * 11)
    assert Q.layers(deep, SHAPE) == [f"fc{i}" for i in range(1, 12)] + ["head"]  # not sorted as strings


def test_ptq_weights_is_numpy_absmax_per_channel(mlp, mlp_int8, digits):
    (model, variables), (qmodel, qvars) = mlp, mlp_int8
    for name in ("fc1", "fc2", "head"):
        kernel = qvars["params"][name]["kernel"].array  # Qwix WithAux(QArray)
        w = np.asarray(variables["params"][name]["kernel"])
        want_q, want_scale = _absmax_int8(w)
        assert kernel.qvalue.dtype == jnp.int8 and kernel.scale.dtype == jnp.float32
        assert kernel.scale.shape == (1, w.shape[1])  # one scale per output channel
        np.testing.assert_allclose(kernel.scale, want_scale, rtol=1e-6)
        np.testing.assert_array_equal(kernel.qvalue, want_q)  # measured: 0 of 50,432 differ
        assert np.abs(np.asarray(kernel.qvalue)).max() == 127
        dequantised = np.asarray(kernel.qvalue, np.float32) * np.asarray(kernel.scale)
        np.testing.assert_allclose(dequantised, want_q * want_scale, rtol=1e-6)
        np.testing.assert_array_equal(qvars["params"][name]["bias"], variables["params"][name]["bias"])
    x = digits[1]
    got = models.apply_model(qmodel, qvars, x, train=False)[0]
    want = models.apply_model(model, variables, x, train=False)[0]
    # measured on the 360 digits test images: max |diff| 0.0135 with max |logit| 1.71 (0.8%);
    # relative L2 error 0.0084
    assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()
    assert np.linalg.norm(got - want) <= 0.02 * np.linalg.norm(want)
    assert (np.argmax(got, 1) == np.argmax(want, 1)).mean() >= 0.97  # measured 0.992 (random init: near ties)


def test_a_1x1_convolution_quantises_as_a_convolution():
    """On CPU kdjax computes a 1x1 convolution as a matmul (kdjax.models.layers); under Qwix it
    stays a convolution, so the layer quantises per output channel with its scale named after the
    convolution, as on any backend (resnet8's shortcut: 1x1, stride 2)."""
    model = models.get_model("resnet8", num_classes=10)
    variables = models.init_model(model, jax.random.key(0), (8, 8, 3))
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype(np.float32)
    _, qvars = Q.ptq(model, variables, "static", [x])  # failed inside Qwix while the layer was a matmul
    shortcut = qvars["params"]["layer2_0"]["shortcut_conv"]
    assert set(shortcut) == {"kernel", "conv_general_dilated0_lhs_scale"}
    kernel = variables["params"]["layer2_0"]["shortcut_conv"]["kernel"]
    np.testing.assert_array_equal(shortcut["kernel"].array.qvalue, _absmax_int8(kernel)[0])


def test_ptq_exclude_keeps_float_and_zeros_stay_exact(mlp):
    model, variables = mlp
    pruned = jax.tree.map(lambda a: a, variables)
    w = np.array(variables["params"]["fc1"]["kernel"])
    w[:, ::2] = 0.0  # pruned output channels (all-zero columns)
    w[::3, 1::2] = 0.0  # scattered zeros
    pruned["params"] = {**variables["params"], "fc1": {**variables["params"]["fc1"], "kernel": jnp.asarray(w)}}
    _, qvars = Q.ptq(model, pruned, "weights", exclude="^head$", input_shape=SHAPE)
    head = qvars["params"]["head"]["kernel"]
    assert isinstance(head, jax.Array) and head.dtype == jnp.float32
    np.testing.assert_array_equal(head, variables["params"]["head"]["kernel"])
    stored = Q.storage(qvars)
    assert "params/head/kernel" in stored and "params/fc1/kernel" not in stored
    q, scale = stored["params/fc1/kernel.qvalue"], stored["params/fc1/kernel.scale"]
    assert (q[w == 0] == 0).all() and ((q * scale)[w == 0] == 0).all()  # pruned weights stay exact zeros
    np.testing.assert_array_equal(q, _absmax_int8(w)[0])
    assert (scale[0, ::2] == 1).all()  # an all-zero channel gets Qwix's scale 1
    assert Q.describe(qvars) == {"weights_dtype": "int8", "quantization": "weights"}


def test_static_calibrates_int8_weights_and_activations(cnn, cnn_static, digits):
    (model, variables), (qmodel, qvars) = cnn, cnn_static
    _, x, calibration = digits
    params = qvars["params"]
    for name in ("conv1_0", "conv1_1", "conv2_0", "conv2_1", "head"):
        kernel = params[name]["kernel"].array
        want_q, want_scale = _absmax_int8(variables["params"][name]["kernel"])
        assert kernel.qvalue.dtype == jnp.int8
        np.testing.assert_array_equal(kernel.qvalue, want_q)
        np.testing.assert_allclose(kernel.scale, want_scale, rtol=1e-6)
    # the first layer's input is the image itself: its scale is mean over samples of max|x|, / 127
    scale = params["conv1_0"]["conv_general_dilated0_lhs_scale"].array
    samples = np.concatenate(calibration).reshape(64, -1)
    np.testing.assert_allclose(np.asarray(scale).ravel(), [np.abs(samples).max(1).mean() / 127], rtol=1e-5)
    assert float(params["head"]["dot_general0_lhs_scale"].array.ravel()[0]) > 0
    for name in ("bn1_0", "bn2_1"):
        np.testing.assert_array_equal(qvars["batch_stats"][name]["var"], variables["batch_stats"][name]["var"])
    assert Q.describe(qvars) == {"weights_dtype": "int8", "quantization": "static"}

    got = models.apply_model(qmodel, qvars, x, train=False)[0]
    want = models.apply_model(model, variables, x, train=False)[0]
    # measured on the 360 digits test images, relative L2 error ||got - want|| / ||want||: 0.053, 0.045,
    # 0.038 for init keys 0, 1, 2 (max |diff| 0.011-0.031, max |logit| 0.08-0.26). A random-init
    # CNN's logits hardly depend on the input, so argmax agreement (0.94-1.0) is not tested.
    assert np.linalg.norm(got - want) <= 0.10 * np.linalg.norm(want)

    hlo = jax.jit(lambda x: models.apply_model(qmodel, qvars, x, train=False)[0]).lower(x[:2]).as_text()
    convs = [line for line in hlo.splitlines() if "stablehlo.convolution" in line]
    dots = [line for line in hlo.splitlines() if "stablehlo.dot_general" in line]
    assert len(convs) == 4 and all("xi8>, tensor<3x3x" in c and "xi32>" in c for c in convs)
    assert len(dots) == 1 and "tensor<2x64xi8>, tensor<64x10xi8>" in dots[0]


def test_static_needs_calibration(cnn):
    with pytest.raises(ValueError, match="needs calibration batches"):
        Q.ptq(*cnn, "static", [], input_shape=SHAPE)


def test_check_messages(cnn, mlp):
    model = cnn[0]
    with pytest.raises(ValueError) as e:
        Q.check(model, SHAPE, "weights")
    assert str(e.value) == ("qwix cannot quantise the weights of convolution conv1_0 alone (it needs int8 "
                            "activations too): use quant.mode=static, or quant.exclude='conv'")
    with pytest.raises(ValueError, match="convolution conv1_0"):  # ptq says the same
        Q.ptq(*cnn, "weights", input_shape=SHAPE)
    Q.check(model, SHAPE, "weights", exclude="conv")
    Q.check(model, SHAPE, "static")
    Q.check(mlp[0], SHAPE, "weights")
    for mode, exclude, message in (
            ("int4", "", "unknown quant.mode 'int4'; choose one of: weights, static"),
            ("weights", "conv(", "quant.exclude='conv(' is not a valid regular expression"),
            ("static", ".", "quant.exclude='.' leaves no layer to quantise (layers: conv1_0, conv1_1, conv2_0, "
                            "conv2_1, head)")):
        with pytest.raises(ValueError) as e:
            Q.check(model, SHAPE, mode, exclude)
        assert str(e.value).startswith(message) and "\n" not in str(e.value)
        if exclude != ".":  # the model-free part says the same
            with pytest.raises(ValueError, match=re.escape(message)):
                Q.check_settings(mode, exclude)
    Q.check_settings("static", "conv|head")
    with pytest.raises(ValueError, match="unknown quant.mode"):
        Q.qat_model(model, "int4")


def test_qat_weights_forward_is_fake_quantised_float(mlp, digits):
    model, variables = mlp
    x = digits[1][:64]
    qat = Q.qat_model(model, "weights")
    # the same variables as the float model
    abstract = jax.eval_shape(lambda: models.init_model(qat, jax.random.key(0), SHAPE))
    assert jax.tree.structure(abstract) == jax.tree.structure(variables)
    fake = {"params": {name: {"kernel": jnp.asarray(np.multiply(*_absmax_int8(layer["kernel"]), dtype=np.float32)),
                              "bias": layer["bias"]} for name, layer in variables["params"].items()}}
    got = models.apply_model(qat, variables, x, train=False)[0]
    want = models.apply_model(model, fake, x, train=False)[0]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)  # measured max |diff| 4.8e-7 (0.012 from the float model)
    assert np.abs(got - models.apply_model(model, variables, x, train=False)[0]).max() > 1e-4  # it does quantise


@pytest.mark.parametrize("which,mode", [("mlp", "weights"), ("cnn", "static")])
def test_qat_gradients_flow(which, mode, mlp, cnn, digits):
    model, variables = {"mlp": mlp, "cnn": cnn}[which]
    ds, x, _ = digits
    x, labels = x[:8], jnp.asarray(ds.test.labels[:8])
    qat = Q.qat_model(model, mode)

    def loss(params):
        logits, _, stats = models.apply_model(qat, {**variables, "params": params}, x, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    grads = jax.jit(jax.grad(loss))(variables["params"])
    for path, g in optim.flat_paths(grads).items():
        assert np.isfinite(g).all(), path
        if path.endswith("kernel"):
            assert np.abs(g).max() > 0, path


def test_storage_int8_and_bf16_sizes(mlp, mlp_int8):
    _, variables = mlp
    _, qvars = mlp_int8
    floats = Q.storage(variables)
    assert list(floats) == list(optim.flat_paths(variables))  # float: the same names, order and arrays
    assert all(np.array_equal(floats[k], v) for k, v in optim.flat_paths(variables).items())
    stored = Q.storage(qvars)
    assert sorted(stored) == sorted(["params/fc1/bias", "params/fc1/kernel.qvalue", "params/fc1/kernel.scale",
                                     "params/fc2/bias", "params/fc2/kernel.qvalue", "params/fc2/kernel.scale",
                                     "params/head/bias", "params/head/kernel.qvalue", "params/head/kernel.scale"])
    assert stored["params/fc1/kernel.qvalue"].dtype == np.int8 and stored["params/fc1/kernel.scale"].dtype == np.float32
    assert Q.num_params(qvars["params"]) == models.num_params(variables["params"]) == 50826
    assert Q.stored_bytes(variables) == 4 * 50826
    assert Q.stored_bytes(qvars) == 50432 + 4 * (394 + 394)  # int8 kernels + float32 biases and scales
    ratio = _npz_bytes(stored) / _npz_bytes(floats)
    assert ratio <= 0.30, ratio  # measured 0.274 (56,072 / 204,914 bytes)

    half = Q.bf16(variables)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(half["params"]))
    stored = Q.storage(half)
    assert all(a.dtype == np.uint16 for a in stored.values())  # npz has no bfloat16: the bit patterns
    np.testing.assert_array_equal(stored["params/fc1/kernel"].view(jnp.bfloat16), half["params"]["fc1"]["kernel"])
    assert Q.stored_bytes(half) == 2 * 50826
    assert Q.describe(half) == {"weights_dtype": "bfloat16", "quantization": None}
    assert Q.describe(variables) == {"weights_dtype": "float32", "quantization": None}


def test_bf16_keeps_batch_stats_float32(cnn):
    _, variables = cnn
    half = Q.bf16(variables)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(half["params"]))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(half["batch_stats"]))


def test_kdjax_does_not_import_qwix():
    import subprocess
    import sys

    code = "import sys, kdjax, kdjax.export, kdjax.quantize; print('qwix' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False"]
