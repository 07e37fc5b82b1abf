"""Method layer: every METHODS entry builds, runs (adapters included), differentiates; CRD memory
updates are identical under data parallelism."""

import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kdjax import distill, losses

pytestmark = pytest.mark.usefixtures("fast_compiles")  # tests/conftest.py


B, K, N = 8, 10, 64  # batch, classes, data-set size (CRD memory rows)
# KDSVD and FSP compare maps channel by channel (Method.same_widths): they need the teacher's widths,
# which the pairs below lack (tests/test_methods_feature.py runs them on equal-width pairs).
SAME_WIDTH = {n for n, m in distill.METHODS.items() if m.same_widths}
ALL = [m for m in distill.METHODS if m != "ce" and m not in SAME_WIDTH]
LABELS = np.arange(N) % K  # training labels of the toy data set
# the parts that terms of several parts return beside their value (logged as loss/<term>/<part>)
PARTS = {f"mlkd/{k}" for k in ("instance", "class", "batch")} | {"skd/instance", "skd/direction"}


def _features(rng, stages, emb, batch=B):
    """Random non-negative (post-ReLU-like) stage maps, an embedding and logits. NumPy inputs:
    eager jax.random calls would compile a kernel per shape."""
    f = {f"stage{i + 1}": np.maximum(rng.standard_normal((batch, *s)), 0).astype(np.float32)
         for i, s in enumerate(stages)}
    f["embedding"] = rng.standard_normal((batch, emb)).astype(np.float32)
    f["logits"] = 3.0 * rng.standard_normal((batch, K)).astype(np.float32)
    # a distilled ViT's two heads (deit)
    f["logits_cls"] = 3.0 * rng.standard_normal((batch, K)).astype(np.float32)
    f["logits_dist"] = 3.0 * rng.standard_normal((batch, K)).astype(np.float32)
    # The models' on-request features (kdjax.models.EXTRA_FEATURES): pre-ReLU maps with their
    # (negative) OFD margins, and a class map at the last stage's resolution.
    for i, s in enumerate(stages):
        f[f"preact_stage{i + 1}"] = rng.standard_normal((batch, *s)).astype(np.float32)
        f[f"preact_margin{i + 1}"] = -np.abs(rng.standard_normal((batch, s[-1]))).astype(np.float32)
    f["class_map"] = 3.0 * rng.standard_normal((batch, *stages[-1][:2], K)).astype(np.float32)
    f["strong/logits"] = 3.0 * rng.standard_normal((batch, K)).astype(np.float32)  # the strong view's (mlkd)
    return f


# cnn_tiny -> cnn_small on 8x8 digits (same spatial sizes, different widths), and a pair whose
# teacher maps are half the student's size (strided ConvReg, pooled AT/NST/VID, ABF resizing).
SHAPES = {
    "digits": (((8, 8, 16), (4, 4, 32)), 32, ((8, 8, 32), (4, 4, 64)), 64),
    "mismatch": (((8, 8, 8), (4, 4, 16)), 16, ((4, 4, 12), (2, 2, 24)), 24),
}


def _inputs(case, seed=0, batch=B):
    s_stages, s_emb, t_stages, t_emb = SHAPES[case]
    rng = np.random.default_rng(seed)
    s, t = _features(rng, s_stages, s_emb, batch), _features(rng, t_stages, t_emb, batch)
    return s, t, rng.integers(0, K, batch).astype(np.int32)


# deit reads a distilled ViT's two heads (Method.vit_student): not features of the CNN pairs below
# (tests/test_deit.py runs it with its ViT student).
CNN_ALL = [m for m in ALL if not distill.METHODS[m].vit_student]


def _all_terms(methods=ALL):
    cfg = distill.get_config("+".join(methods)).to_dict()
    return distill.build_terms(cfg, num_data=N, dataset_labels=LABELS)


def _ctx(labels, indices=None, train=False):
    indices = np.arange(labels.shape[0], dtype=np.int32) * 3 if indices is None else indices
    return distill.Context(labels=labels, train=train, indices=indices, rng=jax.random.key(1))


def _finite(tree):
    return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree))


def test_every_method_builds_with_reference_weights():
    for name in distill.METHODS:
        terms = distill.build_terms(distill.get_config(name).to_dict())
        # (a method's extra terms, named <method>_*, come before its own: mlkd_ce_strong)
        assert [t.name for t in terms if not t.name.startswith(f"{name}_")] == (
            ["ce"] if distill.METHODS[name].ce_weight else []) + ([] if name == "ce" else [name])
        if name != "ce":
            assert terms[-1].weight == distill.METHODS[name].defaults["weight"]
    dkd = distill.build_terms(distill.get_config("dkd").to_dict())
    assert dkd[0].weight == 1.0 and dkd[1].warmup_epochs == 20.0


# Everything enters jitted functions as an argument: closed-over arrays become constants that
# XLA:CPU constant-folds very slowly.
def _init(distiller, s, t, labels, indices=None):
    """Jitted init with a cheap-to-compile PRNG (threefry kernels compile slowly on CPU)."""
    fn = lambda k, s, t, y, i: distiller.init(k, s, t, _ctx(y, i))
    return jax.jit(fn)(jax.random.key(0, impl="rbg"), s, t, labels, indices)


def _split(variables):
    return variables.get("params", {}), {k: v for k, v in variables.items() if k != "params"}


def test_all_methods_finite_values_and_gradients():
    s, t, labels = _inputs("digits")
    terms = _all_terms()
    distiller = distill.Distiller(terms)
    params, state = _split(_init(distiller, s, t, labels))
    assert set(state) == {"batch_stats", "crd_memory", "taid"}

    def total(params, s, state, t, labels):
        values = distiller.apply({"params": params, **state}, s, t, _ctx(labels))
        return sum(values[x.name] for x in terms), values

    grad_fn = jax.jit(jax.value_and_grad(total, argnums=(0, 1), has_aux=True))
    (_, values), (g_params, g_feats) = grad_fn(params, s, state, t, labels)
    # every term, and the parts of the terms that have some (mlkd's levels, for logging)
    assert set(values) == {t.name for t in terms} | PARTS
    values, g_params, g_feats = jax.device_get((values, g_params, g_feats))
    for name, v in values.items():
        assert v.shape == () and np.isfinite(v), (name, v)
    # NaN/inf in any term's gradient would show in the gradient of the sum.
    assert _finite(g_params) and _finite(g_feats)
    for f in ("stage1", "stage2", "embedding", "logits"):
        assert np.abs(g_feats[f]).sum() > 0, f
    # Every adapter is trained (each belongs to one term, named after it).
    assert {m.split("_")[0] for m in params} == {"fitnet", "ofd", "vid", "reviewkd", "cc", "crd", "adv", "ab", "ft",
                                                 "ickd", "srd"}
    for module, g in g_params.items():
        assert all(np.abs(x).sum() > 0 for x in jax.tree.leaves(g)), module

    # Adapter-free methods equal the direct loss call (jitted: eager ops compile one by one).
    direct = jax.jit(_direct_losses)(s, t, labels)
    for name, want in direct.items():
        np.testing.assert_allclose(values[name], want, rtol=2e-5, atol=1e-6, err_msg=name)


def _direct_losses(s, t, labels):
    T = 4.0
    return {
        "ce": losses.cross_entropy(s["logits"], labels),
        "kd": losses.kd(s["logits"], t["logits"], T),
        "dkd": losses.dkd(s["logits"], t["logits"], labels, 1.0, 8.0, T),
        "dist": losses.dist(s["logits"], t["logits"], 1.0, 1.0, T),
        "lskd": losses.logit_standardized_kd(s["logits"], t["logits"], 2.0),
        "wttm": losses.wttm(s["logits"], t["logits"], 0.2),
        "nkd": losses.nkd(s["logits"], t["logits"], labels, 3.5, 3.0),
        "sdd": losses.sdd(losses.multiscale_logits(s["class_map"]), losses.multiscale_logits(t["class_map"]),
                          labels, "kd", T),
        "mse_logits": losses.mse_logits(s["logits"], t["logits"]),
        "fm": losses.kd(s["logits"], t["logits"], 1.0),
        "deit": losses.deit(s["logits_cls"], s["logits_dist"], t["logits"], labels),
        "reverse_kl": losses.reverse_kl(s["logits"], t["logits"], T),
        "generalized_jsd": losses.generalized_jsd(s["logits"], t["logits"], 0.5, 1.0),
        "skew_kl": losses.skew_kl(s["logits"], t["logits"], 0.1),
        "skew_reverse_kl": losses.skew_reverse_kl(s["logits"], t["logits"], 0.1),
        "taid": losses.taid(s["logits"], t["logits"], 0.4),  # the schedule's t_start (init, eval mode)
        "ab_divergence": losses.ab_divergence(s["logits"], t["logits"], 0.8, 0.3, T),
        "topk_kd": losses.topk_kd(s["logits"], *jax.lax.top_k(t["logits"], 5), T),
        "at": sum(losses.attention_transfer(s[k], t[k]) for k in ("stage1", "stage2")),
        "sp": losses.similarity_preserving(s["stage2"], t["stage2"]),
        "nst": sum(losses.nst(s[k], t[k]) for k in ("stage1", "stage2")),
        "rkd": losses.rkd(s["embedding"], t["embedding"]),
        "pkt": losses.pkt(s["embedding"], t["embedding"]),
    }


def test_feature_methods_with_mismatched_channels_and_sizes():
    """Teacher maps half the student's size and of other widths: strided ConvReg, pooled AT/NST/VID,
    ABF resizing; CC/CRD embeddings of different widths."""
    s, t, labels = _inputs("mismatch")
    cfg = distill.get_config("fitnet+ofd+at+sp+nst+vid+reviewkd+cc").to_dict()
    distiller = distill.Distiller(distill.build_terms(cfg))
    variables = _init(distiller, s, t, labels)
    values = jax.jit(lambda v, s, t, y: distiller.apply(v, s, t, _ctx(y)))(variables, s, t, labels)
    params = variables["params"]
    assert all(v.shape == () and np.isfinite(v) for v in jax.device_get(values).values()), values
    at = jax.jit(lambda s, t: sum(losses.attention_transfer(s[k], t[k]) for k in ("stage1", "stage2")))
    np.testing.assert_allclose(values["at"], at(s, t), rtol=2e-5)
    assert params["fitnet_regressor"]["conv"]["kernel"].shape == (3, 3, 16, 24)  # stride-2 3x3


def test_convreg_upsamples_and_feature_patterns():
    reg = distill.ConvReg((4, 4, 6))
    x = jnp.ones((2, 2, 2, 3))
    fn = lambda k, x: reg.init_with_output(k, x, _ctx(jnp.zeros((2,), jnp.int32)))
    out, _ = jax.jit(fn)(jax.random.key(0, impl="rbg"), x)
    assert out.shape == (2, 4, 4, 6)
    names = ["embedding", "stage10", "stage2", "stage1", "logits"]
    assert distill.resolve_features(("stage*",), names) == ("stage1", "stage2", "stage10")
    assert distill.resolve_features(("stage[-1]", "embedding"), names) == ("stage10", "embedding")
    with pytest.raises(ValueError, match="matches none of"):
        distill.resolve_features(("hidden*",), names)
    terms = distill.build_terms(distill.get_config("at").to_dict())
    with pytest.raises(ValueError, match="pairs student features"):
        distill.check_features(terms, ["stage1", "stage2", "logits"], ["stage1", "stage2", "stage3"])
    with pytest.raises(ValueError, match="does not have"):
        distill.check_features(terms, ["hidden1", "logits"], ["stage1"])
    distill.check_features(terms, ["stage1", "stage2", "logits"], ["stage1", "stage2"])


@pytest.mark.parametrize("student,teacher,image", [
    ("cnn_tiny", "cnn_small", (8, 8, 1)),
    ("resnet8x4", "resnet32x4", (32, 32, 3)),
    ("mobilenetv2", "resnet18", (32, 32, 3)),
])
def test_defaults_fit_real_model_pairs(student, teacher, image):
    """Every method's default features exist on both models and pair up, and all adapters trace
    on the real shapes (jax.eval_shape: no compute)."""
    from kdjax import models

    shapes = {who: models.feature_shapes(models.get_model(name, K), image, models.EXTRA_FEATURES)
              for who, name in (("student", student), ("teacher", teacher))}
    if student == "cnn_tiny":  # the toy shapes of the other tests are the digits models'
        s_stages, s_emb, t_stages, t_emb = SHAPES["digits"]
        assert [shapes["student"][f"stage{i + 1}"][1:] for i in range(2)] == list(s_stages)
        assert [shapes["teacher"][f"stage{i + 1}"][1:] for i in range(2)] == list(t_stages)
        assert (shapes["student"]["embedding"][1], shapes["teacher"]["embedding"][1]) == (s_emb, t_emb)
    terms = _all_terms(CNN_ALL)
    distill.check_features(terms, shapes["student"], shapes["teacher"])
    sds = lambda d: {k: jax.ShapeDtypeStruct((2, *v[1:]), jnp.float32) for k, v in d.items()}
    s, t = (distill.with_strong_view(d, d) for d in (sds(shapes["student"]), sds(shapes["teacher"])))  # mlkd's
    labels = jax.ShapeDtypeStruct((2,), jnp.int32)
    distiller = distill.Distiller(terms)
    variables = jax.eval_shape(lambda s, t, y: distiller.init(jax.random.key(0), s, t, _ctx(y)), s, t, labels)
    values = jax.eval_shape(lambda v, s, t, y: distiller.apply(v, s, t, _ctx(y)), variables, s, t, labels)
    assert all(v.shape == () for v in values.values())
    assert set(values) == {t.name for t in terms} | PARTS
    with pytest.raises(ValueError, match="student model does not have"):  # the digits MLP student
        distill.check_features(distill.build_terms(distill.get_config("at").to_dict()),
                               ["hidden1", "embedding", "logits"], shapes["teacher"])


def _train_apply(distiller, variables, mesh, s, t, labels, indices):
    """Train-mode value and gradient under shard_map, as kdjax.step does; returns the
    device-averaged values and parameter gradients and every device's updated non-param state."""
    params, state = _split(variables)

    def per_device(variables, s, t, labels, indices):
        params, state = _split(variables)
        ctx = distill.Context(labels=labels, train=True, indices=indices, rng=jax.random.key(7))

        def total(params):
            values, new_state = distiller.apply({"params": params, **state}, s, t, ctx, mutable=list(state))
            return sum(values.values()), (values, new_state)

        params = jax.lax.pcast(params, distill.AXIS, to="varying")  # per-device grads (see step.py)
        (_, (values, new_state)), grads = jax.value_and_grad(total, has_aux=True)(params)
        values, grads = jax.lax.pmean((values, grads), distill.AXIS)
        return values, grads, jax.tree.map(lambda x: x[None], new_state)

    specs = (P(), P(distill.AXIS), P(distill.AXIS), P(distill.AXIS), P(distill.AXIS))
    fn = jax.shard_map(per_device, mesh=mesh, in_specs=specs, out_specs=(P(), P(), P(distill.AXIS)))
    args = [jax.device_put(a, NamedSharding(mesh, spec))
            for a, spec in zip((variables, s, t, labels, indices), specs)]
    return jax.jit(fn)(*args)


def test_crd_memory_and_adapter_batch_stats_identical_under_data_parallelism():
    assert len(jax.devices()) >= 2, "tests/conftest.py sets 2 host devices"
    s, t, labels = _inputs("digits", seed=3)
    indices = np.asarray([5, 60, 17, 33, 2, 41, 28, 9], np.int32)
    cfg = distill.get_config("crd+fitnet").to_dict()  # crd: memory bank; fitnet: BatchNorm adapter
    cfg["crd"]["num_negatives"] = 16
    terms = distill.build_terms(cfg, num_data=N, dataset_labels=LABELS)
    distiller = distill.Distiller(terms)
    variables = _init(distiller, s, t, labels, indices)
    before = variables["crd_memory"]["crd"]
    assert float(before["z_s"]) == -1.0

    one = jax.make_mesh((1,), (distill.AXIS,), devices=jax.devices()[:1])
    two = jax.make_mesh((2,), (distill.AXIS,), devices=jax.devices()[:2])
    v1, g1, m1 = jax.device_get(_train_apply(distiller, variables, one, s, t, labels, indices))
    v2, g2, m2 = jax.device_get(_train_apply(distiller, variables, two, s, t, labels, indices))
    assert _finite(v2) and _finite(g2) and _finite(m2)
    m1 = jax.tree.map(lambda x: x[0], m1)
    mem1 = m1["crd_memory"]["crd"]
    # The memory changed: rows of this batch moved (unit norm), Z got set, other rows stayed.
    assert float(mem1["z_s"]) > 0 and float(mem1["z_t"]) > 0
    changed = np.any(np.asarray(mem1["bank_s"] != before["bank_s"]), axis=1)
    np.testing.assert_array_equal(np.flatnonzero(changed), np.sort(np.asarray(indices)))
    np.testing.assert_allclose(np.linalg.norm(mem1["bank_t"][indices], axis=1), 1.0, rtol=1e-5)
    # Both devices hold the same state, equal to the single-device update on the full batch
    # (memory: all-gathered update and global Z; adapter BatchNorm: synchronised statistics).
    for path, x2 in jax.tree_util.tree_leaves_with_path(m2):
        x1 = functools.reduce(lambda d, k: d[k.key], path, m1)
        np.testing.assert_array_equal(x2[0], x2[1], err_msg=str(path))
        np.testing.assert_allclose(x2[0], x1, rtol=1e-5, atol=1e-6, err_msg=str(path))
    # CRD and FitNet losses are batch means of per-example terms (negatives, Z and BatchNorm
    # statistics are device-count invariant): values and averaged gradients match one device.
    for name in ("crd", "fitnet"):
        np.testing.assert_allclose(v2[name], v1[name], rtol=1e-5, err_msg=name)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g2, g1)
    assert all(np.abs(x).sum() > 0 for x in jax.tree.leaves(g2))


def test_combining_and_validation():
    terms = distill.build_terms(distill.get_config("kd+at").to_dict())
    assert [t.name for t in terms] == ["ce", "kd", "at"]
    assert terms[0].weight == 1.0  # the larger reference CE weight (at: 1.0, kd: 0.1)
    with pytest.raises(ValueError, match="unknown distillation method 'foo'.*crd.*kd"):
        distill.build_terms({"method": "kd+foo"})
    with pytest.raises(ValueError, match=r"distill.at: unknown key\(s\) beta; allowed: .*p, student"):
        distill.build_terms({"method": "at", "at": {"beta": 1.0}})
    with pytest.raises(ValueError, match="distill.kd.weight must be"):
        distill.build_terms({"method": "kd", "kd": {"weight": -1.0}})
    with pytest.raises(ValueError, match="distill.ce_weight must be"):
        distill.build_terms({"method": "kd", "ce_weight": -0.5})
    with pytest.raises(ValueError, match="distill.terms.x: unknown key"):
        distill.build_terms({"method": "ce", "terms": {"x": {"loss": "kd", "wieght": 1}}})
    # Comma-separated feature names from the command line.
    terms = distill.build_terms({"method": "at", "at": {"student": "stage2, stage3", "teacher": "stage2,stage3"}})
    assert terms[-1].student == ("stage2", "stage3")


def _np_standardize(x):
    x = np.asarray(x, np.float64)
    return ((x - x.mean(1, keepdims=True)) / (1e-7 + x.std(1, ddof=1, keepdims=True))).astype(np.float32)


def test_logit_standardize_modifier_applies_to_every_logit_term():
    """distill.logit_standardize=True: every term reading student and teacher logits sees per-sample
    z-scored logits (numpy z-score here), before its temperature; CE and feature terms do not; lskd
    (kd with the modifier built in) is not standardised twice."""
    s, t, labels = _inputs("digits")
    cfg = distill.get_config("kd+dkd+wttm+nkd+lskd+sp").to_dict()
    cfg["logit_standardize"] = True
    cfg["terms"] = {"raw_mse": {"loss": "mse_logits"}}
    distiller = distill.Distiller(distill.build_terms(cfg))
    got = jax.jit(lambda s, t, y: distiller.apply({}, s, t, _ctx(y)))(s, t, labels)
    zs, zt = {**s, "logits": _np_standardize(s["logits"])}, {**t, "logits": _np_standardize(t["logits"])}
    want = jax.jit(lambda s, t, zs, zt, y: {
        "ce": losses.cross_entropy(s["logits"], y),
        "kd": losses.kd(zs["logits"], zt["logits"], 4.0),
        "dkd": losses.dkd(zs["logits"], zt["logits"], y, 1.0, 8.0, 4.0),
        "wttm": losses.wttm(zs["logits"], zt["logits"], 0.2),
        "nkd": losses.nkd(zs["logits"], zt["logits"], y, 3.5, 3.0),
        "lskd": losses.logit_standardized_kd(s["logits"], t["logits"], 2.0),
        "sp": losses.similarity_preserving(s["stage2"], t["stage2"]),
        "raw_mse": losses.mse_logits(zs["logits"], zt["logits"]),
    })(s, t, zs, zt, labels)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=2e-5, atol=1e-6, err_msg=name)
    # lskd == kd + the modifier with lskd's temperature and weights.
    cfg = distill.get_config("kd").to_dict()
    cfg.update(logit_standardize=True, ce_weight=0.1, kd={**cfg["kd"], "temperature": 2.0, "weight": 9.0})
    kd_ls = distill.Distiller(distill.build_terms(cfg))
    np.testing.assert_allclose(jax.jit(lambda s, t, y: kd_ls.apply({}, s, t, _ctx(y)))(s, t, labels)["kd"],
                               got["lskd"], rtol=1e-6)
    with pytest.raises(ValueError, match="distill.logit_standardize must be True or False"):
        distill.build_terms({"method": "kd", "logit_standardize": "yes"})


def test_ctkd_learned_temperature_gradient_reversal_and_curriculum():
    """CTKD on kd: T = 1 + 20 sigmoid(raw), raw initialised to 1; the kd term uses T; raw gets
    -lambda times the plain gradient (lambda at epoch floor(step / steps_per_epoch) + 1 from the
    reference cosine curriculum), the student the ordinary one; the step count advances in train
    mode, identically on 1 and 2 devices (steps per epoch from the global batch: 64 // 8 = 8)."""
    s, t, labels = _inputs("digits", seed=4)
    indices = np.arange(B, dtype=np.int32)
    cfg = distill.get_config("kd").to_dict()
    cfg["ctkd"]["enabled"] = True
    terms = distill.build_terms(cfg, num_data=N, dataset_labels=LABELS)
    assert [(x.name, x.weight) for x in terms] == [("ce", 0.1), ("ctkd_temperature", 0.0), ("kd", 0.9)]
    distiller = distill.Distiller(terms)
    variables = _init(distiller, s, t, labels, indices)
    assert float(variables["params"]["ctkd"]["raw"]) == 1.0 and float(variables["ctkd"]["ctkd"]["step"]) == 0.0
    t0 = 1.0 + 20.0 / (1.0 + np.exp(-1.0))

    def plain(raw, s_logits):  # kd at T(raw), no reversal: the gradients CTKD reverses
        temp = 1.0 + 20.0 * jax.nn.sigmoid(raw)
        return losses.cross_entropy(s_logits, labels) + losses.kd(s_logits, t["logits"], temp)

    g_raw, g_logits = jax.jit(jax.grad(plain, argnums=(0, 1)))(1.0, s["logits"])

    def cosine_decay(i):  # zhengli97/CTKD CosineDecay(max 0, min -1, loops 10): -lambda
        i = min(max(i, 0), 10)
        return (np.cos(i * np.pi / 10) + 1.0) * 0.5 * 1.0 - 1.0

    meshes = [jax.make_mesh((n,), (distill.AXIS,), devices=jax.devices()[:n]) for n in (1, 2)]
    for step, epoch in ((0.0, 1), (8.0 * 10, 11)):
        variables["ctkd"]["ctkd"]["step"] = jnp.asarray(step, jnp.float32)
        for mesh in meshes:
            values, grads, state = jax.device_get(_train_apply(distiller, variables, mesh, s, t, labels, indices))
            np.testing.assert_allclose(values["ctkd_temperature"], t0, rtol=1e-6)
            np.testing.assert_allclose(values["kd"], losses.kd(s["logits"], t["logits"], t0), rtol=1e-5)
            np.testing.assert_allclose(grads["ctkd"]["raw"], cosine_decay(epoch) * g_raw, rtol=1e-4)
            np.testing.assert_array_equal(state["ctkd"]["ctkd"]["step"], step + 1.0)
    # The student's gradient is the ordinary one (values and ce/kd at the same T, unit weights).
    f = lambda v, s_logits: sum(distiller.apply(v, {**s, "logits": s_logits}, t, _ctx(labels)).values())
    np.testing.assert_allclose(jax.jit(jax.grad(f, argnums=1))(variables, s["logits"]), g_logits,
                               rtol=1e-4, atol=1e-7)
    # dkd + ctkd: DKD reads the learned temperature too; a method without one is refused.
    cfg = distill.get_config("dkd+at").to_dict()
    cfg["ctkd"]["enabled"] = True
    v = distill.Distiller(distill.build_terms(cfg, num_data=N))
    out = jax.jit(lambda s, t, y: v.apply(v.init(jax.random.key(0, impl="rbg"), s, t, _ctx(y)), s, t, _ctx(y)))(
        s, t, labels)
    np.testing.assert_allclose(out["dkd"], losses.dkd(s["logits"], t["logits"], labels, 1.0, 8.0, t0), rtol=1e-5)
    with pytest.raises(ValueError, match=r"CTKD learns a distillation temperature, but at\+wttm has none"):
        distill.build_terms({"method": "at+wttm", "ctkd": {"enabled": True}})
    with pytest.raises(ValueError, match=r"distill.ctkd: unknown key\(s\) t_max"):
        distill.build_terms({"method": "kd", "ctkd": {"enabled": True, "t_max": 3.0}})


def test_crd_needs_data_size():
    s, t, labels = _inputs("digits")
    terms = distill.build_terms(distill.get_config("crd").to_dict())  # trainer passed nothing
    with pytest.raises(ValueError, match="num_data"):
        _init(distill.Distiller(terms), s, t, labels)
    terms = distill.build_terms(distill.get_config("crd").to_dict(), num_data=N)
    with pytest.raises(ValueError, match="dataset_labels"):
        _init(distill.Distiller(terms), s, t, labels)


def _np_softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_kd(s, p_teacher, T):
    """Hinton KD against a given teacher distribution: T^2 * mean_b KL(p || softmax(s / T))."""
    q = _np_softmax(np.asarray(s, np.float64) / T)
    return T * T * np.mean(np.sum(p_teacher * (np.log(p_teacher) - np.log(q)), axis=-1))


def test_ensemble_target_is_the_weighted_average_of_tempered_softmax():
    """Multi-teacher KD: three teachers' logits (B, 3, K) give the target sum_i w_i softmax(z_i / T)
    at each term's own temperature (numpy here), with equal or configured weights; kd's value is
    the numpy KD against that average, which differs from averaging at T = 1 and re-softening."""
    rng = np.random.default_rng(11)
    s, t, labels = _inputs("digits", seed=5)
    z = (3.0 * rng.standard_normal((B, 3, K))).astype(np.float32)
    for weights in (None, (1.0, 2.0, 5.0)):
        w = np.full(3, 1 / 3) if weights is None else np.asarray(weights) / np.sum(weights)
        for T in (1.0, 4.0):
            p = np.einsum("n,bnk->bk", w, _np_softmax(z / T))
            got = _np_softmax(np.asarray(jax.jit(distill.ensemble_logits, static_argnums=2)(z, T, weights)) / T)
            np.testing.assert_allclose(got, p, rtol=1e-5, atol=1e-7)
        cfg = distill.get_config("kd+dkd+fm+wttm").to_dict()
        distiller = distill.Distiller(distill.build_terms(cfg), teacher_weights=weights)
        got = jax.jit(lambda s, t, y: distiller.apply({}, s, t, _ctx(y)))(s, {**t, "logits": z}, labels)
        p4 = np.einsum("n,bnk->bk", w, _np_softmax(z / 4.0))
        np.testing.assert_allclose(got["kd"], _np_kd(s["logits"], p4, 4.0), rtol=1e-5)
        np.testing.assert_allclose(got["fm"], _np_kd(s["logits"], np.einsum("n,bnk->bk", w, _np_softmax(z)), 1.0),
                                   rtol=1e-5)
        # dkd reads the same tempered average (as logits T * log p); wttm combines at T = 1.
        np.testing.assert_allclose(got["dkd"], losses.dkd(s["logits"], 4.0 * np.log(p4), labels, 1.0, 8.0, 4.0),
                                   rtol=1e-5)
        p1 = np.einsum("n,bnk->bk", w, _np_softmax(z))
        np.testing.assert_allclose(got["wttm"], losses.wttm(s["logits"], np.log(p1), 0.2), rtol=1e-5)
    # The old target (average at T = 1, re-softened at T = 4) is another distribution.
    old = _np_softmax(np.log(np.mean(_np_softmax(z), axis=1)) / 4.0)
    assert np.abs(old - np.mean(_np_softmax(z / 4.0), axis=1)).max() > 0.02
    # Logit standardisation z-scores each teacher before the average.
    cfg = distill.get_config("kd").to_dict()
    cfg["logit_standardize"] = True
    distiller = distill.Distiller(distill.build_terms(cfg))
    got = jax.jit(lambda s, t, y: distiller.apply({}, s, t, _ctx(y)))(s, {**t, "logits": z}, labels)
    zs = _np_standardize(z.reshape(-1, K)).reshape(z.shape)
    want = _np_kd(_np_standardize(s["logits"]), np.mean(_np_softmax(zs / 4.0), axis=1), 4.0)
    np.testing.assert_allclose(got["kd"], want, rtol=1e-5)
    with pytest.raises(ValueError, match="2 ensemble weights for 3 teachers"):
        jax.eval_shape(lambda s, t, y: distill.Distiller(distill.build_terms(cfg), teacher_weights=(1.0, 1.0)).apply(
            {}, s, t, _ctx(y)), s, {**t, "logits": z}, labels)


def test_ensemble_with_ctkd_uses_the_learned_temperature():
    s, t, labels = _inputs("digits", seed=6)
    z = (3.0 * np.random.default_rng(2).standard_normal((B, 2, K))).astype(np.float32)
    cfg = distill.get_config("kd").to_dict()
    cfg["ctkd"]["enabled"] = True
    distiller = distill.Distiller(distill.build_terms(cfg, num_data=N))
    t0 = 1.0 + 20.0 / (1.0 + np.exp(-1.0))  # T at raw = 1
    tz = {**t, "logits": z}
    out = jax.jit(lambda s, t, y: distiller.apply(distiller.init(jax.random.key(0, impl="rbg"), s, t, _ctx(y)),
                                                  s, t, _ctx(y)))(s, tz, labels)
    np.testing.assert_allclose(out["kd"], _np_kd(s["logits"], np.mean(_np_softmax(z / t0), axis=1), t0), rtol=1e-5)


def test_ensemble_order_feature_source_and_weights():
    """Feature terms with several teachers need teacher.feature_source (refused in one line
    otherwise); that teacher is moved first (its features are the ones read) and the weights
    follow it; bad weights are refused in one line."""
    kd = distill.build_terms(distill.get_config("kd").to_dict())
    at = distill.build_terms(distill.get_config("kd+at").to_dict())
    assert distill.ensemble_order(3, kd) == ([0, 1, 2], None)
    assert distill.ensemble_order(1, at) == ([0], None) and distill.ensemble_order(0, at, "1,2") == ([], None)
    with pytest.raises(ValueError, match=r"term 'at' reads the teacher's stage\*, but the teacher is an ensemble "
                                         r"of 3 models: set config.teacher.feature_source"):
        distill.ensemble_order(3, at)
    assert distill.ensemble_order(3, at, "1,2,3", feature_source=2) == ([2, 0, 1], (3.0, 1.0, 2.0))
    assert distill.ensemble_order(2, kd, " 0.25, 0.75 ") == ([0, 1], (0.25, 0.75))
    for weights, match in (("1,2", "has 2 weights for 3 teacher"), ("1,-1,1", "finite numbers >= 0"),
                           ("0,0,0", "not all 0"), ("a,b,c", "comma-separated numbers")):
        with pytest.raises(ValueError, match=match):
            distill.ensemble_order(3, kd, weights)
    with pytest.raises(ValueError, match="feature_source=3 is not a teacher index"):
        distill.ensemble_order(3, at, feature_source=3)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _methods_table_keys():
    """The method keys of the methods table: docs/methods.md (the README's table until it moved)."""
    path = os.path.join(REPO, "docs", "methods.md")
    if not os.path.exists(path):
        path = os.path.join(REPO, "README.md")
    lines = open(path, encoding="utf-8").read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method (`distill.method`)"))
    keys = set()
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        if m := re.match(r"^\| `([^`]+)` \|", line):
            keys.add(m.group(1))
    return path, keys


def test_every_method_has_a_documentation_row():
    """A registered method needs its row in the methods table (docs/adding-a-method.md)."""
    path, keys = _methods_table_keys()
    missing = [m for m in distill.METHODS if m not in keys]
    assert not missing, f"methods without a row in the methods table of {path}: {', '.join(missing)}"
    assert keys <= set(distill.METHODS), f"rows for unknown methods: {sorted(keys - set(distill.METHODS))}"


def test_registry_facts_are_consistent_and_modules_small():
    from tests.test_global_batch import TERMS

    for name, m in distill.METHODS.items():
        assert m.loss is None or m.loss in losses.__all__, (name, m.loss)
        if m.same_widths:
            assert m.feature_maps, name
        if m.feature_maps:  # reads maps: not only logits / embeddings
            feats = distill.core._as_names(m.defaults["student"])
            assert set(feats) - {"logits", "embedding", "strong/logits"}, name
        if m.views:
            assert any(f.startswith(distill.STRONG) for f in distill.core._as_names(m.defaults["student"])), name
    # every batch-level method is in the global-batch harness (tests/test_global_batch.py)
    assert {n for n, m in distill.METHODS.items() if m.global_batch} <= set(TERMS)
    # a term of a global-batch method sees the global batch; the others do not
    for name, m in distill.METHODS.items():
        for t in distill.build_terms({"method": name, "ce_weight": 0.0}):
            assert t.global_batch == (m.global_batch and t.name == name), (name, t.name)
    with pytest.raises(ValueError, match="'kd' is registered twice"):
        distill.register("kd", paper="", ce_weight=0.0, defaults={})(lambda h, t, d: [])
    for package in ("losses", "distill"):
        here = os.path.join(REPO, "kdjax", package)
        for f in os.listdir(here):
            if f.endswith(".py"):
                n = sum(1 for _ in open(os.path.join(here, f), encoding="utf-8"))
                assert n <= 800, f"kdjax/{package}/{f} has {n} lines (at most 800)"


def test_adding_a_method_as_documented():
    """docs/adding-a-method.md's logit method, run as written: registered, configured, built."""
    doc = open(os.path.join(REPO, "docs", "adding-a-method.md"), encoding="utf-8").read()
    block = next(b for b in re.findall(r"```python\n(.*?)```", doc, re.S) if '@register("my_kd"' in b)
    namespace = dict(vars(distill.logit))
    fake_losses = type("L", (), {"my_kd": staticmethod(lambda s, t, temperature: losses.kd(s, t, temperature))})
    namespace["losses"] = fake_losses
    try:
        exec(block, namespace)
        cfg = distill.get_config("my_kd").to_dict()
        assert cfg["my_kd"] == {"weight": 0.9, "warmup_epochs": 0.0, "student": "logits", "teacher": "logits",
                                "temperature": None}
        terms = distill.build_terms(cfg)
        assert [(t.name, t.weight) for t in terms] == [("ce", 0.1), ("my_kd", 0.9)]
        s, t, labels = _inputs("digits")
        got = jax.jit(lambda s, t, y: distill.Distiller(terms).apply({}, s, t, _ctx(y)))(s, t, labels)
        np.testing.assert_allclose(got["my_kd"], losses.kd(s["logits"], t["logits"], 4.0), rtol=1e-6)
    finally:
        distill.METHODS.pop("my_kd", None)
