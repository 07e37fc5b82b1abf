"""kdjax.losses outside the kdjax trainer: (..., K) logits, padding masks and reductions.

A tiny sequence model (token embeddings -> 2-layer MLP -> per-token logits over the vocabulary)
is distilled from a fixed teacher in a plain optax loop, with ``losses.kd(..., where=mask)``;
then every logit loss is checked for leading-axes == flattened-batch equivalence and for its
reductions.
"""

import functools

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
    # the language-model divergences (kdjax.losses.sequence)
    "reverse_kl": lambda s, t, y, **kw: losses.reverse_kl(s, t, 2.0, **kw),
    "generalized_jsd": lambda s, t, y, **kw: losses.generalized_jsd(s, t, 0.3, 2.0, **kw),
    "skew_kl": lambda s, t, y, **kw: losses.skew_kl(s, t, 0.1, **kw),
    "skew_reverse_kl": lambda s, t, y, **kw: losses.skew_reverse_kl(s, t, 0.1, **kw),
    "taid": lambda s, t, y, **kw: losses.taid(s, t, 0.7, **kw),
    "ab_divergence": lambda s, t, y, **kw: losses.ab_divergence(s, t, 0.5, 0.7, 2.0, **kw),
    "topk_kd": lambda s, t, y, **kw: losses.topk_kd(s, *jax.lax.top_k(jnp.asarray(t), 3), 2.0, **kw),
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


# ---------------------------------------------------------------------------------------------
# The language-model divergences (kdjax.losses.sequence) against numpy statements of their
# reference code, on (B, T, V) logits with a padding mask (the references' labels != -100).

V3 = 7
rng3 = np.random.default_rng(11)
S_LM = (2.0 * rng3.standard_normal((3, 4, V3))).astype(np.float32)
T_LM = (3.0 * rng3.standard_normal((3, 4, V3))).astype(np.float32)
M_LM = np.array([[1, 1, 1, 0], [1, 0, 1, 1], [1, 1, 0, 0]], bool)
LABELS_LM = np.where(M_LM, 1, -100)  # the references' padding convention


def _np_lsm(z, T=1.0):
    return np_log_softmax(np.asarray(z, np.float64) / T)


def _masked_mean(x, labels=LABELS_LM):
    """The references' sum(x * mask) / sum(mask) with mask = labels != -100."""
    mask = (labels != -100).astype(np.float64)
    return float((x * mask).sum() / mask.sum())


def np_distillm_reverse_kl(s, t):  # distillm/losses.py reverse_kl (no temperature)
    q, lq, lp = np.exp(_np_lsm(s)), _np_lsm(s), _np_lsm(t)
    return -_masked_mean((q * lp).sum(-1) - (q * lq).sum(-1))


def np_distillm_skewed_forward_kl(s, t, lam):  # returns the cross-entropy -sum p log m
    p, q = np.exp(_np_lsm(t)), np.exp(_np_lsm(s))
    m = lam * p + (1 - lam) * q
    return -_masked_mean((p * np.log(m)).sum(-1))


def np_distillm_skewed_reverse_kl(s, t, lam):
    p, q = np.exp(_np_lsm(t)), np.exp(_np_lsm(s))
    m = (1 - lam) * p + lam * q
    return -_masked_mean((q * np.log(m)).sum(-1) - (q * np.log(q)).sum(-1))


def np_trl_generalized_jsd(s, t, beta, temperature):  # GKDTrainer.generalized_jsd_loss
    ls, lt = _np_lsm(s, temperature), _np_lsm(t, temperature)
    kl_div = lambda inp, target: np.exp(target) * (target - inp)  # F.kl_div(..., log_target=True)  # noqa: E731
    if beta == 0:
        jsd = kl_div(ls, lt)
    elif beta == 1:
        jsd = kl_div(lt, ls)
    else:
        mix = np.logaddexp(ls + np.log1p(-beta), lt + np.log(beta))
        jsd = beta * kl_div(mix, lt) + (1 - beta) * kl_div(mix, ls)
    mask = LABELS_LM != -100
    return float(jsd[mask].sum() / mask.sum())  # 'batchmean' with labels


def np_taid_forward_kl(s, t, tt):  # TAID.compute_loss -> fkl.forward_kl(teacher_probs=p_t): a CE
    p_t = np.exp(_np_lsm((1 - tt) * s + tt * t))
    return -_masked_mean((p_t * _np_lsm(s)).sum(-1)), p_t


def np_abkl(s, t, alpha, beta, T):  # abkd standard_classification/distiller_zoo/abkl.py ABKL.forward
    p, q = np.exp(_np_lsm(t, T)), np.exp(_np_lsm(s, T))
    if alpha == 0 and beta == 0:
        div = 0.5 * ((np.log(q) - np.log(p)) ** 2).sum(-1)
    elif alpha == 0:
        qb, pb = q**beta, p**beta
        div = (1 / beta) * (qb * np.log(qb / pb) - qb + pb).sum(-1)
    elif beta == 0:
        pa, qa = p**alpha, q**alpha
        div = (1 / alpha) * (pa * np.log(pa / qa) - pa + qa).sum(-1)
    elif alpha + beta == 0:
        pa, qa = p**alpha, q**alpha
        div = ((1 / alpha) * (np.log(qa / pa) + 1 / (qa / pa) - 1)).sum(-1)
    else:
        first = p**alpha * q**beta
        second = alpha / (alpha + beta) * p ** (alpha + beta)
        third = beta / (alpha + beta) * q ** (alpha + beta)
        div = -(first - second - third).sum(-1) / (alpha * beta)
    return _masked_mean(div)  # divergence.mean() over the unmasked positions


def _np_log1mexp(x):
    return np.where(x > -1, np.log(-np.expm1(x)), np.log1p(-np.exp(x)))


def np_distillkit_sparse_kl(s, ids, values, T, missing):
    """DistillKit KLDLoss on a SparseSignal: get_logprobs (student log_softmax(s / T) gathered at
    the ids; target logits renormalised over k at T ('zero'), or target log-probs with the rest
    as a k+1-th outcome, SYMMETRIC_UNIFORM), sparse_kl_div_inner, then * T^2 / mask.sum()."""
    eps = 1e-6
    lq = np.take_along_axis(_np_lsm(s, T), ids, -1)
    v = np.asarray(values, np.float64)
    if missing == "zero":
        lp = v / T - np.log(np.exp(v / T).sum(-1, keepdims=True))
    else:
        a = 1.0 / T
        leftover = np.clip(1.0 - np.exp(v).sum(-1, keepdims=True), 0, 1)
        lp = a * v - np.log(np.exp(a * v).sum(-1, keepdims=True) + leftover**a)
    inner = (np.exp(lp) * (lp - lq)).sum(-1)
    mask = (LABELS_LM != -100).astype(np.float64)
    inner = inner * mask
    if missing == "bucket":
        log_tm = _np_log1mexp(np.minimum(np.log(np.exp(lp).sum(-1)), -eps))
        log_sm = _np_log1mexp(np.minimum(np.log(np.exp(lq).sum(-1)), -eps))
        tm = np.exp(log_tm)
        inner = inner + np.where(tm > eps, tm * (log_tm - log_sm), 0.0) * mask
    return float(inner.sum() * T**2 / mask.sum())


def _topk(t, k, logprobs=False):
    z = np.asarray(_np_lsm(t) if logprobs else t, np.float64)
    ids = np.argsort(-z, axis=-1)[..., :k].astype(np.int32)
    return np.take_along_axis(z, ids, -1).astype(np.float32), ids


def _entropy_mean(logp):
    return _masked_mean(-(np.exp(logp) * logp).sum(-1))


def test_lm_divergences_match_their_reference_code_with_masks_and_reductions():
    s, t, m = S_LM, T_LM, M_LM
    n = int(m.sum())
    # NaN / inf garbage at padding must not matter
    s_pad = np.where(m[..., None], s, np.nan).astype(np.float32)
    t_pad = np.where(m[..., None], t, np.inf).astype(np.float32)
    ids_z, vals_z = _topk(t, 3)[1], _topk(t, 3)[0]
    vals_b, ids_b = _topk(t, 3, logprobs=True)
    cases = {
        # name: (kdjax call on (student, teacher, **kw), the reference's value)
        "reverse_kl": (lambda a, b, **kw: losses.reverse_kl(a, b, **kw), np_distillm_reverse_kl(s, t)),
        "reverse_kl_T2": (lambda a, b, **kw: losses.reverse_kl(a, b, 2.0, **kw),
                          4.0 * np_distillm_reverse_kl(s / 2.0, t / 2.0)),
        "skew_kl": (lambda a, b, **kw: losses.skew_kl(a, b, 0.1, **kw),
                    np_distillm_skewed_forward_kl(s, t, 0.1) - _entropy_mean(_np_lsm(t))),
        "skew_reverse_kl": (lambda a, b, **kw: losses.skew_reverse_kl(a, b, 0.1, **kw),
                            np_distillm_skewed_reverse_kl(s, t, 0.1)),
        "taid": (lambda a, b, **kw: losses.taid(a, b, 0.6, **kw),
                 np_taid_forward_kl(s, t, 0.6)[0] - _entropy_mean(np.log(np_taid_forward_kl(s, t, 0.6)[1]))),
        "topk_kd_zero": (lambda a, b, **kw: losses.topk_kd(a, np.where(m[..., None], vals_z, np.nan), ids_z, 2.0, **kw),
                         np_distillkit_sparse_kl(s, ids_z, vals_z, 2.0, "zero")),
        "topk_kd_bucket": (lambda a, b, **kw: losses.topk_kd(a, vals_b, ids_b, 2.0, remainder="bucket", **kw),
                           np_distillkit_sparse_kl(s, ids_b, vals_b, 2.0, "bucket")),
    }
    for beta in (0.0, 0.3, 0.5, 1.0):
        cases[f"generalized_jsd_{beta}"] = (
            functools.partial(lambda a, b, beta, **kw: losses.generalized_jsd(a, b, beta, 1.5, **kw), beta=beta),
            np_trl_generalized_jsd(s, t, beta, 1.5))
    for ab in ((0.5, 0.7), (0.0, 0.8), (0.6, 0.0), (0.5, -0.5), (0.0, 0.0), (1.2, -0.3)):
        cases[f"ab_divergence_{ab}"] = (
            functools.partial(lambda a, b, ab, **kw: losses.ab_divergence(a, b, *ab, 2.0, **kw), ab=ab),
            np_abkl(s, t, *ab, 2.0))

    @jax.jit
    def run(s_pad, t_pad):
        return {name: (f(s_pad, t_pad, where=m), f(s_pad, t_pad, where=m, reduction="sum"),
                       f(s_pad, t_pad, where=m, reduction="none")) for name, (f, _) in cases.items()}

    got = run(s_pad, t_pad)
    for name, (_, want) in cases.items():
        mean, total, per = (np.asarray(x) for x in got[name])
        np.testing.assert_allclose(mean, want, rtol=2e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(total, n * want, rtol=2e-5, atol=1e-5, err_msg=name)
        assert per.shape == m.shape and np.all(per[~m] == 0.0), name
        np.testing.assert_allclose(per.sum(), total, rtol=1e-5, atol=1e-6, err_msg=name)


def test_lm_divergences_special_cases():
    s, t = S_LM.reshape(-1, V3), T_LM.reshape(-1, V3)

    @jax.jit
    def run(s, t):
        return {
            "fkl": losses.kd(s, t, 2.0) / 4.0, "rkl": losses.reverse_kl(s, t, 2.0) / 4.0,
            "ab_1_0": losses.ab_divergence(s, t, 1.0, 0.0, 2.0), "ab_0_1": losses.ab_divergence(s, t, 0.0, 1.0, 2.0),
            "jsd_0": losses.generalized_jsd(s, t, 0.0, 2.0), "jsd_1": losses.generalized_jsd(s, t, 1.0, 2.0),
            "skew_0": losses.skew_kl(s, t, 0.0), "rskew_0": losses.skew_reverse_kl(s, t, 0.0),
            "fkl1": losses.kd(s, t, 1.0), "rkl1": losses.reverse_kl(s, t),
            "taid_1": losses.taid(s, t, 1.0), "taid_0": losses.taid(s, t, 0.0),
            "topk_all": losses.topk_kd(s, t, jnp.broadcast_to(jnp.arange(V3), s.shape), 2.0) / 4.0,
            "self": losses.generalized_jsd(t, t, 0.4) + losses.skew_kl(t, t) + losses.ab_divergence(t, t, 0.5, 0.7),
        }

    v = jax.device_get(run(s, t))
    # ABKD: (alpha, beta) = (1, 0) is the forward KL, (0, 1) the reverse KL
    np.testing.assert_allclose(v["ab_1_0"], v["fkl"], rtol=1e-5)
    np.testing.assert_allclose(v["ab_0_1"], v["rkl"], rtol=1e-5)
    # TRL's endpoints: beta 0 forward, beta 1 reverse
    np.testing.assert_allclose(v["jsd_0"], v["fkl"], rtol=1e-5)
    np.testing.assert_allclose(v["jsd_1"], v["rkl"], rtol=1e-5)
    np.testing.assert_allclose(v["skew_0"], v["fkl1"], rtol=1e-5)
    np.testing.assert_allclose(v["rskew_0"], v["rkl1"], rtol=1e-5)
    np.testing.assert_allclose(v["taid_1"], v["fkl1"], rtol=1e-5)
    assert abs(float(v["taid_0"])) < 1e-6
    np.testing.assert_allclose(v["topk_all"], v["fkl"], rtol=1e-5)  # k = V: kd
    assert abs(float(v["self"])) < 1e-5
    # TAID's target carries no gradient to the student: d/ds equals the KL's with p_t constant
    g = jax.grad(lambda a: losses.taid(a, t, 0.5))(s)
    p_t = jax.nn.softmax(0.5 * s + 0.5 * t)
    np.testing.assert_allclose(g, (jax.nn.softmax(s) - p_t) / s.shape[0], rtol=1e-4, atol=1e-7)


def np_taid_update_t(state, loss, step, num_steps, t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99,
                     disable_adaptive=False):
    """SakanaAI/TAID TAID.update_t, as written there (a dict for its three buffers)."""
    st = dict(state)
    if np.isinf(st["prev_loss"]):
        st["prev_loss"] = loss
        return st
    relative_change = (st["prev_loss"] - loss) / (st["prev_loss"] + 1e-15)
    st["momentum"] = beta * st["momentum"] + (1 - beta) * relative_change
    adaptive_delta = 1 / (1 + np.exp(-st["momentum"]))
    progress = step / num_steps
    t_target = t_start + (t_end - t_start) * progress
    delta_t = alpha * adaptive_delta * (1 - st["t"])
    st["t"] = min(t_end, max(t_target, st["t"] + delta_t)) if not disable_adaptive else t_target
    st["prev_loss"] = loss
    return st


def test_taid_update_follows_the_reference_schedule():
    loss_curve = [2.0, 1.5, 1.4, 1.45, 0.9, 0.85, 0.3, 0.29]
    for adaptive, kw in ((True, {}), (True, {"alpha": 0.2, "beta": 0.5}), (False, {})):
        update = jax.jit(functools.partial(losses.taid_update, adaptive=adaptive, **kw))
        state, ref = losses.taid_init(), {"t": 0.4, "prev_loss": np.inf, "momentum": 0.0}
        for step, loss in enumerate(loss_curve):
            state = update(state, loss, step, 10)
            ref = np_taid_update_t(ref, loss, step, 10, disable_adaptive=not adaptive, **kw)
            for k in ref:
                np.testing.assert_allclose(float(state[k]), ref[k], rtol=1e-6, err_msg=(adaptive, kw, step, k))
    assert float(state["t"]) == pytest.approx(0.4 + 0.6 * 7 / 10)  # linear: step / num_steps


@pytest.mark.parametrize("call, message", [
    (lambda: losses.generalized_jsd(S_LM, T_LM, beta=1.5), r"^generalized_jsd: beta must be in \[0, 1\], got 1.5$"),
    (lambda: losses.skew_kl(S_LM, T_LM, alpha=-0.1), r"^skew_kl: alpha must be in \[0, 1\], got -0.1$"),
    (lambda: losses.skew_reverse_kl(S_LM, T_LM, alpha=2), r"^skew_reverse_kl: alpha must be in \[0, 1\], got 2.0$"),
    (lambda: losses.taid(S_LM, T_LM, 1.2), r"^taid: t must be in \[0, 1\], got 1.2$"),
    (lambda: losses.taid_update(losses.taid_init(), 1.0, 0, 10, t_start=0.9, t_end=0.5),
     r"^taid_update: t_start must be < t_end, got 0.9 and 0.5$"),
    (lambda: losses.ab_divergence(S_LM, T_LM, float("nan"), 1.0), r"^ab_divergence: alpha and beta must be finite"),
    (lambda: losses.reverse_kl(S_LM, T_LM, where=M_LM[:, :3]),
     r"^reverse_kl: where must have shape \(3, 4\) \(the leading axes of student_logits \(3, 4, 7\)\), got \(3, 3\)$"),
    (lambda: losses.topk_kd(S_LM, *_topk(T_LM, 3)[:1], _topk(T_LM, 3)[1] + 5),
     r"^topk_kd: teacher_indices must be vocabulary ids in \[0, 7\), got ids from 5 to 11$"),
    (lambda: losses.topk_kd(S_LM, np.zeros((3, 4, 9), np.float32), np.zeros((3, 4, 9), np.int32)),
     r"^topk_kd: teacher_values must have shape \(3, 4\) \+ \(k,\) with 1 <= k <= 7"),
    (lambda: losses.topk_kd(S_LM, *_topk(T_LM, 3), remainder="uniform"),
     r"^topk_kd: remainder must be 'zero' or 'bucket', got 'uniform'$"),
    (lambda: losses.generalized_jsd(S_LM, T_LM[..., :5]), r"^generalized_jsd: student_logits and teacher_logits"),
])
def test_lm_divergences_refuse_bad_input_in_one_line(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_topk_kd_out_of_range_ids_inside_jit_give_nan_not_a_wrong_value():
    vals, ids = _topk(T_LM, 3)
    got = jax.jit(losses.topk_kd)(S_LM, vals, ids + V3)
    assert np.isnan(float(got))
