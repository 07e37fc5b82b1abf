"""kdjax.losses outside the kdjax trainer: (..., K) logits, padding masks and reductions.

A tiny sequence model (token embeddings -> 2-layer MLP -> per-token logits over the vocabulary)
is distilled from a fixed teacher in a plain optax loop, with ``losses.kd(..., where=mask)``;
then every logit loss is checked for leading-axes == flattened-batch equivalence and for its
reductions.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import losses

V, D, H = 12, 8, 16  # vocabulary (the last id is the padding token), embedding, hidden
B, T = 4, 6
PAD = V - 1
LENGTHS = np.array([6, 4, 2, 5])
MASK = np.arange(T)[None, :] < LENGTHS[:, None]  # (B, T), False at padding


def _tokens(seed=0):
    tok = np.random.default_rng(seed).integers(0, V - 1, size=(B, T))
    return np.where(MASK, tok, PAD).astype(np.int32)  # PAD occurs at padded positions only


def init_mlp(key, scale=1.0):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"embed": jax.random.normal(k1, (V, D)) * scale,
            "w1": jax.random.normal(k2, (D, H)) * scale / np.sqrt(D), "b1": jnp.zeros(H),
            "w2": jax.random.normal(k3, (H, V)) * scale / np.sqrt(H), "b2": jnp.zeros(V)}


def apply_mlp(params, tokens):
    h = jnp.tanh(params["embed"][tokens] @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]  # (B, T, V)


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kd_tokens(s, t, mask, temperature):
    """T^2 * mean over the unpadded tokens of KL(softmax(t/T) || softmax(s/T)), float64."""
    ls, lt = np_log_softmax(s[mask] / temperature), np_log_softmax(t[mask] / temperature)
    return temperature**2 * np.mean(np.sum(np.exp(lt) * (lt - ls), axis=-1))


TOKENS = _tokens()
TEACHER = init_mlp(jax.random.key(1), scale=3.0)
# The teacher's outputs at padding are garbage (NaN): the mask must keep them out entirely.
TEACHER_LOGITS = jnp.where(MASK[..., None], apply_mlp(TEACHER, TOKENS), jnp.nan)


def test_masked_kd_matches_numpy_on_the_unpadded_tokens_and_pads_get_zero_gradient():
    student = init_mlp(jax.random.key(0))
    s_logits = apply_mlp(student, TOKENS)
    t_np = np.asarray(TEACHER_LOGITS)
    expected = np_kd_tokens(np.asarray(s_logits), t_np, MASK, 2.0)

    value, g_logits = jax.value_and_grad(losses.kd)(s_logits, TEACHER_LOGITS, 2.0, where=MASK)
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    # the same as the flattened batch of the real tokens, the (B, K) case
    flat = losses.kd(s_logits[MASK], t_np[MASK], 2.0)
    np.testing.assert_allclose(float(value), float(flat), rtol=1e-6)
    assert np.all(np.isfinite(g_logits))
    assert np.all(np.asarray(g_logits)[~MASK] == 0.0)
    assert np.all(np.abs(np.asarray(g_logits)[MASK]).sum(-1) > 0)
    # Even NaN student logits at padding change nothing.
    s_nan = jnp.where(MASK[..., None], s_logits, jnp.nan)
    v2, g2 = jax.value_and_grad(losses.kd)(s_nan, TEACHER_LOGITS, 2.0, where=MASK)
    assert float(v2) == float(value)
    np.testing.assert_array_equal(np.asarray(g2), np.asarray(g_logits))

    # Through the model: the padding token's embedding row gets exactly zero gradient.
    grads = jax.grad(lambda p: losses.kd(apply_mlp(p, TOKENS), TEACHER_LOGITS, 2.0, where=MASK))(
        student)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert np.all(np.asarray(grads["embed"][PAD]) == 0.0)
    used = np.unique(TOKENS[MASK])
    assert np.all(np.abs(np.asarray(grads["embed"])[used]).sum(-1) > 0)


def test_plain_optax_loop_distils_a_sequence_model():
    """docs/losses.md's snippet, run: no kdjax trainer, only losses.kd with a padding mask."""
    student = init_mlp(jax.random.key(0))
    tx = optax.adam(0.05)
    opt_state = tx.init(student)

    def kl_to_teacher(params):  # what distillation should lower: KL at T = 1 on real tokens
        return losses.kd(apply_mlp(params, TOKENS), TEACHER_LOGITS, 1.0, where=MASK)

    @jax.jit
    def step(params, opt_state):
        def loss_fn(p):
            logits = apply_mlp(p, TOKENS)
            return losses.kd(logits, TEACHER_LOGITS, temperature=2.0, where=MASK)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    before = float(kl_to_teacher(student))
    params = student
    for _ in range(60):
        params, opt_state, loss = step(params, opt_state)
        assert np.isfinite(float(loss))
    after = float(kl_to_teacher(params))
    assert after < 0.05 * before, (before, after)  # measured: 1.82 -> 0.0008 (60 Adam steps)
    # the padding token was never seen by the loss, so Adam never moved its embedding
    np.testing.assert_array_equal(np.asarray(params["embed"][PAD]),
                                  np.asarray(student["embed"][PAD]))


# ---------------------------------------------------------------------------------------------
# Every logit loss: (B, T, K) with a mask == the flattened batch of unmasked rows; reductions.

K = 5
rng = np.random.default_rng(3)
S3 = (rng.standard_normal((2, 3, K)) * 2).astype(np.float32)
T3 = (rng.standard_normal((2, 3, K)) * 3).astype(np.float32)
Y3 = rng.integers(0, K, size=(2, 3)).astype(np.int32)
M3 = np.array([[True, True, False], [True, False, True]])
# Padding holds garbage: NaN logits and an ignore-index label.
S3_PAD = np.where(M3[..., None], S3, np.nan).astype(np.float32)
T3_PAD = np.where(M3[..., None], T3, np.inf).astype(np.float32)
Y3_PAD = np.where(M3, Y3, -100).astype(np.int32)

# name -> fn(student, teacher, labels, **kw)
LOGIT_LOSSES = {
    "cross_entropy": lambda s, t, y, **kw: losses.cross_entropy(s, y, **kw),
    "cross_entropy_ls": lambda s, t, y, **kw: losses.cross_entropy(s, y, 0.1, **kw),
    "soft_cross_entropy": lambda s, t, y, **kw: losses.soft_cross_entropy(s, t, 2.0, **kw),
    "kd": lambda s, t, y, **kw: losses.kd(s, t, 4.0, **kw),
    "dkd": lambda s, t, y, **kw: losses.dkd(s, t, y, 1.0, 8.0, 4.0, **kw),
    "logit_standardized_kd": lambda s, t, y, **kw: losses.logit_standardized_kd(s, t, 2.0, **kw),
    "wttm": lambda s, t, y, **kw: losses.wttm(s, t, 0.2, **kw),
    "nkd": lambda s, t, y, **kw: losses.nkd(s, t, y, 3.5, 3.0, **kw),
    "mse_logits": lambda s, t, y, **kw: losses.mse_logits(s, t, **kw),
}
TOL = dict(rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(LOGIT_LOSSES))
def test_leading_axes_mask_and_reductions(name):
    f = LOGIT_LOSSES[name]
    s2, t2, y2 = S3.reshape(-1, K), T3.reshape(-1, K), Y3.reshape(-1)
    keep = M3.reshape(-1)
    n = int(keep.sum())

    # No mask: (2, 3, K) is the flattened batch of 6 rows, for every reduction.
    for red in ("mean", "sum"):
        np.testing.assert_allclose(float(f(S3, T3, Y3, reduction=red)),
                                   float(f(s2, t2, y2, reduction=red)), **TOL)
    none3 = np.asarray(f(S3, T3, Y3, reduction="none"))
    assert none3.shape == (2, 3) and none3.dtype == np.float32
    np.testing.assert_allclose(none3.reshape(-1), np.asarray(f(s2, t2, y2, reduction="none")), **TOL)
    np.testing.assert_allclose(none3.mean(), float(f(S3, T3, Y3)), **TOL)

    # With a mask (and garbage at padding): the flattened batch of the unmasked rows only.
    ref_rows = np.asarray(f(s2[keep], t2[keep], y2[keep], reduction="none"))
    mean = f(S3_PAD, T3_PAD, Y3_PAD, where=M3)
    total = f(S3_PAD, T3_PAD, Y3_PAD, where=M3, reduction="sum")
    per = np.asarray(f(S3_PAD, T3_PAD, Y3_PAD, where=M3, reduction="none"))
    np.testing.assert_allclose(float(mean), float(f(s2[keep], t2[keep], y2[keep])), **TOL)
    np.testing.assert_allclose(float(total), ref_rows.sum(), **TOL)
    np.testing.assert_allclose(float(total), n * float(mean), **TOL)
    np.testing.assert_allclose(per[M3], ref_rows, **TOL)
    assert np.all(per[~M3] == 0.0)

    # Zero (and finite) gradient at padding; a mask of all True is the unmasked loss.
    g = np.asarray(jax.grad(lambda s: f(s, T3_PAD, Y3_PAD, where=M3))(jnp.asarray(S3_PAD)))
    assert np.all(np.isfinite(g)) and np.all(g[~M3] == 0.0) and np.abs(g[M3]).sum() > 0
    np.testing.assert_allclose(float(f(S3, T3, Y3, where=np.ones_like(M3))), float(f(S3, T3, Y3)),
                               **TOL)
    # Nothing unmasked: mean and sum are 0, with zero gradient.
    none_kept = np.zeros_like(M3)
    assert float(f(S3, T3, Y3, where=none_kept)) == 0.0
    assert np.all(np.asarray(jax.grad(lambda s: f(s, T3, Y3, where=none_kept))(jnp.asarray(S3))) == 0)
    # One position, no leading axes: (K,) is the batch of one row (K,)[None].
    np.testing.assert_allclose(float(f(S3[0, 0], T3[0, 0], Y3[0, 0])),
                               float(f(S3[:1, 0], T3[:1, 0], Y3[:1, 0])), **TOL)


def test_dist_flattens_leading_axes_into_the_batch_and_only_means():
    s2, t2, keep = S3.reshape(-1, K), T3.reshape(-1, K), M3.reshape(-1)
    np.testing.assert_allclose(float(losses.dist(S3, T3, 1.0, 2.0, 4.0)),
                               float(losses.dist(s2, t2, 1.0, 2.0, 4.0)), **TOL)
    masked = jax.value_and_grad(lambda s: losses.dist(s, T3_PAD, 1.0, 2.0, 4.0, where=M3))
    value, g = masked(jnp.asarray(S3_PAD))
    np.testing.assert_allclose(float(value), float(losses.dist(s2[keep], t2[keep], 1.0, 2.0, 4.0)),
                               **TOL)
    g = np.asarray(g)
    assert np.all(np.isfinite(g)) and np.all(g[~M3] == 0.0)
    np.testing.assert_allclose(float(losses.dist(S3, T3, where=np.ones_like(M3))),
                               float(losses.dist(S3, T3)), **TOL)
    for red in ("sum", "none"):
        with pytest.raises(ValueError, match=f"dist: reduction must be 'mean' .*, got '{red}'"):
            losses.dist(S3, T3, reduction=red)


def test_logit_standardize_and_jit_with_leading_axes():
    np.testing.assert_allclose(np.asarray(losses.logit_standardize(S3)).reshape(-1, K),
                               np.asarray(losses.logit_standardize(S3.reshape(-1, K))), **TOL)
    fn = jax.jit(lambda s, t, m: losses.kd(s, t, where=m, reduction="none"))
    np.testing.assert_allclose(np.asarray(fn(S3_PAD, T3_PAD, M3)),
                               np.asarray(losses.kd(S3_PAD, T3_PAD, where=M3, reduction="none")),
                               **TOL)
