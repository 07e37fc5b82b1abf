"""Batch-level terms see the global batch under data parallelism: 1, 2 and 8 devices (jit +
shard_map, and pmap) give the same loss and the same gradients on the same global batch.

The measurements run in a child process with 8 host CPU devices (tests/conftest.py gives the test
process 2, and the device count is fixed once JAX has started); it writes them to an .npz that
the tests compare. Two harnesses:

- per term: each batch-level term alone (RKD, PKT, CC, SP, DIST, CRD, MLKD, SKD, SRD, DIST+), its value and its gradient
  with respect to a linear "student" that makes the features from the inputs, and to the term's
  adapters (CC's and CRD's embeddings, SRD's projector), with kdjax.step's convention (gradients w.r.t. a
  per-device view of the replicated parameters, then pmean);
- the real step: kdjax.step.make_train_step wrapped by DataParallel (jit on 1, 2, 8 devices and
  pmap on 8) with an MLP student and teacher and all six terms: logged term values, gradient norm
  and the parameters after one SGD step (all but MLKD, whose strong augmented view would double
  this harness's compile time; its term is in the first harness).
"""

import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, K, N, D_IN = 16, 5, 64, 12  # global batch, classes, data-set size (CRD memory), input width
TERMS = ("rkd", "pkt", "cc", "sp", "dist", "crd", "mlkd", "skd", "srd", "dist_plus")
STEP_TERMS = ("rkd", "pkt", "cc", "sp", "dist", "crd")  # the real step's
DEVICES = (1, 2, 8)


def _config():
    from kdjax import distill

    cfg = distill.get_config("+".join(TERMS)).to_dict()
    cfg["ce_weight"] = 0.0
    for name in TERMS:
        cfg[name]["weight"] = 1.0
    cfg["sp"]["student"] = cfg["sp"]["teacher"] = "stage2"
    cfg["dist_plus"]["student"] = cfg["dist_plus"]["teacher"] = "logits,stage2"
    cfg["crd"]["num_negatives"] = 16
    cfg["cc"]["dim"] = cfg["crd"]["dim"] = 8
    return cfg


def _name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _per_term(out):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from kdjax import distill, losses

    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, D_IN)).astype(np.float32)
    w = {"embedding": 0.5 * rng.standard_normal((D_IN, 6)), "logits": rng.standard_normal((D_IN, K)),
         "stage2": 0.5 * rng.standard_normal((D_IN, 2 * 2 * 5))}  # the teacher's widths (DIST+)
    w = {k: v.astype(np.float32) for k, v in w.items()}
    teacher = {"embedding": rng.standard_normal((B, 7)).astype(np.float32),
               "logits": 3.0 * rng.standard_normal((B, K)).astype(np.float32),
               "strong/logits": 3.0 * rng.standard_normal((B, K)).astype(np.float32),
               "stage2": np.maximum(rng.standard_normal((B, 2, 2, 5)), 0).astype(np.float32)}
    labels = (np.arange(N) % K).astype(np.int32)
    idx = rng.permutation(N)[:B].astype(np.int32)
    y = labels[idx]

    def student(w, x):
        return {"embedding": x @ w["embedding"], "logits": x @ w["logits"], "strong/logits": x[:, ::-1] @ w["logits"],
                "stage2": jnp.maximum(x @ w["stage2"], 0).reshape(x.shape[0], 2, 2, 5)}

    terms = distill.build_terms(_config(), num_data=N, dataset_labels=labels)
    distiller = distill.Distiller(terms)
    ctx = lambda y, i, train: distill.Context(labels=y, train=train, indices=i, rng=jax.random.key(3))  # noqa: E731
    variables = jax.jit(lambda k, w, x, t, y, i: distiller.init(k, student(w, x), t, ctx(y, i, False)))(
        jax.random.key(0, impl="rbg"), w, x, teacher, y, idx)
    d_params, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}

    # Each term alone (same variables): tracing every term for every term's gradient is slow.
    alone = {name: distill.Distiller(tuple(x for x in terms if x.name == name)) for name in TERMS}

    def per_device(w, d_params, state, x, t, y, i):
        w, d_params = jax.lax.pcast((w, d_params), distill.AXIS, to="varying")
        c = ctx(y, i, True)
        result = {}
        for name in TERMS:
            def loss(w, d_params, name=name):
                values, _ = alone[name].apply({"params": d_params, **state}, student(w, x), t, c, mutable=list(state))
                return values[name]
            value, (g_student, g_adapters) = jax.value_and_grad(loss, argnums=(0, 1))(w, d_params)
            result[name] = jax.lax.pmean({"value": value, "grad": {"student": g_student, "adapters": g_adapters}},
                                         distill.AXIS)
        return result

    def flat(result):
        return {f"{name}/{_name(path)}": np.asarray(v)
                for name, r in result.items() for path, v in jax.tree_util.tree_leaves_with_path(r)}

    args = (w, d_params, state, x, teacher, y, idx)
    for n in DEVICES:
        mesh = jax.make_mesh((n,), (distill.AXIS,), devices=jax.devices()[:n])
        specs = (P(), P(), P(), P(distill.AXIS), P(distill.AXIS), P(distill.AXIS), P(distill.AXIS))
        fn = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=specs, out_specs=P()))
        placed = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]
        for k, v in flat(jax.device_get(fn(*placed))).items():
            out[f"jit{n}/{k}"] = v
    n = 8
    fn = jax.pmap(per_device, axis_name=distill.AXIS, devices=jax.devices()[:n])
    rep = lambda a: np.broadcast_to(a, (n,) + np.shape(a))  # noqa: E731
    shard = lambda a: np.reshape(a, (n, -1) + np.shape(a)[1:])  # noqa: E731
    pargs = [jax.tree.map(rep, a) for a in args[:3]] + [jax.tree.map(shard, a) for a in args[3:]]
    for k, v in flat(jax.device_get(jax.tree.map(lambda a: a[0], fn(*pargs)))).items():
        out[f"pmap{n}/{k}"] = v
    # The loss-free terms on the whole batch, computed directly (one device, no collectives).
    direct = jax.jit(lambda w, x, t, y: {
        "rkd": losses.rkd(student(w, x)["embedding"], t["embedding"]),
        "pkt": losses.pkt(student(w, x)["embedding"], t["embedding"]),
        "sp": losses.similarity_preserving(student(w, x)["stage2"], t["stage2"]),
        "dist": losses.dist(student(w, x)["logits"], t["logits"], 1.0, 1.0, 4.0),
        "mlkd": losses.mlkd(student(w, x)["logits"], student(w, x)["strong/logits"], t["logits"], t["strong/logits"]),
        "skd": losses.skd(student(w, x)["logits"], t["logits"]),
        "dist_plus": losses.dist_plus(student(w, x)["logits"], t["logits"], student(w, x)["stage2"], t["stage2"],
                                      beta=2.0, gamma=2.0),
    })(w, x, teacher, y)
    for name, v in jax.device_get(direct).items():
        out[f"direct/{name}"] = np.asarray(v)
    # What one device would see without the gather on 4 devices (its 4 of the 16 examples).
    out["share/rkd"] = np.asarray(losses.rkd(student(w, x[:4])["embedding"], teacher["embedding"][:4]))


def _real_step(out):
    import jax
    import optax

    from kdjax import distill, models
    from kdjax import step as kstep

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (B, 8, 8, 1), dtype=np.uint8)
    labels = (np.arange(N) % K).astype(np.int32)
    idx = rng.permutation(N)[:B].astype(np.int32)
    batch = {"image": images, "label": labels[idx], "index": idx}
    cfg = _config()
    cfg["method"] = "+".join(STEP_TERMS)
    cfg["sp"]["student"] = cfg["sp"]["teacher"] = "hidden1"
    terms = distill.build_terms(cfg, num_data=N, dataset_labels=labels)
    distiller = distill.Distiller(terms)
    student = models.get_model("mlp", K, hidden=(16, 8), bn_axis_name=kstep.AXIS)
    teacher = models.get_model("mlp", K, hidden=(12,), bn_axis_name=kstep.AXIS)
    t_vars = teacher.init(jax.random.key(5, impl="rbg"), np.zeros((1, 8, 8, 1), np.float32))
    tx = optax.sgd(1.0)
    step_cfg = kstep.StepConfig(mean=(0.5,), std=(0.25,), steps_per_epoch=4)
    state = kstep.init_state(student, distiller, (teacher,), (t_vars,), tx, (8, 8, 1), seed=0)
    state = jax.device_get(state)
    for mode, n in (("jit", 1), ("jit", 2), ("jit", 8), ("pmap", 8)):
        par = kstep.DataParallel(mode, num_devices=n)
        fn = par.wrap(kstep.make_train_step(student, distiller, (teacher,), tx, lambda s: 1.0, step_cfg))
        new, metrics = fn(par.replicate(state), par.replicate((t_vars,)), par.shard(batch))
        new, metrics = par.unreplicate(new), par.unreplicate(metrics)
        for name in STEP_TERMS:
            out[f"step/{mode}{n}/loss/{name}"] = np.asarray(metrics[f"loss/{name}"])
        out[f"step/{mode}{n}/grad_norm"] = np.asarray(metrics["grad_norm"])
        for path, v in jax.tree_util.tree_leaves_with_path(new.params):
            out[f"step/{mode}{n}/params/{_name(path)}"] = np.asarray(v)


def _main(path):
    import jax

    assert jax.device_count() == 8, jax.devices()
    jax.config.update("jax_disable_most_optimizations", True)  # compile time; same for every run
    out = {}
    _per_term(out)
    _real_step(out)
    np.savez(path, **out)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("global_batch") / "measured.npz")
    flags = os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=2", "")
    env = dict(os.environ, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=8".strip(),
               JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), path], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with np.load(path) as f:
        return dict(f)


@pytest.mark.parametrize("term", TERMS)
def test_term_value_and_gradients_equal_on_1_2_8_devices(measured, term):
    ref = {k[len(f"jit1/{term}/"):]: v for k, v in measured.items() if k.startswith(f"jit1/{term}/")}
    student = [k for k in ref if k.startswith("grad/student/")]
    assert student and sum(np.abs(ref[k]).sum() for k in student) > 0, (term, sorted(ref))
    if term in ("cc", "crd"):  # the term's own embeddings are trained too
        adapters = [k for k in ref if k.startswith(f"grad/adapters/{term}")]
        assert adapters and all(np.abs(ref[k]).sum() > 0 for k in adapters), (term, sorted(ref))
    for run in ("jit2", "jit8", "pmap8"):
        for k, want in ref.items():
            got = measured[f"{run}/{term}/{k}"]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"{run} {term} {k}")
    if f"direct/{term}" in measured:  # and it is the loss on the whole batch
        np.testing.assert_allclose(ref["value"], measured[f"direct/{term}"], rtol=1e-5, err_msg=term)


def test_a_device_share_alone_gives_another_value(measured):
    """The gather matters: RKD on one device's share (4 of 16 examples) differs from the global."""
    assert abs(float(measured["share/rkd"]) - float(measured["direct/rkd"])) > 1e-3


def test_real_step_on_1_2_8_devices_and_pmap(measured):
    keys = [k[len("step/jit1/"):] for k in measured if k.startswith("step/jit1/")]
    assert any(k.startswith("params/student/") for k in keys) and any(k.startswith("params/distiller/") for k in keys)
    for run in ("jit2", "jit8", "pmap8"):
        for k in keys:
            np.testing.assert_allclose(measured[f"step/{run}/{k}"], measured[f"step/jit1/{k}"], rtol=2e-5,
                                       atol=1e-6, err_msg=f"{run} {k}")


if __name__ == "__main__":
    _main(sys.argv[1])
