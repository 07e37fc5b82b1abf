"""Adversarial distillation (`distill.method=adv`, `kd+adv`): the discriminator's BCE against
numpy, the gradient signs of the one-step minimax (discriminator descends, student ascends through
the gradient-reversal layer, teacher gets nothing), feature inputs of other widths, and one tiny
end-to-end run whose checkpoint holds the discriminator."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import distill, losses


pytestmark = pytest.mark.usefixtures("fast_compiles")  # tests/conftest.py


B, K = 6, 5


def _np_bce(real, fake):
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    sig = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
    return -np.mean(np.log(sig(real))) - np.mean(np.log(1.0 - sig(fake)))


def test_discriminator_bce_matches_numpy():
    rng = np.random.default_rng(0)
    real, fake = 2.0 * rng.standard_normal(5), 2.0 * rng.standard_normal((7, 1))
    np.testing.assert_allclose(losses.discriminator_bce(real, fake), _np_bce(real, fake), rtol=1e-6)
    # A discriminator at chance: 2 log 2; a perfect one: 0.
    np.testing.assert_allclose(losses.discriminator_bce(np.zeros(3), np.zeros(4)), 2 * np.log(2), rtol=1e-6)
    assert float(losses.discriminator_bce(np.full(2, 30.0), np.full(2, -30.0))) < 1e-12
    with pytest.raises(ValueError, match=r"discriminator_bce: real_logits must have rank >= 1"):
        losses.discriminator_bce(np.float32(1.0), np.zeros(2))


def _np_mlp(params, x):
    """The discriminator in numpy: Dense + LeakyReLU(0.2) per hidden layer, then Dense(1)."""
    layers = sorted((k for k in params if k.startswith("dense")), key=lambda k: int(k[5:])) + ["out"]
    for i, name in enumerate(layers):
        x = x @ np.asarray(params[name]["kernel"], np.float64) + np.asarray(params[name]["bias"], np.float64)
        if i < len(layers) - 1:
            x = np.where(x > 0, x, 0.2 * x)
    return x[:, 0]


def _np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _distiller(**adv):
    cfg = distill.get_config("adv").to_dict()
    cfg["adv"].update(adv)
    cfg["ce_weight"] = 0.0  # the adversarial term alone
    return distill.Distiller(distill.build_terms(cfg, dataset_labels=np.arange(20) % K))


def _value_and_grads(distiller, s, t, labels):
    ctx = lambda y: distill.Context(labels=y, train=False)  # noqa: E731
    variables = jax.jit(lambda k, s, t, y: distiller.init(k, s, t, ctx(y)))(jax.random.key(0, impl="rbg"), s, t, labels)

    def total(params, s, t, y):
        return distiller.apply({"params": params}, s, t, ctx(y))["adv"]

    value, grads = jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2)))(variables["params"], s, t, labels)
    return variables["params"], value, grads


def _reference(params, s, t, labels, logits=True):
    """The same BCE without the reversal layer, in JAX (its gradients are the BCE's own)."""
    disc = distill.Discriminator((16,))
    if logits:
        s, t = jax.nn.log_softmax(s), jax.nn.log_softmax(t)
    else:
        s, t = s.mean(axis=(1, 2)), t.mean(axis=(1, 2))
        if "adv_embed" in params:
            s = distill.Embed(t.shape[-1]).apply({"params": params["adv_embed"]}, s)
    y = jax.nn.one_hot(labels, K)
    s, t = jnp.concatenate([s, y], -1), jnp.concatenate([t, y], -1)
    d = lambda x: disc.apply({"params": params["adv_discriminator"]}, x)  # noqa: E731
    return losses.discriminator_bce(d(t), d(s))


def test_adv_value_and_gradient_signs_on_logits():
    """Value: numpy's MLP on [log_softmax(z), one_hot(y)], teacher real, student fake. Gradients:
    the discriminator's are the BCE's own (it descends it), the student's logits get exactly the
    negated BCE gradient (they ascend it, through the reversal layer), the teacher's get zero; a
    small step along each confirms the direction."""
    rng = np.random.default_rng(1)
    s = {"logits": 3.0 * rng.standard_normal((B, K)).astype(np.float32)}
    t = {"logits": 3.0 * rng.standard_normal((B, K)).astype(np.float32)}
    labels = rng.integers(0, K, B).astype(np.int32)
    distiller = _distiller(hidden="16")
    params, value, (g_params, g_s, g_t) = _value_and_grads(distiller, s, t, labels)
    assert set(params) == {"adv_discriminator"}
    y = np.eye(K)[labels]
    d = params["adv_discriminator"]
    want = _np_bce(_np_mlp(d, np.concatenate([_np_log_softmax(t["logits"]), y], -1)),
                   _np_mlp(d, np.concatenate([_np_log_softmax(s["logits"]), y], -1)))
    np.testing.assert_allclose(value, want, rtol=1e-5)

    ref_grads = jax.jit(jax.grad(_reference, argnums=(0, 1)))(params, s["logits"], t["logits"], labels)
    for got, ref in zip(jax.tree.leaves(g_params), jax.tree.leaves(ref_grads[0])):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g_s["logits"], -ref_grads[1], rtol=1e-5, atol=1e-7)
    assert np.abs(g_s["logits"]).sum() > 0 and not np.any(g_t["logits"])

    ref = jax.jit(_reference)
    lr = 1e-2
    stepped = jax.tree.map(lambda p, g: p - lr * g, params, g_params)  # the optimizer's descent step
    assert ref(stepped, s["logits"], t["logits"], labels) < value  # the discriminator gets better
    s_stepped = s["logits"] - lr * g_s["logits"]
    assert ref(params, s_stepped, t["logits"], labels) > value  # the student fools it more

    # An ensemble's teacher axis: two identical teachers are that teacher.
    both = {"logits": np.stack([t["logits"]] * 2, axis=1)}
    ctx = distill.Context(labels=labels, train=False)
    twice = jax.jit(lambda v, s, t: distiller.apply(v, s, t, ctx)["adv"])({"params": params}, s, both)
    np.testing.assert_allclose(twice, value, rtol=1e-5)


def test_adv_on_feature_maps_of_other_widths():
    """Pooled maps; the student's 8 channels are projected to the teacher's 12 by an Embed on the
    student's side of the reversal (it ascends the BCE with the student); the class count of the
    condition comes from the training labels."""
    rng = np.random.default_rng(2)
    s = {"stage2": rng.standard_normal((B, 4, 4, 8)).astype(np.float32)}
    t = {"stage2": rng.standard_normal((B, 2, 2, 12)).astype(np.float32)}
    labels = rng.integers(0, K, B).astype(np.int32)
    distiller = _distiller(hidden="16", student="stage2", teacher="stage2")
    params, value, (g_params, g_s, g_t) = _value_and_grads(distiller, s, t, labels)
    assert params["adv_embed"]["Dense_0"]["kernel"].shape == (8, 12)
    assert params["adv_discriminator"]["dense0"]["kernel"].shape == (12 + K, 16)
    ref = lambda p, s: _reference(p, s, t["stage2"], labels, logits=False)  # noqa: E731
    ref_value, (ref_p, ref_s) = jax.jit(jax.value_and_grad(ref, argnums=(0, 1)))(params, s["stage2"])
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(g_params["adv_discriminator"]), jax.tree.leaves(ref_p["adv_discriminator"])):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    for got, want in zip(jax.tree.leaves(g_params["adv_embed"]), jax.tree.leaves(ref_p["adv_embed"])):
        np.testing.assert_allclose(got, -want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g_s["stage2"], -ref_s, rtol=1e-5, atol=1e-7)
    assert not np.any(g_t["stage2"])


def test_adv_refusals():
    with pytest.raises(ValueError, match="distill.adv.hidden must be comma-separated positive layer widths"):
        distill.build_terms({"method": "adv", "adv": {"hidden": "64,x"}})
    (term,) = distill.build_terms({"method": "adv", "ce_weight": 0.0,
                                    "adv": {"student": "embedding", "teacher": "embedding"}})
    x = np.zeros((2, 4), np.float32)
    ctx = distill.Context(labels=np.zeros(2, np.int32), train=False)
    with pytest.raises(ValueError, match="adv.conditional on a feature needs the number of classes"):
        distill.Distiller((term,)).init(jax.random.key(0), {"embedding": x}, {"embedding": x}, ctx)
    (term,) = distill.build_terms({"method": "adv", "ce_weight": 0.0, "adv": {"student": "stage*", "teacher": "stage*"}})
    feats = {"stage1": x, "stage2": x}
    with pytest.raises(ValueError, match="adv reads one student and one teacher feature"):
        distill.Distiller((term,)).init(jax.random.key(0), feats, feats, ctx)


def test_kd_plus_adv_trains_end_to_end_and_checkpoints_the_discriminator(tmp_path):
    """`--config.distill.method=kd+adv`: the larger CE weight of the two (adv's 1), the discriminator's
    BCE is logged every step, and the discriminator's parameters are in the stage's checkpoint
    with the student's (so a resumed run restores them and their optimizer state like any
    adapter's)."""
    from kdjax import train
    from tests.test_train import final_params, read_metrics, tiny_digits_config

    config = tiny_digits_config(**{"teacher.model": "mlp", "distill.method": "kd+adv", "distill.adv.hidden": "16"})
    workdir = str(tmp_path / "run")
    summary = train.run(config, workdir)
    assert summary["student"]["terms"] == {"ce": 1.0, "kd": 0.9, "adv": 1.0}
    rows = read_metrics(workdir, "student")
    adv = np.array([r["loss/adv"] for r in rows])
    assert len(adv) > 1 and np.all(np.isfinite(adv)) and np.all(adv > 0) and len(set(adv.tolist())) > 1
    np.testing.assert_allclose([r["loss"] for r in rows],
                               [r["loss/ce"] + 0.9 * r["loss/kd"] + r["loss/adv"] for r in rows], rtol=1e-5)
    _, params = final_params(workdir, "student")
    assert params["distiller"]["adv_discriminator"]["dense0"]["kernel"].shape == (10 + 10, 16)
    assert os.path.exists(os.path.join(workdir, "student", "checkpoints"))
