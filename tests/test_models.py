"""Tests for kdjax.models. Big models are only traced (jax.eval_shape); real compute uses
tiny inputs (8x8, batch 2) to keep XLA:CPU compile times low."""
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from kdjax.models import (MODELS, DepthwiseConv, apply_model, batch_norm, feature_names,
                          feature_shapes, get_model, num_params)

STAGES3 = ["stage1", "stage2", "stage3", "embedding", "logits"]
STAGES4 = ["stage1", "stage2", "stage3", "stage4", "embedding", "logits"]


def _init(model, shape, seed=0):
    """Variables with the shapes of ``model.init`` but filled from numpy (He-normal kernels,
    BN scale/var 1, biases/means 0): running model.init on XLA:CPU compiles a threefry kernel
    per parameter, which costs several seconds per model."""
    kw = {"train": False} if hasattr(model, "num_classes") else {}
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), **kw))
    rng = np.random.default_rng(seed)

    def fill(path, a):
        name = path[-1].key
        if name in ("scale", "var"):
            return jnp.ones(a.shape, a.dtype)
        if name in ("bias", "mean"):
            return jnp.zeros(a.shape, a.dtype)
        return jnp.asarray(rng.normal(size=a.shape) * np.sqrt(2.0 / np.prod(a.shape[:-1])), a.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def _apply(model, **kw):
    """jit-compiled apply_model (eager op-by-op dispatch is slower to compile on CPU)."""
    return jax.jit(lambda v, x: apply_model(model, v, x, **kw))


def _x(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


# ---------------------------------------------------------------- registry

def test_registry_names_and_error():
    expected = {"mlp", "cnn_small", "cnn_tiny", "resnet8", "resnet14", "resnet20", "resnet32", "resnet44",
                "resnet56", "resnet110", "resnet8x4", "resnet32x4", "resnet18", "resnet34", "mobilenetv2",
                "mobilenetv2_half", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8", "vgg11", "vgg13",
                "vgg16", "vgg19", "resnet50", "shufflev1", "shufflev2",
                # ImageNet layouts and ViTs (tests/test_pretrained.py checks them against torchvision / timm)
                "resnet18_imagenet", "resnet34_imagenet", "resnet50_imagenet", "mobilenetv2_imagenet",
                "vit_tiny_patch16", "vit_small_patch16", "vit_base_patch16", "deit_tiny_distilled_patch16",
                "deit_small_distilled_patch16", "vit_tiny_patch4_32", "deit_tiny_distilled_patch4_32"}
    assert set(MODELS) == expected
    for name in MODELS:
        m = get_model(name, 7)
        assert m.num_classes == 7 and m.dtype == jnp.float32 and m.bn_axis_name is None
    with pytest.raises(ValueError) as e:
        get_model("foo", 10)
    msg = str(e.value)
    assert msg == "unknown model 'foo'; choose one of: " + ", ".join(sorted(MODELS))
    assert "\n" not in msg


# ------------------------------------------- param counts + features (traced only)

# Exact counts, checked against the PyTorch reference models (RepDistiller models/*.py and
# shared/bench/torch_kd_step.py) built with torch: 100 classes for RepDistiller, 10 for kuangliu.
CASES = {
    # name: (num_classes, params, feature names, stage spatial sizes at 32x32, stage channels, embedding dim)
    "resnet8x4": (100, 1_233_540, STAGES3, (32, 16, 8), (64, 128, 256), 256),
    "resnet32x4": (100, 7_433_860, STAGES3, (32, 16, 8), (64, 128, 256), 256),
    "resnet18": (10, 11_173_962, STAGES4, (32, 16, 8, 4), (64, 128, 256, 512), 512),
    "mobilenetv2": (10, 2_296_922, STAGES4, (32, 16, 8, 4), (24, 32, 96, 320), 1280),
    "mobilenetv2_half": (100, 812_836, STAGES4, (16, 8, 4, 2), (12, 16, 48, 160), 1280),
    "wrn_40_2": (100, 2_255_156, STAGES3, (32, 16, 8), (32, 64, 128), 128),
    "wrn_16_2": (100, 703_284, STAGES3, (32, 16, 8), (32, 64, 128), 128),
    "vgg13": (100, 9_462_180, ["stage1", "stage2", "stage3", "stage4", "stage5", "embedding", "logits"],
              (32, 16, 8, 4, 4), (64, 128, 256, 512, 512), 512),
    "resnet50": (100, 23_705_252, STAGES4, (32, 16, 8, 4), (256, 512, 1024, 2048), 2048),
    "shufflev1": (100, 949_258, STAGES3, (16, 8, 4), (240, 480, 960), 960),
    "shufflev2": (100, 1_355_528, STAGES3, (16, 8, 4), (116, 232, 464), 1024),
    "vgg8": (100, 3_965_028, ["stage1", "stage2", "stage3", "stage4", "stage5", "embedding", "logits"],
             (32, 16, 8, 4, 4), (64, 128, 256, 512, 512), 512),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_param_count_and_feature_shapes(name):
    nc, n_params, names, sizes, chans, emb = CASES[name]
    model = get_model(name, nc)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)

    def run(x):
        v = model.init(jax.random.key(0), x, train=False)
        return v, apply_model(model, v, x, train=True)

    v, (logits, feats, stats) = jax.eval_shape(run, x)
    assert set(v) == {"params", "batch_stats"}  # nothing sown at init
    assert num_params(v["params"]) == n_params
    assert logits.shape == (2, nc) and logits.dtype == jnp.float32
    assert sorted(feats) == sorted(names)  # (forward order: see test_feature_helpers...)
    for i, (s, c) in enumerate(zip(sizes, chans)):
        assert feats[f"stage{i + 1}"].shape == (2, s, s, c)
    assert feats["embedding"].shape == (2, emb)
    assert feats["logits"].shape == (2, nc)
    assert jax.tree.structure(stats) == jax.tree.structure(v["batch_stats"])


@pytest.mark.parametrize("name,n_params", [("resnet18_imagenet", 11_689_512), ("resnet34_imagenet", 21_797_672)])
def test_imagenet_resnets_match_torchvision(name, n_params):
    """torchvision.models.resnet18() / resnet34() (1000 classes) have these parameter counts
    (torchvision 0.29.1, counted with sum(p.numel() for p in m.parameters())); the 7x7 stride-2
    stem and the max-pool make the stage maps of a 224x224 input 56, 28, 14, 7."""
    fs = feature_shapes(get_model(name, 1000), (224, 224, 3))
    assert [fs[f"stage{i}"][1] for i in range(1, 5)] == [56, 28, 14, 7]
    v = jax.eval_shape(lambda x: get_model(name, 1000).init(jax.random.key(0), x), jnp.zeros((1, 224, 224, 3)))
    assert num_params(v["params"]) == n_params


def test_feature_helpers_and_other_sizes():
    m = get_model("resnet8", 100)
    assert feature_names(m, (2, 32, 32, 3)) == STAGES3  # forward order
    assert feature_shapes(m, (32, 32, 3))["stage3"] == (1, 8, 8, 64)  # 3-tuple -> batch 1
    assert feature_names(get_model("vgg8", 100), (2, 32, 32, 3)) == [
        "stage1", "stage2", "stage3", "stage4", "stage5", "embedding", "logits"]
    # Digits models also run on 28x28x1 and 32x32x3 inputs.
    for shape in [(2, 8, 8, 1), (2, 28, 28, 1), (2, 32, 32, 3)]:
        for name in ("cnn_small", "cnn_tiny"):
            fs = feature_shapes(get_model(name, 10), shape)
            assert list(fs) == ["stage1", "stage2", "embedding", "logits"]
            assert fs["stage1"][:3] == shape[:3] and fs["logits"] == (2, 10)
        assert feature_names(get_model("mlp", 10, hidden=(16, 8)), shape) == [
            "hidden1", "hidden2", "embedding", "logits"]


def test_digits_param_counts():
    p = lambda n, **kw: num_params(jax.eval_shape(lambda: _init(get_model(n, 10, **kw), (1, 8, 8, 1)))["params"])
    assert p("mlp") == 64 * 32 + 32 + 32 * 10 + 10
    assert 50_000 <= p("cnn_small") <= 100_000
    assert 5_000 <= p("cnn_tiny") <= 10_000


# ------------------------------------------------------------ real compute

# Real compute for a few cheap families only; the others are traced above (numerics were checked
# against the PyTorch references offline) and MobileNetV2's depthwise conv is tested below.
@pytest.mark.parametrize("name", ["cnn_tiny", "mlp", "resnet8", "wrn_16_1"])
def test_tiny_forward(name):
    model = get_model(name, 10)
    x = _x((2, 8, 8, 3))
    v = _init(model, x.shape)
    logits, feats, stats = _apply(model, train=True)(v, x)
    assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits)))
    assert sorted(feature_names(model, x.shape)) == sorted(feats)
    np.testing.assert_allclose(feats["logits"], logits, rtol=1e-6)
    if "batch_stats" in v:
        assert jax.tree.structure(stats) == jax.tree.structure(v["batch_stats"])
    else:
        assert stats is None


def test_batchnorm_train_vs_eval():
    model = get_model("cnn_tiny", 10)
    x = _x((2, 8, 8, 1))
    x_other = x.at[1].set(_x((8, 8, 1), seed=5))
    v = _init(model, x.shape)
    train, evaluate = _apply(model, train=True), _apply(model, train=False)
    # train: batch statistics, running averages updated
    y_tr, _, stats = train(v, x)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), stats, v["batch_stats"])
    assert all(jax.tree.leaves(changed))
    assert not np.allclose(train(v, x_other)[0][0], y_tr[0], atol=1e-4)  # depends on the batch
    # mutable_stats=False: still batch statistics, but no update returned
    y_tr2, _, none = _apply(model, train=True, mutable_stats=False)(v, x)
    assert none is None
    np.testing.assert_allclose(y_tr, y_tr2, rtol=1e-6)
    # eval: running averages, deterministic, no update, per-example (batch-independent)
    v2 = {"params": v["params"], "batch_stats": stats}
    y_ev, _, s_ev = evaluate(v2, x)
    assert s_ev is None
    np.testing.assert_array_equal(y_ev, evaluate(v2, x)[0])
    np.testing.assert_allclose(evaluate(v2, x_other)[0][0], y_ev[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(y_ev, y_tr, atol=1e-4)


def test_batchnorm_pytorch_defaults():
    bn = batch_norm(True, None, jnp.float32)
    x = _x((4, 3, 3, 5)) * 2 + 1
    v = _init(bn, x.shape)
    y, upd = jax.jit(lambda v, x: bn.apply(v, x, mutable=["batch_stats"]))(v, x)
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * var, rtol=1e-5)
    np.testing.assert_allclose(y, (x - mean) / jnp.sqrt(var + 1e-5), rtol=1e-4, atol=1e-4)


def test_sow_is_free_without_features_collection():
    model = get_model("cnn_tiny", 10)
    x = _x((2, 8, 8, 1))
    v = _init(model, x.shape)
    assert set(v) == {"params", "batch_stats"}
    # nothing mutable: sow is a no-op, a plain array comes back (traced only: no compile)
    out = jax.eval_shape(lambda v, x: model.apply(v, x), v, x)
    assert isinstance(out, jax.ShapeDtypeStruct) and out.shape == (2, 10)
    _, state = jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), v, x)
    assert set(state) == {"batch_stats"}
    # identical computation either way
    jaxpr_plain = str(jax.make_jaxpr(lambda v, x: model.apply(v, x))(v, x))
    jaxpr_feats = str(jax.make_jaxpr(lambda v, x: model.apply(v, x, mutable=["features"])[0])(v, x))
    assert jaxpr_plain == jaxpr_feats
    # apply_model builds the dict in forward order and ignores stale 'features' in variables
    seen = []
    jax.eval_shape(lambda v, x: seen.append(list(apply_model(model, v, x, train=False)[1])), v, x)
    stale = {**v, "features": {"stage1": jnp.zeros((2, 8, 8, 16))}}
    jax.eval_shape(lambda v, x: seen.append(list(apply_model(model, v, x, train=False)[1])), stale, x)
    assert seen == [["stage1", "stage2", "embedding", "logits"]] * 2


def test_bf16_model_returns_float32_logits():
    model = get_model("cnn_tiny", 10, dtype=jnp.bfloat16)
    x = _x((2, 8, 8, 1))
    v = _init(model, x.shape)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(v))
    logits, feats, stats = _apply(model, train=True)(v, x)
    assert logits.dtype == jnp.float32 and feats["stage1"].dtype == jnp.bfloat16
    assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(stats))
    ref, _, _ = _apply(get_model("cnn_tiny", 10), train=True)(v, x)
    np.testing.assert_allclose(logits, ref, atol=0.1, rtol=0.1)


def test_sync_bn_under_shard_map():
    mesh = jax.make_mesh((1,), ("data",))
    model = get_model("cnn_tiny", 10, bn_axis_name="data")
    plain = get_model("cnn_tiny", 10)
    x = _x((2, 8, 8, 1))
    v = _init(plain, x.shape)

    def step(v, x):
        logits, _, stats = apply_model(model, v, x, train=True)
        return logits, stats

    f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P("data")), out_specs=(P("data"), P())))
    logits, stats = f(jax.device_put(v, NamedSharding(mesh, P())), jax.device_put(x, NamedSharding(mesh, P("data"))))
    ref_logits, _, ref_stats = _apply(plain, train=True)(v, x)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), stats, ref_stats)


# ------------------------------------------------------------ depthwise conv

@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_impls_agree(stride):
    x = _x((2, 9 if stride == 2 else 8, 8, 6))  # odd size too: torch padding, floor division
    mods = {impl: DepthwiseConv(stride=stride, impl=impl) for impl in ("shift", "xla")}
    shapes = {impl: jax.eval_shape(lambda m=m: m.init(jax.random.key(0), x)) for impl, m in mods.items()}
    assert shapes["shift"] == shapes["xla"]  # same parameter name, shape, dtype: portable
    assert jax.tree.map(lambda a: a.shape, shapes["xla"]) == {"params": {"kernel": (3, 3, 1, 6)}}
    v = {"params": {"kernel": _x((3, 3, 1, 6), seed=2)}}
    out, grads = {}, {}
    for impl, m in mods.items():
        loss = lambda v, x, m=m: jnp.sum(jnp.sin(m.apply(v, x)))
        out[impl] = jax.jit(m.apply)(v, x)
        grads[impl] = jax.jit(jax.grad(loss, argnums=(0, 1)))(v, x)
    ho = (x.shape[1] - 1) // stride + 1
    assert out["shift"].shape == (2, ho, (8 - 1) // stride + 1, 6)
    np.testing.assert_allclose(out["shift"], out["xla"], rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads["shift"], grads["xla"])


def test_depthwise_shift_gradient_is_recomputed_bit_exactly():
    """The shift implementation's backward recomputes its nine slices (jax.checkpoint) rather than
    storing them: the same forward and gradients, bit for bit, as plain autodiff of it."""
    from kdjax.models.layers import _depthwise_shift, _depthwise_shift_remat

    x, k = _x((2, 9, 8, 6)), _x((3, 3, 1, 6), seed=2)
    for stride in (1, 2):
        grads = [jax.jit(jax.grad(lambda x, k, f=f: jnp.sum(jnp.sin(f(x, k, stride))), argnums=(0, 1)))(x, k)
                 for f in (_depthwise_shift, _depthwise_shift_remat)]
        jax.tree.map(np.testing.assert_array_equal, grads[0], grads[1])
    jaxpr = str(jax.make_jaxpr(lambda x, k: _depthwise_shift_remat(x, k, 1))(x, k))
    assert "prevent_cse" in jaxpr  # a remat (jax.checkpoint) equation


def test_cpu_conv_is_a_matmul_with_the_conv_parameters():
    """On CPU a 1x1 convolution (stride 1 or 2, odd sizes too) is computed as a matrix product
    over the channels: the values and gradients of lax's convolution with the same kernel; a
    convolution that is not a plain 1x1 (3x3, or grouped) still goes to lax."""
    from kdjax.models.layers import _cpu_conv, conv

    x, r = _x((2, 7, 6, 5)), _x((2, 7, 6, 4), seed=3)
    for stride in (1, 2):
        m = conv(4, 1, stride, dtype=jnp.float32)
        v = {"params": {"kernel": _x((1, 1, 5, 4), seed=2)}}
        ref = lambda v, x: jax.lax.conv_general_dilated(  # noqa: E731
            x, v["params"]["kernel"], (stride, stride), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        out = jax.jit(m.apply)(v, x)
        assert out.shape == (2, (7 - 1) // stride + 1, (6 - 1) // stride + 1, 4)
        np.testing.assert_allclose(out, ref(v, x), rtol=1e-5, atol=1e-5)
        loss = lambda f: lambda v, x: jnp.sum(f(v, x) * r[:, ::stride, ::stride])  # noqa: E731
        got, want = (jax.grad(loss(f), argnums=(0, 1))(v, x) for f in (m.apply, ref))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, want)
        jaxpr = str(jax.make_jaxpr(m.apply)(v, x))
        assert ("conv_general_dilated" in jaxpr) == (jax.default_backend() != "cpu")
    dn = jax.lax.conv_dimension_numbers(x.shape, (3, 3, 5, 4), ("NHWC", "HWIO", "NHWC"))
    for kernel, groups in (((3, 3, 5, 4), 1), ((1, 1, 1, 5), 5)):
        w = _x(kernel, seed=4)
        assert "conv_general_dilated" in str(jax.make_jaxpr(
            lambda x, w: _cpu_conv(x, w, (1, 1), ((0, 0), (0, 0)), dimension_numbers=dn,
                                   feature_group_count=groups))(x, w))


def test_conv_inputs_are_materialized_on_cpu_and_not_in_portable_programs():
    """On CPU a 3x3 convolution's and a depthwise convolution's input pass through
    `layers.materialize` (an identity in a conditional, which XLA does not fuse across): the values
    and gradients are lax's; inside `layers.portable()` (what `kdjax.export` traces under) and on
    other backends there is no conditional."""
    from kdjax.models import layers

    x, r = _x((2, 7, 6, 5)), _x((2, 7, 6, 4), seed=3)
    m = layers.conv(4, 3, 1, dtype=jnp.float32)
    v = {"params": {"kernel": _x((3, 3, 5, 4), seed=2)}}
    ref = lambda v, x: jax.lax.conv_general_dilated(  # noqa: E731
        jnp.maximum(x, 0), v["params"]["kernel"], (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    f = lambda v, x: m.apply(v, jnp.maximum(x, 0))  # noqa: E731
    np.testing.assert_array_equal(jax.jit(f)(v, x), jax.jit(ref)(v, x))
    got, want = (jax.jit(jax.grad(lambda v, x, g=g: jnp.sum(g(v, x) * r), argnums=(0, 1)))(v, x) for g in (f, ref))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), got, want)
    dw = DepthwiseConv(impl="shift")
    dv = _init(dw, x.shape)
    cpu = jax.default_backend() == "cpu"
    for fn, args in ((f, (v, x)), (dw.apply, (dv, x))):  # a new function each time: jax caches traces
        assert ("cond[" in str(jax.make_jaxpr(lambda *a: fn(*a))(*args))) == cpu
        with layers.portable():
            assert "cond[" not in str(jax.make_jaxpr(lambda *a: fn(*a))(*args))
        assert ("cond[" in str(jax.make_jaxpr(lambda *a: fn(*a))(*args))) == cpu  # the switch is scoped


def test_shufflenet_grouped_pointwise_and_channel_shuffle():
    """ShuffleNet's two special operations against independent statements: the grouped 1x1
    convolution against XLA's grouped convolution with the same (1, 1, C_in/g, C_out) kernel, and
    the channel shuffle against torch's view(g, C/g).permute.reshape written in numpy (NCHW).
    (The whole ShuffleV1, ShuffleV2 and ResNet50 were checked once against RepDistiller's torch
    models with ported weights: max logit difference 6e-7, 3e-7 and 5e-4 of 650.)"""
    from kdjax.models.shufflenet import GroupedPointwise, channel_shuffle

    x = _x((2, 3, 5, 12))
    m = GroupedPointwise(9, 3)
    v = m.init(jax.random.key(0), x)
    assert v["params"]["kernel"].shape == (1, 1, 4, 9)
    ref = jax.lax.conv_general_dilated(x, v["params"]["kernel"], (1, 1), "VALID",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=3)
    np.testing.assert_allclose(m.apply(v, x), ref, rtol=1e-5, atol=1e-5)
    nchw = np.asarray(x).transpose(0, 3, 1, 2)
    n, c, h, w = nchw.shape
    torch_like = nchw.reshape(n, 3, c // 3, h, w).transpose(0, 2, 1, 3, 4).reshape(n, c, h, w)
    np.testing.assert_array_equal(np.asarray(channel_shuffle(x, 3)).transpose(0, 3, 1, 2), torch_like)
    with pytest.raises(ValueError, match="divisible by groups=3"):
        GroupedPointwise(8, 3).init(jax.random.key(0), x)


def test_depthwise_auto_and_timing():
    x = _x((16, 16, 16, 96))
    auto = DepthwiseConv(impl="auto")
    v = _init(auto, x.shape)
    jaxpr = str(jax.make_jaxpr(lambda v, x: auto.apply(v, x))(v, x))
    if jax.default_backend() == "cpu":
        assert "conv_general_dilated" not in jaxpr
    else:
        assert "conv_general_dilated" in jaxpr
    with pytest.raises(ValueError):
        jax.eval_shape(lambda: DepthwiseConv(impl="bogus").init(jax.random.key(0), x))
    times = {}
    for impl in ("shift", "xla"):
        m = DepthwiseConv(impl=impl)
        g = jax.jit(jax.grad(lambda v, x, m=m: jnp.sum(m.apply(v, x) ** 2), argnums=(0, 1)))
        jax.block_until_ready(g(v, x))
        t = time.perf_counter()
        for _ in range(3):
            jax.block_until_ready(g(v, x))
        times[impl] = (time.perf_counter() - t) / 3
    print(f"\ndepthwise grad {x.shape} on {jax.default_backend()}: "
          f"shift {times['shift'] * 1e3:.1f} ms, xla {times['xla'] * 1e3:.1f} ms")
