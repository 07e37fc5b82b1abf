"""Method layer: every METHODS entry builds, runs (adapters included), differentiates; CRD memory
updates are identical under data parallelism."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from kdjax import distill, losses

B, K, N = 8, 10, 64  # batch, classes, data-set size (CRD memory rows)
ALL = [m for m in distill.METHODS if m != "ce"]
LABELS = np.arange(N) % K  # training labels of the toy data set


def _features(key, stages, emb, batch=B):
    """Random non-negative (post-ReLU-like) stage maps, an embedding and logits."""
    keys = jax.random.split(key, len(stages) + 2)
    f = {f"stage{i + 1}": jax.nn.relu(jax.random.normal(k, (batch, *s))) for i, (k, s) in enumerate(zip(keys, stages))}
    f["embedding"] = jax.random.normal(keys[-2], (batch, emb))
    f["logits"] = 3.0 * jax.random.normal(keys[-1], (batch, K))
    return f


# cnn_tiny -> cnn_small on 8x8 digits (same spatial sizes, different widths), and a pair whose
# teacher maps are half the student's size (strided ConvReg, pooled AT/NST/VID, ABF resizing).
SHAPES = {
    "digits": (((8, 8, 16), (4, 4, 32)), 32, ((8, 8, 32), (4, 4, 64)), 64),
    "mismatch": (((8, 8, 8), (4, 4, 16)), 16, ((4, 4, 12), (2, 2, 24)), 24),
}


def _inputs(case, seed=0, batch=B):
    s_stages, s_emb, t_stages, t_emb = SHAPES[case]
    ks, kt, kl = jax.random.split(jax.random.key(seed), 3)
    labels = jax.random.randint(kl, (batch,), 0, K)
    return _features(ks, s_stages, s_emb, batch), _features(kt, t_stages, t_emb, batch), labels


def _all_terms():
    cfg = distill.get_config("+".join(ALL)).to_dict()
    return distill.build_terms(cfg, num_data=N, dataset_labels=LABELS)


def _ctx(labels, train=False, indices=None, seed=1):
    indices = jnp.arange(labels.shape[0], dtype=jnp.int32) * 3 if indices is None else indices
    return distill.Context(labels=labels, train=train, indices=indices, rng=jax.random.key(seed))


def _finite(tree):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def test_every_method_builds_with_reference_weights():
    for name in distill.METHODS:
        terms = distill.build_terms(distill.get_config(name).to_dict())
        assert [t.name for t in terms] == (["ce"] if distill.METHODS[name].ce_weight else []) + (
            [] if name == "ce" else [name])
        if name != "ce":
            assert terms[-1].weight == distill.METHODS[name].defaults["weight"]
    dkd = distill.build_terms(distill.get_config("dkd").to_dict())
    assert dkd[0].weight == 1.0 and dkd[1].warmup_epochs == 20.0


def _init(distiller, s, t, ctx):
    """Jitted init with a cheap-to-compile PRNG (threefry kernels compile slowly on CPU)."""
    key = jax.random.key(0, impl="rbg")
    return jax.jit(lambda k: distiller.init(k, s, t, ctx))(key)


def _split(variables):
    return variables.get("params", {}), {k: v for k, v in variables.items() if k != "params"}


def test_all_methods_finite_values_and_gradients():
    s, t, labels = _inputs("digits")
    terms = _all_terms()
    distiller = distill.Distiller(terms)
    ctx = _ctx(labels)
    params, state = _split(_init(distiller, s, t, ctx))
    assert set(state) == {"batch_stats", "crd_memory"}

    def total(params, s):
        values = distiller.apply({"params": params, **state}, s, t, ctx)
        return sum(values.values()), values

    (_, values), (g_params, g_feats) = jax.jit(jax.value_and_grad(total, argnums=(0, 1), has_aux=True))(params, s)
    assert set(values) == {t.name for t in terms}
    for name, v in values.items():
        assert v.shape == () and bool(jnp.isfinite(v)), (name, v)
    # NaN/inf in any term's gradient would show in the gradient of the sum.
    assert _finite(g_params) and _finite(g_feats)
    for f in ("stage1", "stage2", "embedding", "logits"):
        assert float(jnp.abs(g_feats[f]).sum()) > 0, f
    # Every adapter is trained (each belongs to one term, named after it).
    assert {m.split("_")[0] for m in params} == {"fitnet", "vid", "reviewkd", "cc", "crd"}
    for module, g in g_params.items():
        assert all(float(jnp.abs(x).sum()) > 0 for x in jax.tree.leaves(g)), module

    # Adapter-free methods equal the direct loss call.
    T = 4.0
    direct = {
        "ce": losses.cross_entropy(s["logits"], labels),
        "kd": losses.kd(s["logits"], t["logits"], T),
        "dkd": losses.dkd(s["logits"], t["logits"], labels, 1.0, 8.0, T),
        "dist": losses.dist(s["logits"], t["logits"], 1.0, 1.0, T),
        "lskd": losses.logit_standardized_kd(s["logits"], t["logits"], 2.0),
        "mse_logits": losses.mse_logits(s["logits"], t["logits"]),
        "fm": losses.kd(s["logits"], t["logits"], 1.0),
        "at": sum(losses.attention_transfer(s[k], t[k]) for k in ("stage1", "stage2")),
        "sp": losses.similarity_preserving(s["stage2"], t["stage2"]),
        "nst": sum(losses.nst(s[k], t[k]) for k in ("stage1", "stage2")),
        "rkd": losses.rkd(s["embedding"], t["embedding"]),
        "pkt": losses.pkt(s["embedding"], t["embedding"]),
    }
    for name, want in direct.items():
        np.testing.assert_allclose(values[name], want, rtol=2e-5, atol=1e-6, err_msg=name)


def test_feature_methods_with_mismatched_channels_and_sizes():
    """Teacher maps half the student's size and of other widths: strided ConvReg, pooled AT/NST/VID,
    ABF resizing; CC/CRD embeddings of different widths."""
    s, t, labels = _inputs("mismatch")
    cfg = distill.get_config("fitnet+at+sp+nst+vid+reviewkd+cc").to_dict()
    distiller = distill.Distiller(distill.build_terms(cfg))
    ctx = _ctx(labels)
    params, state = _split(_init(distiller, s, t, ctx))
    values = jax.jit(lambda p: distiller.apply({"params": p, **state}, s, t, ctx))(params)
    assert all(v.shape == () and bool(jnp.isfinite(v)) for v in values.values()), values
    np.testing.assert_allclose(
        values["at"], sum(losses.attention_transfer(s[k], t[k]) for k in ("stage1", "stage2")), rtol=2e-5)
    assert params["fitnet_regressor"]["conv"]["kernel"].shape == (3, 3, 16, 24)  # stride-2 3x3


def test_convreg_upsamples_and_feature_patterns():
    ctx = _ctx(jnp.zeros((2,), jnp.int32))
    reg = distill.ConvReg((2, 4, 4, 6))
    x = jnp.ones((2, 2, 2, 3))
    out, _ = jax.jit(lambda k: reg.init_with_output(k, x, ctx))(jax.random.key(0, impl="rbg"))
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


def _train_apply(distiller, variables, mesh, s, t, labels, indices):
    """Train-mode apply under shard_map; returns every device's updated non-param state."""
    state = {k: v for k, v in variables.items() if k != "params"}

    def per_device(variables, s, t, labels, indices):
        ctx = distill.Context(labels=labels, train=True, indices=indices, rng=jax.random.key(7))
        values, new_state = distiller.apply(variables, s, t, ctx, mutable=list(state))
        values = jax.lax.pmean(values, distill.AXIS)
        return values, jax.tree.map(lambda x: x[None], new_state)

    fn = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(distill.AXIS), P(distill.AXIS), P(distill.AXIS), P(distill.AXIS)),
                       out_specs=(P(), P(distill.AXIS)))
    return jax.jit(fn)(variables, s, t, labels, indices)


def test_crd_memory_and_adapter_batch_stats_identical_under_data_parallelism():
    assert len(jax.devices()) >= 2, "tests/conftest.py sets 2 host devices"
    s, t, labels = _inputs("digits", seed=3)
    indices = jnp.asarray([5, 60, 17, 33, 2, 41, 28, 9], jnp.int32)
    cfg = distill.get_config("crd+fitnet").to_dict()  # crd: memory bank; fitnet: BatchNorm adapter
    cfg["crd"]["num_negatives"] = 16
    terms = distill.build_terms(cfg, num_data=N, dataset_labels=LABELS)
    distiller = distill.Distiller(terms)
    variables = _init(distiller, s, t, _ctx(labels, indices=indices))
    before = variables["crd_memory"]["crd"]
    assert float(before["z_s"]) == -1.0

    one = jax.make_mesh((1,), (distill.AXIS,), devices=jax.devices()[:1])
    two = jax.make_mesh((2,), (distill.AXIS,), devices=jax.devices()[:2])
    v1, m1 = _train_apply(distiller, variables, one, s, t, labels, indices)
    v2, m2 = _train_apply(distiller, variables, two, s, t, labels, indices)
    assert _finite(v2) and _finite(m2)
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
    # CRD's loss is a batch mean of per-example terms with device-count-invariant negatives and Z.
    np.testing.assert_allclose(v2["crd"], v1["crd"], rtol=1e-5)


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


def test_crd_needs_data_size():
    s, t, labels = _inputs("digits")
    terms = distill.build_terms(distill.get_config("crd").to_dict())  # trainer passed nothing
    with pytest.raises(ValueError, match="num_data"):
        _init(distill.Distiller(terms), s, t, _ctx(labels))
    terms = distill.build_terms(distill.get_config("crd").to_dict(), num_data=N)
    with pytest.raises(ValueError, match="dataset_labels"):
        _init(distill.Distiller(terms), s, t, _ctx(labels))
