"""OFD and SDD: the losses against numpy restatements of the reference code, the method terms
(OFD's connector with mismatched channels and sizes), and the models' on-request features they
read (pre-ReLU maps with BatchNorm margins, the class map)."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from kdjax import distill, losses, models
from tests.test_losses import np_dkd, np_kd


def np_margin(scale, bias):
    """clovaai/overhaul-distillation get_margin_from_BN, channel by channel."""
    out = []
    for s, m in zip(scale, bias):
        s = abs(float(s))
        m = float(m)
        if norm.cdf(-m / s) > 0.001:
            out.append(-s * math.exp(-(m / s) ** 2 / 2) / math.sqrt(2 * math.pi) / norm.cdf(-m / s) + m)
        else:
            out.append(-3 * s)
    return np.array(out)


def np_ofd(s, t, margin):
    """clovaai distillation_loss(...).sum() / batch_size: margin-ReLU target, partial L2."""
    target = np.maximum(t, margin)
    loss = (s - target) ** 2 * ((s > target) | (target > 0))
    return loss.sum() / s.shape[0]


def np_pool(x, n):
    """torch adaptive_avg_pool2d of an NHWC map to n x n."""
    h, w = x.shape[1:3]
    out = np.zeros((x.shape[0], n, n, x.shape[3]))
    for i in range(n):
        for j in range(n):
            r0, r1 = (i * h) // n, -((-(i + 1) * h) // n)
            c0, c1 = (j * w) // n, -((-(j + 1) * w) // n)
            out[:, i, j] = x[:, r0:r1, c0:c1].mean(axis=(1, 2))
    return out


def np_spp(x, scales=(1, 2, 4)):
    """SDD's SPP on a (B, H, W, K) class map: the finest grid from the map, the others from it;
    cells row-major, concatenated in the order of scales -> (B, R, K)."""
    finest = np_pool(x, max(scales))
    return np.concatenate([np_pool(finest, s).reshape(x.shape[0], s * s, -1) for s in scales], axis=1)


def _np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def np_sdd_nkd_row(s, t, label, temp, gamma):
    """SDD-CVPR2024 SDD_nkd.py nkd_loss for one row, as written there: the target term at T = 1,
    then `mask = ones_like(logit_s).scatter_(1, label, 1).bool()` -- a mask of ones, so every
    class is kept -- and the soft CE of the kept logits at `temp`, times gamma * temp^2."""
    loss_t = -np.exp(_np_log_softmax(t))[label] * _np_log_softmax(s)[label]
    mask = np.ones_like(s, bool)
    mask[label] = True  # scatter_(1, label, 1) into ones
    S, T_ = _np_log_softmax(s[mask] / temp), np.exp(_np_log_softmax(t[mask] / temp))
    return loss_t - gamma * temp**2 * (T_ * S).sum()


def np_sdd(s, t, y, base, T, alpha=1.0, beta=8.0):
    """shicaiwei123/SDD-CVPR2024 sdd_kd_loss / multi_dkd: the four masks, weights 1 and 2."""
    b, r, _ = s.shape
    tot = 0.0
    global_right = np.argmax(t[:, 0], -1) == y
    for i in range(b):
        for j in range(r):
            if base == "kd":
                loss = np_kd(s[i, j][None], t[i, j][None], T)
            elif base == "nkd":
                loss = np_sdd_nkd_row(s[i, j], t[i, j], y[i], T, beta)
            else:
                loss = np_dkd(s[i, j][None], t[i, j][None], y[i:i + 1], alpha, beta, T)
            local_right = np.argmax(t[i, j]) == y[i]
            gt_lt = global_right[i] and local_right
            gw_lw = not global_right[i] and not local_right
            gt_lw = j > 0 and global_right[i] and not local_right
            gw_lt = j > 0 and not global_right[i] and local_right
            assert gt_lt + gw_lw + gt_lw + gw_lt == 1
            tot += loss * (2.0 if (gt_lw or gw_lt) else 1.0)
    return tot / (b * r)


def test_ofd_margin_and_loss_match_the_reference():
    rng = np.random.default_rng(0)
    scale = np.array([1.0, -0.5, 2.0, 0.3, 1.0], np.float32)  # |scale| as the reference
    bias = np.array([0.0, 0.4, -1.0, 1.5, 4.0], np.float32)  # the last: Phi(-4) < 0.001 -> -3s
    s = rng.standard_normal((3, 2, 2, 5)).astype(np.float32)
    t = rng.standard_normal((3, 2, 2, 5)).astype(np.float32)
    m = np_margin(scale, bias).astype(np.float32)
    one = lambda v: np.full((1, 1, 1, 1), v, np.float32)  # noqa: E731

    @jax.jit
    def run(scale, bias, s, t, m):
        return (losses.ofd_margin(scale, bias), losses.ofd(s, t, m), losses.ofd(s, t, jnp.broadcast_to(m, (3, 5))),
                # no loss where the student is below a non-positive target; L2 where the target is > 0
                losses.ofd(one(-5.0), one(-1.0), m[:1]), losses.ofd(one(-5.0), one(1.0), m[:1]))

    margin, value, value_per_example, below, above = run(scale, bias, s, t, m)
    np.testing.assert_allclose(margin, np_margin(scale, bias), rtol=1e-5, atol=1e-6)
    assert margin[-1] == pytest.approx(-3.0)
    np.testing.assert_allclose(value, np_ofd(s, t, m), rtol=1e-5)
    np.testing.assert_allclose(value_per_example, np_ofd(s, t, m), rtol=1e-5)
    assert float(below) == 0.0 and float(above) == 36.0
    with pytest.raises(ValueError, match="ofd: margin must have shape"):
        losses.ofd(s, t, m[:3])


def test_ofd_term_connector_mismatched_channels_and_sizes():
    """Two student stages (8 and 16 channels, 8x8 / 4x4) against teacher stages of 12 and 24
    channels at half the size: 1x1 conv + BN connectors, the teacher pooled to the student's size
    (here: up, by replication), stage i of n weighted 1 / 2^(n-1-i)."""
    rng = np.random.default_rng(1)
    s = [rng.standard_normal((4, 8, 8, 8)), rng.standard_normal((4, 4, 4, 16))]
    t = [rng.standard_normal((4, 4, 4, 12)), rng.standard_normal((4, 2, 2, 24))]
    m = [-np.abs(rng.standard_normal((4, 12))), -np.abs(rng.standard_normal((4, 24)))]
    s, t, m = jax.tree.map(lambda a: a.astype(np.float32), (s, t, m))
    sf = {"preact_stage1": s[0], "preact_stage2": s[1]}
    tf = {"preact_stage1": t[0], "preact_stage2": t[1], "preact_margin1": m[0], "preact_margin2": m[1]}
    distiller = distill.Distiller(distill.build_terms({"method": "ofd", "ce_weight": 0.0}))
    ctx = distill.Context(labels=np.zeros(4, np.int32), train=False)
    variables = jax.jit(lambda k, s, t: distiller.init(k, s, t, ctx))(jax.random.key(0, impl="rbg"), sf, tf)
    values = jax.jit(lambda v, s, t: distiller.apply(v, s, t, ctx))(variables, sf, tf)
    want = 0.0
    for i in range(2):
        kernel = np.asarray(variables["params"][f"ofd_connector{i}"]["conv"]["kernel"])[0, 0]
        student = s[i] @ kernel / np.sqrt(1.0 + 1e-5)  # eval-mode BN at its initial statistics
        teacher = np.repeat(np.repeat(t[i], 2, axis=1), 2, axis=2)
        want += np_ofd(student, teacher, m[i][:, None, None, :]) / 2.0 ** (1 - i)
    np.testing.assert_allclose(values["ofd"], want, rtol=1e-4)
    terms = distill.build_terms(distill.get_config("ofd").to_dict())  # the reference weights
    assert [(t.name, t.weight) for t in terms] == [("ce", 1.0), ("ofd", 0.001)]


def test_multiscale_logits_and_sdd_match_the_reference():
    rng = np.random.default_rng(2)
    cmap_s = 2.0 * rng.standard_normal((3, 4, 4, 5)).astype(np.float32)
    cmap_t = 2.0 * rng.standard_normal((3, 4, 4, 5)).astype(np.float32)
    y = np.array([0, 3, 1], np.int32)
    ms, mt = np_spp(cmap_s), np_spp(cmap_t)
    mt[0, :, 0] += 6.0  # teacher right on every region of example 0 (consistent)...
    mt[1, 0, 3] += 6.0  # ...right globally but not everywhere on example 1 (complementary regions)
    terms = distill.build_terms(distill.get_config("sdd").to_dict())
    assert [(t.name, t.weight) for t in terms] == [("ce", 0.1), ("sdd", 0.9)]  # SD-KD: CE 0.1, 0.9, T 4

    @jax.jit
    def run(cmap_s, cmap_t, ms, mt, y):
        term = terms[1].fn(cmap_s, cmap_t, distill.Context(labels=y, train=False))  # both class maps
        return (losses.multiscale_logits(cmap_s), losses.multiscale_logits(cmap_s, (1, 2)), term,
                {b: losses.sdd(ms, mt, y, base=b, temperature=4.0) for b in ("kd", "dkd", "nkd")})

    pooled, pooled12, term, values = run(cmap_s, cmap_t, ms.astype(np.float32), mt.astype(np.float32), y)
    np.testing.assert_allclose(pooled, ms, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pooled12, np_spp(cmap_s, (1, 2)), rtol=1e-5, atol=1e-6)
    for base in ("kd", "dkd", "nkd"):
        np.testing.assert_allclose(values[base], np_sdd(ms, mt, y, base, 4.0), rtol=1e-5, err_msg=base)
    # distill.sdd.base=nkd reaches the loss, with beta as NKD's gamma (the reference's DKD.BETA)
    nkd_terms = distill.build_terms({"method": "sdd", "sdd": {"base": "nkd", "beta": 2.0}})
    nkd_term = jax.jit(lambda a, b, y: nkd_terms[1].fn(a, b, distill.Context(labels=y, train=False)))(
        cmap_s, cmap_t, y)
    np.testing.assert_allclose(nkd_term, np_sdd(ms, np_spp(cmap_t), y, "nkd", 4.0, beta=2.0), rtol=1e-5)
    np.testing.assert_allclose(term, np_sdd(ms, np_spp(cmap_t), y, "kd", 4.0), rtol=1e-5)
    for bad, message in (({"scales": "1,x"}, "distill.sdd.scales must be positive integers"),
                         ({"base": "ce"}, "distill.sdd.base must be 'kd', 'dkd' or 'nkd', got 'ce'")):
        with pytest.raises(ValueError, match=message):
            distill.build_terms({"method": "sdd", "sdd": bad})


def _run(model, x, extra):
    # Random variables of the model's shapes, drawn in numpy (no init to compile): kernels, and
    # BatchNorm scales, biases and statistics that differ per channel (so do the margins).
    rng = np.random.default_rng(3)
    draw = lambda path, v: (np.abs if "var" in jax.tree_util.keystr(path) else np.asarray)(  # noqa: E731
        0.5 * rng.standard_normal(v.shape) + ("scale" in jax.tree_util.keystr(path))).astype(np.float32)
    variables = jax.tree_util.tree_map_with_path(draw, models.param_shapes(model, x.shape))
    fn = jax.jit(lambda v, x: models.apply_model(model, v, x, train=False, extra=extra))
    return variables, fn(variables, x)


@pytest.mark.parametrize("name", ["cnn_tiny", "wrn_16_1"])
def test_models_on_request_features(name):
    """Off by default; on request the pre-ReLU maps (ReLU of them is the stage map; for the
    pre-activation WRN the next BN of it), the margins of the BatchNorm before each ReLU, and a
    class map whose cell averages are the logits of the pooled cells (region 0 = the logits)."""
    model = models.get_model(name, 10)
    shape = (2, 8, 8, 1) if name == "cnn_tiny" else (2, 8, 8, 3)
    assert not any(n.startswith(("preact", "class_map")) for n in models.feature_names(model, shape))
    x = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    variables, (logits, feats, _) = _run(model, x, models.EXTRA_FEATURES)
    params = variables["params"]
    n = 2 if name == "cnn_tiny" else 3
    bns = ({1: ("bn1_1",), 2: ("bn2_0",)} if name == "cnn_tiny"
           else {1: ("block2_0", "bn1"), 2: ("block3_0", "bn1"), 3: ("bn1",)})
    for i in range(1, n + 1):
        p = params
        for k in bns[i]:
            p = p[k]
        np.testing.assert_allclose(feats[f"preact_margin{i}"][1], np_margin(p["scale"], p["bias"]), rtol=1e-4,
                                   atol=1e-5)
        if name == "cnn_tiny":
            np.testing.assert_allclose(np.maximum(feats[f"preact_stage{i}"], 0), feats[f"stage{i}"], atol=1e-6)
    head = params["head" if name == "cnn_tiny" else "fc"]
    ms = np.asarray(losses.multiscale_logits(feats["class_map"], (1, 2)))
    np.testing.assert_allclose(ms[:, 0], logits, rtol=1e-4, atol=1e-4)
    last = feats["stage2"] if name == "cnn_tiny" else None
    if last is not None:  # a 2x2 cell's logits = the head on that cell's pooled features
        cell = np_pool(np.asarray(last), 2)[:, 0, 1]
        np.testing.assert_allclose(ms[:, 2], cell @ head["kernel"] + head["bias"], rtol=1e-4, atol=1e-4)


def test_mlp_student_is_refused_in_one_line():
    mlp = models.feature_names(models.get_model("mlp", 10), (8, 8, 1), models.EXTRA_FEATURES)
    for method, feature in (("ofd", "preact_stage*"), ("sdd", "class_map")):
        terms = distill.build_terms(distill.get_config(method).to_dict())
        with pytest.raises(ValueError, match=rf"term '{method}' reads student feature '{re.escape(feature)}', which "
                                             "the student model does not have; it has: embedding, hidden1, logits"):
            distill.check_features(terms, mlp, ["preact_stage1", "preact_margin1", "class_map"])


def test_ofd_and_sdd_train_end_to_end(tmp_path):
    """Both methods from the config through the trainer: the step asks the student, and the teacher
    cache the teacher, for the on-request features; every term is finite and the cache holds them."""
    from kdjax import train
    from tests.test_train import read_metrics, tiny_digits_config

    config = tiny_digits_config(**{"student.model": "cnn_tiny", "distill.method": "ofd+sdd", "log.report": False})
    workdir = str(tmp_path / "run")
    train.run(config, workdir)
    rows = read_metrics(workdir, "student")
    assert rows and all(np.isfinite(r[k]) for r in rows for k in ("loss", "loss/ofd", "loss/sdd", "loss/ce"))
    assert rows[0]["loss/ofd"] > 0 and rows[0]["loss/sdd"] > 0
    with np.load(tmp_path / "run" / "student" / "teacher_cache.npz") as cache:
        assert {"class_map", "preact_stage1", "preact_stage2", "preact_margin1", "preact_margin2"} <= set(cache.files)
