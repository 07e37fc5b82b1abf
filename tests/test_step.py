"""Unit tests of the train step's pieces (kdjax.step): the NaN/Inf guard, DOT's two gradients, the
Mean Teacher's EMA, and the whole step leaving the state unchanged after a non-finite step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from kdjax import distill, models
from kdjax import step as kstep


def _on_one_device(fn, *args):
    """Runs a per-device piece as the step does: inside shard_map over a one-device ("data",) mesh."""
    mesh = jax.make_mesh((1,), (kstep.AXIS,), devices=jax.devices()[:1])
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=tuple(P() for _ in args), out_specs=P()))(*args)


def test_guard_keeps_the_old_tree_after_a_non_finite_step():
    new, old = {"w": jnp.full((3,), 2.0), "n": jnp.int32(5)}, {"w": jnp.zeros((3,)), "n": jnp.int32(4)}
    for total, grad_norm, update_norm, finite in ((1.0, 1.0, 1.0, True), (jnp.nan, 1.0, 1.0, False),
                                                  (1.0, jnp.inf, 1.0, False), (1.0, 1.0, jnp.nan, False)):
        def piece(total, grad_norm, update_norm):
            ok = kstep.is_finite_step(total, grad_norm, update_norm)
            return ok, kstep.keep_if_finite(ok, new, old)

        ok, kept = _on_one_device(piece, jnp.float32(total), jnp.float32(grad_norm), jnp.float32(update_norm))
        assert bool(ok) == finite
        for k in new:
            np.testing.assert_array_equal(kept[k], (new if finite else old)[k])


def test_dot_gradients_sum_to_the_plain_gradient():
    params = {"w": jnp.arange(4.0), "b": jnp.float32(0.5)}

    def loss_fn(p):  # task and distillation reach the parameters differently
        task, kd = jnp.sum(p["w"] ** 2) + p["b"], 3.0 * jnp.sum(p["w"])
        return (task, kd), {"task": task}

    def piece(params):  # the loss and aux are this device's own: averaged as the step's metrics are
        plain = kstep.device_gradients(loss_fn, params)
        dot = kstep.device_gradients(loss_fn, params, dot=True)
        return jax.tree.map(lambda v: jax.lax.pmean(v, kstep.AXIS), (plain, dot))

    (total, grads, (opt_grads, extra), _), (d_total, d_grads, (g_task, d_extra), aux) = _on_one_device(piece, params)
    assert extra == {} and set(d_extra) == {"kd_grads"}
    np.testing.assert_allclose(d_total, total)
    np.testing.assert_allclose(total, 14.5 + 18.0)
    np.testing.assert_allclose(aux["task"], 14.5)
    np.testing.assert_allclose(g_task["w"], 2 * np.arange(4.0))  # the task gradient alone
    np.testing.assert_allclose(d_extra["kd_grads"]["w"], np.full(4, 3.0))
    np.testing.assert_allclose(d_extra["kd_grads"]["b"], 0.0)
    for k in params:
        np.testing.assert_allclose(d_grads[k], grads[k])
        np.testing.assert_allclose(opt_grads[k], grads[k])


def test_ema_update_moves_towards_the_student_only_after_a_finite_step():
    ema = {"params": {"w": jnp.zeros(2)}, "batch_stats": {"m": jnp.ones(2)}}
    params, model_state = {"student": {"w": jnp.full(2, 10.0)}}, {"student": {"batch_stats": {"m": jnp.zeros(2)}}}
    out = kstep.ema_update(ema, params, model_state, 0.9, jnp.bool_(True))
    np.testing.assert_allclose(out["params"]["w"], [1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(out["batch_stats"]["m"], [0.9, 0.9], rtol=1e-6)
    same = kstep.ema_update(ema, params, model_state, 0.9, jnp.bool_(False))
    jax.tree.map(np.testing.assert_array_equal, same, ema)


def test_a_non_finite_step_changes_nothing_but_the_step_count():
    """An infinite L2 coefficient makes the loss (and gradient) infinite: the step keeps the
    parameters, optimizer state, BatchNorm statistics and EMA, counts the step and says so."""
    labels = (np.arange(16) % 4).astype(np.int32)
    terms = distill.build_terms(distill.get_config("ce").to_dict(), num_data=16, dataset_labels=labels)
    distiller = distill.Distiller(terms)
    student = models.get_model("cnn_tiny", 4, bn_axis_name=kstep.AXIS)
    tx = optax.sgd(0.1, momentum=0.9)
    state = kstep.init_state(student, distiller, (), (), tx, (8, 8, 1), seed=0, ema=True)
    state = jax.device_get(state)
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (8, 8, 8, 1), dtype=np.uint8), "label": labels[:8],
             "index": np.arange(8, dtype=np.int32)}
    par = kstep.DataParallel("jit", num_devices=1)
    for l2, finite in ((float("inf"), False), (0.0, True)):
        cfg = kstep.StepConfig(mean=(0.5,), std=(0.25,), steps_per_epoch=2, l2=l2, ema_decay=0.5)
        fn = par.wrap(kstep.make_train_step(student, distiller, (), tx, lambda s: 0.1, cfg))
        new, metrics = par.unreplicate(fn(par.replicate(state), par.replicate(()), par.shard(batch)))
        assert int(new.step) == int(state.step) + 1
        assert float(metrics["nonfinite"]) == (0.0 if finite else 1.0)
        for name in ("params", "opt_state", "model_state", "ema"):
            same = jax.tree.leaves(jax.tree.map(np.array_equal, getattr(new, name), getattr(state, name)))
            assert same and all(same) != finite, name
