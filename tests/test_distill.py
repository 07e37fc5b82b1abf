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


@pytest.mark.parametrize("case", list(SHAPES))
def test_all_methods_finite_values_and_gradients(case):
    s, t, labels = _inputs(case)
    terms = _all_terms()
    distiller = distill.Distiller(terms)
    ctx = _ctx(labels)
    variables = distiller.init(jax.random.key(0), s, t, ctx)
    params, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}
    assert set(state) == {"batch_stats", "crd_memory"}

    @jax.jit
    def run(params, s):
        return distiller.apply({"params": params, **state}, s, t, ctx)

    values = run(params, s)
    assert set(values) == {t.name for t in terms}
    for name, v in values.items():
        assert v.shape == () and bool(jnp.isfinite(v)), (name, v)
    grads = jax.jit(jax.jacrev(run, argnums=(0, 1)))(params, s)
    for name, (g_params, g_feats) in grads.items():
        assert _finite(g_params) and _finite(g_feats), name
        read = distill.resolve_features(terms[[x.name for x in terms].index(name)].student, s)
        assert any(float(jnp.abs(g_feats[f]).sum()) > 0 for f in read), name
    # Every adapter receives a gradient from its own term.
    for module, p in params.items():
        term = module.split("_")[0] if not module.startswith("mse") else "mse_logits"
        g = grads[term][0][module]
        assert sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(g)) > 0, module

    # Adapter-free methods equal the direct loss call.
    T = 4.0
    direct = {
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
        "ce": losses.cross_entropy(s["logits"], labels),
    }
    for name, want in direct.items():
        np.testing.assert_allclose(values[name], want, rtol=2e-5, atol=1e-6, err_msg=name)


def test_convreg_upsamples_and_feature_patterns():
    ctx = _ctx(jnp.zeros((2,), jnp.int32))
    reg = distill.ConvReg((2, 4, 4, 6))
    x = jnp.ones((2, 2, 2, 3))
    out, _ = reg.init_with_output(jax.random.key(0), x, ctx)
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


def test_crd_memory_update_is_identical_under_data_parallelism():
    assert len(jax.devices()) >= 2, "tests/conftest.py sets 2 host devices"
    s, t, labels = _inputs("digits", seed=3)
    indices = jnp.asarray([5, 60, 17, 33, 2, 41, 28, 9], jnp.int32)
    cfg = distill.get_config("crd+vid").to_dict()  # vid: BatchNorm-free adapters; crd: memory
    cfg["crd"]["num_negatives"] = 16
    terms = distill.build_terms(cfg, num_data=N, dataset_labels=LABELS)
    distiller = distill.Distiller(terms)
    variables = distiller.init(jax.random.key(0), s, t, _ctx(labels, indices=indices))
    before = variables["crd_memory"]["crd"]
    assert float(before["z_s"]) == -1.0

    one = jax.make_mesh((1,), (distill.AXIS,), devices=jax.devices()[:1])
    two = jax.make_mesh((2,), (distill.AXIS,), devices=jax.devices()[:2])
    v1, m1 = _train_apply(distiller, variables, one, s, t, labels, indices)
    v2, m2 = _train_apply(distiller, variables, two, s, t, labels, indices)
    mem1 = jax.tree.map(lambda x: x[0], m1["crd_memory"]["crd"])
    # The memory changed: rows of this batch moved, Z got set, other rows stayed.
    assert float(mem1["z_s"]) > 0 and float(mem1["z_t"]) > 0
    changed = np.any(np.asarray(mem1["bank_s"] != before["bank_s"]), axis=1)
    np.testing.assert_array_equal(np.flatnonzero(changed), np.sort(np.asarray(indices)))
    np.testing.assert_allclose(np.linalg.norm(mem1["bank_t"][indices], axis=1), 1.0, rtol=1e-5)
    # Both devices hold the same memory, equal to the single-device update on the full batch.
    for key in ("bank_s", "bank_t", "z_s", "z_t"):
        np.testing.assert_array_equal(m2["crd_memory"]["crd"][key][0], m2["crd_memory"]["crd"][key][1])
        np.testing.assert_allclose(m2["crd_memory"]["crd"][key][0], mem1[key], rtol=1e-5, atol=1e-6)
    # CRD's loss is a batch mean of per-example terms with device-count-invariant negatives and Z.
    np.testing.assert_allclose(v2["crd"], v1["crd"], rtol=1e-5)


def test_train_mode_all_methods_under_shard_map():
    """Adapter BatchNorm syncs over the data axis: batch_stats equal the single-device ones."""
    s, t, labels = _inputs("mismatch", seed=4)
    indices = jnp.arange(B, dtype=jnp.int32) * 7
    distiller = distill.Distiller(_all_terms())
    variables = distiller.init(jax.random.key(0), s, t, _ctx(labels, indices=indices))
    two = jax.make_mesh((2,), (distill.AXIS,), devices=jax.devices()[:2])
    values, state = _train_apply(distiller, variables, two, s, t, labels, indices)
    assert _finite(values) and _finite(state)
    stats = state["batch_stats"]
    for leaf in jax.tree.leaves(stats):
        np.testing.assert_allclose(leaf[0], leaf[1], rtol=1e-6)
    assert not np.allclose(jax.tree.leaves(stats)[0][0], jax.tree.leaves(variables["batch_stats"])[0])


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
        distill.Distiller(terms).init(jax.random.key(0), s, t, _ctx(labels))
    terms = distill.build_terms(distill.get_config("crd").to_dict(), num_data=N)
    with pytest.raises(ValueError, match="dataset_labels"):
        distill.Distiller(terms).init(jax.random.key(0), s, t, _ctx(labels))
