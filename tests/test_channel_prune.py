"""Structured channel pruning (kdjax.prune.channel_prune): the smaller model computes exactly the
original with the removed channels zeroed. Tiny models, numpy-filled variables (no model.init
compiles), one jit per model shape."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import models
from kdjax.models import MLP, get_model, num_params
from kdjax.prune import CRITERIA, channel_prune

SHAPE = (4, 8, 8, 1)  # digits-sized batch


def _abstract(model):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(SHAPE), train=False))


def _shapes(tree):
    return jax.tree.map(lambda a: (tuple(a.shape), np.dtype(a.dtype)), dict(tree))


def _init(model, seed=0):
    """Random variables with non-trivial BatchNorm: scale ~ N(1, .5), bias/mean ~ N(0, .5),
    var ~ U(.5, 2), so zeroing the wrong channels (or not zeroing a BN bias) changes the logits."""
    rng = np.random.default_rng(seed)

    def fill(path, a):
        name = path[-1].key
        if name == "scale":
            x = 1.0 + 0.5 * rng.normal(size=a.shape)
        elif name in ("bias", "mean"):
            x = 0.5 * rng.normal(size=a.shape)
        elif name == "var":
            x = rng.uniform(0.5, 2.0, size=a.shape)
        else:
            x = rng.normal(size=a.shape) * np.sqrt(2.0 / np.prod(a.shape[:-1]))
        return jnp.asarray(x, a.dtype)

    return jax.tree_util.tree_map_with_path(fill, dict(_abstract(model)))


_JIT = {}


def _logits(model, variables, x):
    key = repr(model)
    if key not in _JIT:
        _JIT[key] = jax.jit(lambda v, x: model.apply(v, x, train=False))
    return np.asarray(_JIT[key](variables, x))


def _x(seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=SHAPE), jnp.float32)


def _removed(scores, sparsity):
    """The test's own ranking: stable argsort, round(sparsity * width) lowest, at least one kept."""
    w = scores.size
    return np.sort(np.argsort(scores, kind="stable")[:min(int(np.round(sparsity * w)), w - 1)])


CNN_LAYERS = [("conv1_0", "bn1_0"), ("conv1_1", "bn1_1"), ("conv2_0", "bn2_0"), ("conv2_1", "bn2_1")]


def _cnn_removed(v, criterion, sparsity):
    p = v["params"]
    out = {}
    for conv, bn in CNN_LAYERS:
        kernel = np.asarray(p[conv]["kernel"])
        score = np.abs(kernel).sum(axis=(0, 1, 2)) if criterion == "l1" else np.abs(np.asarray(p[bn]["scale"]))
        out[conv] = _removed(score, sparsity)
    return out


def _zeroed_cnn(v, removed):
    """The original variables with the removed channels zeroed: conv output filters + BN scale/bias."""
    p = jax.tree.map(np.array, v["params"])
    for conv, bn in CNN_LAYERS:
        r = removed[conv]
        p[conv]["kernel"][..., r] = 0
        p[bn]["scale"][r] = 0
        p[bn]["bias"][r] = 0
    return {"params": p, "batch_stats": v["batch_stats"]}


# ---------------------------------------------------------------- SmallCNN.widths

def test_smallcnn_widths_none_is_old_behaviour_and_widths_set_channels():
    old = {"params": {"conv1_0": {"kernel": (3, 3, 1, 32)}, "bn1_0": {"scale": (32,), "bias": (32,)},
                      "conv1_1": {"kernel": (3, 3, 32, 32)}, "bn1_1": {"scale": (32,), "bias": (32,)},
                      "conv2_0": {"kernel": (3, 3, 32, 64)}, "bn2_0": {"scale": (64,), "bias": (64,)},
                      "conv2_1": {"kernel": (3, 3, 64, 64)}, "bn2_1": {"scale": (64,), "bias": (64,)},
                      "head": {"kernel": (64, 10), "bias": (10,)}},
           "batch_stats": {f"bn{s}": {"mean": (c,), "var": (c,)}
                           for s, c in (("1_0", 32), ("1_1", 32), ("2_0", 64), ("2_1", 64))}}
    for m in (get_model("cnn_small", 10), get_model("cnn_small", 10, widths=None)):
        assert m.widths is None
        assert jax.tree.map(lambda a: tuple(a.shape), dict(_abstract(m))) == old
    m = get_model("cnn_small", 10, widths=(3, 4, 5, 6))
    a = _abstract(m)
    assert [a["params"][c]["kernel"].shape[-1] for c, _ in CNN_LAYERS] == [3, 4, 5, 6]
    assert [a["params"][c]["kernel"].shape[-2] for c, _ in CNN_LAYERS] == [1, 3, 4, 5]
    assert a["params"]["head"]["kernel"].shape == (6, 10)
    assert a["batch_stats"]["bn2_0"]["mean"].shape == (5,)
    with pytest.raises(ValueError, match=r"^SmallCNN.widths needs one entry per conv \(3 for"):
        _abstract(get_model("cnn_tiny", 10, widths=(4, 4)))


# ---------------------------------------------------------------- equivalence

@pytest.mark.parametrize("criterion", CRITERIA)
def test_cnn_small_is_the_zeroed_original(criterion):
    model = get_model("cnn_small", 10)
    v = _init(model)
    before = jax.tree.map(np.array, v)
    overrides, small_v = channel_prune(model, v, sparsity=0.5, criterion=criterion)
    assert overrides == {"widths": (16, 16, 32, 32)}
    jax.tree.map(np.testing.assert_array_equal, v, before)  # input untouched
    small = dataclasses.replace(model, **overrides)
    assert small == get_model("cnn_small", 10, **overrides)
    assert _shapes(small_v) == _shapes(_abstract(small))  # checkpointable as a normal model

    removed = _cnn_removed(v, criterion, 0.5)
    kept_in = np.arange(1)
    for conv, bn in CNN_LAYERS:  # kept channels = the complement of the test's own ranking, in order
        kernel = np.asarray(v["params"][conv]["kernel"])
        kept = np.setdiff1d(np.arange(kernel.shape[-1]), removed[conv])
        np.testing.assert_array_equal(small_v["params"][conv]["kernel"], kernel[:, :, kept_in][..., kept])
        for col in ("params", "batch_stats"):
            for key, a in v[col][bn].items():
                np.testing.assert_array_equal(small_v[col][bn][key], np.asarray(a)[kept])
        kept_in = kept
    np.testing.assert_array_equal(small_v["params"]["head"]["kernel"],
                                  np.asarray(v["params"]["head"]["kernel"])[kept_in])

    x = _x()
    got = _logits(small, small_v, x)
    ref = _logits(model, _zeroed_cnn(v, removed), x)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    assert np.abs(got - _logits(model, v, x)).max() > 1e-2  # the pruning did change the function

    n0, n1 = num_params(v["params"]), num_params(small_v["params"])
    print(f"cnn_small {criterion}: {n0} -> {n1} params ({1 - n1 / n0:.1%} fewer)")
    assert n1 <= 0.6 * n0


def test_mlp_is_the_zeroed_original_and_ranking():
    model = MLP(num_classes=10, hidden=(64, 32))
    v = _init(model)
    overrides, small_v = channel_prune(model, v, sparsity=0.5)
    assert overrides == {"hidden": (32, 16)}
    assert set(small_v) == {"params"}
    small = dataclasses.replace(model, **overrides)
    assert _shapes(small_v) == _shapes(_abstract(small))

    p = jax.tree.map(np.array, v["params"])
    for name in ("fc1", "fc2"):
        k = p[name]["kernel"]
        r = _removed(np.abs(k).sum(axis=0), 0.5)
        kept = np.setdiff1d(np.arange(k.shape[-1]), r)
        np.testing.assert_array_equal(small_v["params"][name]["bias"], p[name]["bias"][kept])
        if name == "fc1":
            np.testing.assert_array_equal(small_v["params"][name]["kernel"], k[:, kept])
        k[..., r] = 0
        p[name]["bias"][r] = 0
    x = _x()
    np.testing.assert_allclose(_logits(small, small_v, x), _logits(model, {"params": p}, x), atol=1e-5, rtol=0)
    n0, n1 = num_params(v["params"]), num_params(small_v["params"])
    print(f"mlp (64, 32): {n0} -> {n1} params")


def test_cnn_tiny_include_exclude_and_head_rows():
    model = get_model("cnn_tiny", 10)  # widths (16, 16, 32)
    v = _init(model, seed=3)
    ov, sv = channel_prune(model, v, sparsity=0.25, include="conv2")
    assert ov == {"widths": (16, 16, 24)}
    head = np.asarray(v["params"]["head"]["kernel"])
    kernel = np.asarray(v["params"]["conv2_0"]["kernel"])
    kept = np.setdiff1d(np.arange(32), _removed(np.abs(kernel).sum(axis=(0, 1, 2)), 0.25))
    np.testing.assert_array_equal(sv["params"]["head"]["kernel"], head[kept])
    np.testing.assert_array_equal(sv["params"]["conv2_0"]["kernel"], kernel[..., kept])
    np.testing.assert_array_equal(sv["batch_stats"]["bn2_0"]["var"], np.asarray(v["batch_stats"]["bn2_0"]["var"])[kept])
    np.testing.assert_array_equal(sv["params"]["conv1_1"]["kernel"], np.asarray(v["params"]["conv1_1"]["kernel"]))
    ov, _ = channel_prune(model, v, sparsity=0.5, exclude="conv1_0")
    assert ov == {"widths": (16, 8, 16)}
    ov, sv = channel_prune(model, v, sparsity=0.0)
    assert ov == {"widths": (16, 16, 32)}
    jax.tree.map(np.testing.assert_array_equal, sv, jax.tree.map(np.asarray, v))


def test_bn_ranking_ties_and_keep_one():
    # 'bn': |gamma| ranks, sign ignored; ties removed earlier-index first.
    model = get_model("cnn_tiny", 10, widths=(4, 4, 4))
    v = _init(model)
    v["params"]["bn1_0"]["scale"] = jnp.asarray([-3.0, 0.1, 2.0, -0.2])
    v["params"]["bn1_1"]["scale"] = jnp.asarray([1.0, 1.0, 1.0, 1.0])
    _, sv = channel_prune(model, v, sparsity=0.5, criterion="bn")
    np.testing.assert_array_equal(sv["params"]["bn1_0"]["scale"], [-3.0, 2.0])
    np.testing.assert_array_equal(sv["params"]["conv1_0"]["kernel"],
                                  np.asarray(v["params"]["conv1_0"]["kernel"])[..., [0, 2]])
    np.testing.assert_array_equal(sv["params"]["conv1_1"]["kernel"],
                                  np.asarray(v["params"]["conv1_1"]["kernel"])[:, :, [0, 2]][..., [2, 3]])
    # 'l1' ties: identical columns -> the first ones go; sparsity 0.9 of 4 -> 4 rounded, 3 removed, 1 kept.
    mlp = MLP(num_classes=3, hidden=(4,))
    k = np.tile(np.arange(1.0, 65.0)[:, None], (1, 4)).astype(np.float32)
    mv = {"params": {"fc1": {"kernel": k, "bias": np.arange(4.0, dtype=np.float32)},
                     "head": {"kernel": np.arange(12.0, dtype=np.float32).reshape(4, 3),
                              "bias": np.zeros(3, np.float32)}}}
    ov, sv = channel_prune(mlp, mv, sparsity=0.5)
    assert ov == {"hidden": (2,)}
    np.testing.assert_array_equal(sv["params"]["fc1"]["bias"], [2.0, 3.0])
    np.testing.assert_array_equal(sv["params"]["head"]["kernel"], mv["params"]["head"]["kernel"][2:])
    ov, sv = channel_prune(mlp, mv, sparsity=0.9)
    assert ov == {"hidden": (1,)}
    np.testing.assert_array_equal(sv["params"]["fc1"]["bias"], [3.0])
    assert sv["params"]["fc1"]["kernel"].dtype == np.float32
    assert mv["params"]["fc1"]["kernel"].shape == (64, 4)  # input untouched


# ---------------------------------------------------------------- errors

def _msg(model, v, **kw):
    with pytest.raises(ValueError) as e:
        channel_prune(model, v, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_bad_inputs_one_line():
    model = get_model("cnn_tiny", 10)
    v = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), dict(_abstract(model)))
    for s in (-0.1, 1.0, 1.5, float("nan"), "0.5", None):
        assert _msg(model, v, sparsity=s) == f"channel_prune sparsity must be in [0, 1), got {s!r}"
    assert _msg(model, v, sparsity=0.5, criterion="l2") == \
        "unknown channel_prune criterion 'l2'; choose one of: l1, bn"
    for inc, exc in (("head", ""), ("", "."), ("fc", "")):
        assert _msg(model, v, sparsity=0.5, include=inc, exclude=exc) == (
            f"channel_prune include={inc!r} exclude={exc!r} selects no layer; the prunable layers of this SmallCNN "
            f"are: conv1_0, conv1_1, conv2_0 (the classifier 'head' is never pruned)")
    mlp = MLP(num_classes=10, hidden=(8,))
    mv = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), dict(_abstract(mlp)))
    assert "has no BatchNorm; use criterion 'l1'" in _msg(mlp, mv, sparsity=0.5, criterion="bn")
    assert "are: fc1 (" in _msg(mlp, mv, sparsity=0.5, include="conv")
    assert _msg(model, mv, sparsity=0.5) == \
        "channel_prune: the variables do not match this SmallCNN (no params/conv1_0)"
    resnet = models.get_model("resnet8", num_classes=10)
    assert _msg(resnet, {}, sparsity=0.5) == (
        "channel_prune supports only MLP and SmallCNN (models mlp, cnn_small, cnn_tiny), not ResNet: residual "
        "additions and depthwise/grouped convs tie the channels of several layers together, which this "
        "function does not handle")
