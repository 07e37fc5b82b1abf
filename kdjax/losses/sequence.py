"""The divergences of language-model distillation: reverse KL, GKD's generalized JSD, DistiLLM's
skewed KLs, TAID's interpolated target (with its schedule as a pure state update), the alpha-beta
divergence of ABKD, and KD from a teacher stored as its top-k logits.

Each is a pure function of ``(..., V)`` student and teacher logits (``(B, T, V)`` for a language
model, ``(B, K)`` for a classifier), with the padding mask ``where`` and the ``reduction`` of
every logit loss ("Padding and reduction" in `kdjax.losses.logit`): 'mean' over the unmasked
positions (per-token values averaged over the real tokens, as TRL's ``batchmean`` and DistiLLM's
``sum(x * mask) / sum(mask)``), 'sum', or 'none'. Per position, each sums over the vocabulary.
With p = softmax(teacher / T) and q = softmax(student / T) (T = 1 where the method has no
temperature):

* `reverse_kl`       T^2 KL(q || p)                             (MiniLLM's token-level objective)
* `generalized_jsd`  beta KL(p || M) + (1 - beta) KL(q || M), M = beta p + (1 - beta) q  (GKD)
* `skew_kl`          KL(p || alpha p + (1 - alpha) q)           (DistiLLM SKL)
* `skew_reverse_kl`  KL(q || alpha q + (1 - alpha) p)           (DistiLLM SRKL)
* `taid`             KL(p_t || q), p_t = softmax((1 - t) stopgrad(s) + t z_teacher)  (TAID);
  `taid_init` / `taid_update`: its adaptive schedule of t as a pure update of a small state
* `ab_divergence`    the alpha-beta divergence D_AB(p || q)      (ABKD)
* `topk_kd`          T^2 KL(p_topk || q) with the teacher given as (values, indices) of its top k

Hyper-parameters out of their range, indices outside the vocabulary (when they are concrete) and
masks of the wrong shape raise a one-line ValueError at trace time. Teacher inputs are not
stop-gradiented (see `kdjax.losses`), except where the method itself stops a gradient (TAID's
student logits inside the target).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.losses._common import _check_logits, _masked, _reduce


def _lsm(z, temperature=1.0):
    return jax.nn.log_softmax(z / temperature, axis=-1)


def _kl(log_a, log_b):
    """Per-position KL(a || b) from log-probabilities, summed over the last axis (as
    optax.losses.kl_divergence_with_log_targets)."""
    return jnp.sum(jnp.exp(log_a) * (log_a - log_b), axis=-1)


def _unit(fn: str, name: str, value, *, closed_high: bool = True) -> float:
    """A Python number in [0, 1] (or [0, 1)), else one line."""
    try:
        value = float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise ValueError(f"{fn}: {name} must be a Python number in [0, 1], got {value!r}") from None
    ok = 0.0 <= value <= 1.0 if closed_high else 0.0 <= value < 1.0
    if not ok or math.isnan(value):
        raise ValueError(f"{fn}: {name} must be in [0, 1{']' if closed_high else ')'}, got {value}")
    return value


def _positive(fn: str, name: str, value):
    if isinstance(value, (int, float)) and not value > 0:
        raise ValueError(f"{fn}: {name} must be > 0, got {value}")
    return value


def _pair(fn, student_logits, teacher_logits, where, reduction):
    where, _ = _check_logits(fn, {"student_logits": student_logits, "teacher_logits": teacher_logits},
                             where=where, reduction=reduction)
    return _masked(student_logits, where), _masked(teacher_logits, where), where


def reverse_kl(student_logits, teacher_logits, temperature: float = 1.0, *, where=None,
               reduction: str = "mean") -> jax.Array:
    """Reverse KL: the student's distribution against the teacher's, T^2-scaled.

    loss = T^2 * mean_positions KL( q || p ) = T^2 * mean sum_v q_v (log q_v - log p_v),
    q = softmax(s / T), p = softmax(t / T).

    Mode-seeking: the student is penalised for mass where the teacher has little, not for missing
    some of the teacher's modes. Scaling: the T^2 factor of `kd` (Hinton et al.), so that the
    gradient's magnitude does not shrink as 1/T^2 when T changes and `reverse_kl` and `kd` weights
    are comparable at any T; at the default T = 1 it is the plain reverse KL of the references.
    Paper: Gu, Dong, Wei, Huang, "MiniLLM: Knowledge Distillation of Large Language Models", ICLR
    2024 (microsoft/LMOps ``minillm``: its full method optimises the sequence-level reverse KL by
    policy gradient, which is a training procedure, not this token-level loss). Reproduces the
    token-level ``reverse_kl`` of jongwooko/distillm (distillm/losses.py @17c0f98), which has no
    temperature: the per-token sum_v q (log p - log q), negated, averaged over the tokens whose
    label is not -100 (``where`` here).

    Args:
      student_logits, teacher_logits: (..., V), the same shape.
      temperature: T > 0, applied to both.
      where, reduction: the padding mask and the reduction ("Padding and reduction" in
        `kdjax.losses.logit`).
    """
    _positive("reverse_kl", "temperature", temperature)
    s, t, where = _pair("reverse_kl", student_logits, teacher_logits, where, reduction)
    return _reduce(_kl(_lsm(s, temperature), _lsm(t, temperature)), where, reduction) * temperature**2


def generalized_jsd(student_logits, teacher_logits, beta: float = 0.5, temperature: float = 1.0, *,
                    where=None, reduction: str = "mean") -> jax.Array:
    """GKD's generalized (beta-skewed) Jensen-Shannon divergence.

    With p = softmax(t / T) (teacher), q = softmax(s / T) (student) and M = beta p + (1 - beta) q:
      0 < beta < 1:  loss = beta KL(p || M) + (1 - beta) KL(q || M)
      beta = 0:      loss = KL(p || q)   (forward KL)
      beta = 1:      loss = KL(q || p)   (reverse KL)
    averaged over positions; no T^2 factor. The endpoints are those of TRL: the formula itself goes
    to 0 at both (M equals one of the two), so TRL uses the limits of JSD_beta / (beta (1 - beta))
    up to the factor, the forward and the reverse KL; beta = 0.5 is the ordinary JSD.

    Paper: Agarwal, Vieillard, Zhou, Stanczyk, Ramos Garea, Geist, Bachem, "On-Policy
    Distillation of Language Models: Learning from Self-Generated Mistakes", ICLR 2024 (Eq. 1).
    Reproduces TRL's ``GKDTrainer.generalized_jsd_loss`` (trl/trainer/gkd_trainer.py, the version
    with the beta = 0 / 1 branches and the logsumexp mixture; read in a fork of trl's file, the
    early huggingface/trl @03a860c version had neither): temperature on both logits,
    ``kl_div(log M, log p) * beta + kl_div(log M, log q) * (1 - beta)``, 'batchmean' over the
    tokens whose label is not -100 (``where`` and 'mean' here). The on-policy part of GKD (a
    fraction of sequences sampled from the student) is the training loop's, not this loss's.

    Args:
      student_logits, teacher_logits: (..., V), the same shape.
      beta: the skew, a Python number in [0, 1] (TRL's default 0.5).
      temperature: T > 0, applied to both.
      where, reduction: the padding mask and the reduction ("Padding and reduction" in
        `kdjax.losses.logit`).
    """
    beta = _unit("generalized_jsd", "beta", beta)
    _positive("generalized_jsd", "temperature", temperature)
    s, t, where = _pair("generalized_jsd", student_logits, teacher_logits, where, reduction)
    lq, lp = _lsm(s, temperature), _lsm(t, temperature)
    if beta == 0.0:
        per = _kl(lp, lq)
    elif beta == 1.0:
        per = _kl(lq, lp)
    else:
        lm = jnp.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
        per = beta * _kl(lp, lm) + (1.0 - beta) * _kl(lq, lm)
    return _reduce(per, where, reduction)


def _skew_log_mixture(log_own, log_other, alpha):
    """log(alpha * own + (1 - alpha) * other), stable; alpha in [0, 1]."""
    if alpha == 0.0:
        return log_other
    if alpha == 1.0:
        return log_own
    return jnp.logaddexp(log_own + math.log(alpha), log_other + math.log1p(-alpha))


def skew_kl(student_logits, teacher_logits, alpha: float = 0.1, *, where=None,
            reduction: str = "mean") -> jax.Array:
    """DistiLLM's skew KL: the teacher against a mixture that is mostly the student.

    loss = mean_positions KL( p || alpha p + (1 - alpha) q ),  p = softmax(t), q = softmax(s);
    alpha = 0 is the forward KL(p || q); alpha = 1 gives 0. The mixture keeps the log-ratio
    bounded (log(1 / alpha)) where the student has no mass, so the gradient does not explode.

    Paper: Ko, Kim, Chen, Yun, "DistiLLM: Towards Streamlined Distillation for Large Language
    Models", ICML 2024. Reproduces jongwooko/distillm ``skewed_forward_kl`` (distillm/losses.py
    @17c0f98; lam = alpha, its default 0.1) up to a constant: the reference returns the
    cross-entropy -sum_v p_v log m_v, which is this KL plus the teacher's entropy sum_v p_v log p_v
    (constant for the student: the same gradients); kdjax returns the divergence, 0 when the
    student equals the teacher. No temperature (the reference has none).

    Args:
      student_logits, teacher_logits: (..., V), the same shape.
      alpha: the skew, a Python number in [0, 1].
      where, reduction: the padding mask and the reduction ("Padding and reduction" in
        `kdjax.losses.logit`).
    """
    alpha = _unit("skew_kl", "alpha", alpha)
    s, t, where = _pair("skew_kl", student_logits, teacher_logits, where, reduction)
    lq, lp = _lsm(s), _lsm(t)
    return _reduce(_kl(lp, _skew_log_mixture(lp, lq, alpha)), where, reduction)


def skew_reverse_kl(student_logits, teacher_logits, alpha: float = 0.1, *, where=None,
                    reduction: str = "mean") -> jax.Array:
    """DistiLLM's skew reverse KL: the student against a mixture that is mostly the teacher.

    loss = mean_positions KL( q || alpha q + (1 - alpha) p ),  p = softmax(t), q = softmax(s);
    alpha = 0 is the reverse KL(q || p); alpha = 1 gives 0.

    Paper: Ko, Kim, Chen, Yun, "DistiLLM: Towards Streamlined Distillation for Large Language
    Models", ICML 2024. Reproduces jongwooko/distillm ``skewed_reverse_kl`` (distillm/losses.py
    @17c0f98: mixed = (1 - lam) teacher + lam student, sum_v q (log m - log q), negated, mean
    over the tokens whose label is not -100; lam = alpha, default 0.1). No temperature.

    Args:
      student_logits, teacher_logits: (..., V), the same shape.
      alpha: the skew, a Python number in [0, 1].
      where, reduction: the padding mask and the reduction ("Padding and reduction" in
        `kdjax.losses.logit`).
    """
    alpha = _unit("skew_reverse_kl", "alpha", alpha)
    s, t, where = _pair("skew_reverse_kl", student_logits, teacher_logits, where, reduction)
    lq, lp = _lsm(s), _lsm(t)
    return _reduce(_kl(lq, _skew_log_mixture(lq, lp, alpha)), where, reduction)


def taid(student_logits, teacher_logits, t, *, where=None, reduction: str = "mean") -> jax.Array:
    """TAID: KL from an interpolated target that moves from the student to the teacher.

    p_t  = softmax( (1 - t) * stopgrad(s) + t * z_teacher )    (logit interpolation)
    loss = mean_positions KL( p_t || softmax(s) )
    t in [0, 1] rises during training (`taid_update`); t = 1 is the forward KL (`kd` at T = 1 up to
    its T^2 = 1), t = 0 gives 0. The student's logits inside the target carry no gradient.

    Paper: Shing, Misaki, Bao, Yokoi, Akiba, "TAID: Temporally Adaptive Interpolated Distillation
    for Efficient Knowledge Transfer in Language Models", ICLR 2025. Reproduces SakanaAI/TAID
    ``TAID.compute_loss`` (src/distil_losses/taid.py @a062892: ``(1 - t) * logits.detach() + t *
    teacher_logits``, softmax, then ``forward_kl`` of src/distil_losses/fkl.py, mean over the
    masked tokens) up to a constant: that ``forward_kl`` returns the cross-entropy -sum p_t log q,
    i.e. this KL plus the entropy of p_t, which carries no gradient (p_t is constant for the
    student); kdjax returns the divergence. No temperature (the reference has none).

    Args:
      student_logits, teacher_logits: (..., V), the same shape.
      t: the interpolation, a scalar in [0, 1] (may be traced: the schedule's state).
      where, reduction: the padding mask and the reduction ("Padding and reduction" in
        `kdjax.losses.logit`).
    """
    if isinstance(t, (int, float)):
        _unit("taid", "t", t)
    elif np.ndim(t) != 0:
        raise ValueError(f"taid: t must be a scalar in [0, 1], got shape {np.shape(t)}")
    s, z, where = _pair("taid", student_logits, teacher_logits, where, reduction)
    t = jnp.asarray(t, jnp.float32)
    target = _lsm((1.0 - t) * jax.lax.stop_gradient(s) + t * z)
    return _reduce(_kl(target, _lsm(s)), where, reduction)


def taid_init(t_start: float = 0.4) -> dict[str, jax.Array]:
    """TAID's schedule state before the first step: {'t': t_start, 'prev_loss': inf,
    'momentum': 0} (float32 scalars), as the reference's buffers (SakanaAI/TAID ``TAID.__init__``)."""
    t_start = _unit("taid_init", "t_start", t_start, closed_high=False)
    return {"t": jnp.asarray(t_start, jnp.float32), "prev_loss": jnp.asarray(jnp.inf, jnp.float32),
            "momentum": jnp.zeros((), jnp.float32)}


def taid_update(state, loss, step, num_steps, *, t_start: float = 0.4, t_end: float = 1.0,
                alpha: float = 5e-4, beta: float = 0.99, adaptive: bool = True) -> dict[str, jax.Array]:
    """TAID's adaptive schedule of t, one step: a pure function of the state (`taid_init`).

    On the first call (prev_loss = inf) only prev_loss is set. Afterwards, with the loss of this
    step L (the value `taid` returned at the current t) and progress = step / num_steps:
      r        = (prev_loss - L) / (prev_loss + 1e-15)            (relative improvement)
      momentum = beta * momentum + (1 - beta) * r
      t_lin    = t_start + (t_end - t_start) * progress            (the linear floor)
      t        = min(t_end, max(t_lin, t + alpha * sigmoid(momentum) * (1 - t)))   (adaptive)
               = t_lin                                              (adaptive=False)
      prev_loss = L
    so t never decreases below the linear schedule and rises faster while the loss improves.
    Reproduces SakanaAI/TAID ``TAID.update_t`` (src/distil_losses/taid.py @a062892; step = the
    Lightning global_step, num_steps = estimated_stepping_batches; defaults t_start 0.4, t_end 1,
    alpha 5e-4, beta 0.99 as scripts/*/taid.sh). The reference feeds its own loss value, the
    cross-entropy (`taid` plus the entropy of p_t): pass that to reproduce its schedule exactly
    (its relative changes differ from those of the KL); kdjax's method passes `taid`'s value.

    Args:
      state: {'t', 'prev_loss', 'momentum'} float32 scalars.
      loss: () this step's loss (gradient stopped here).
      step, num_steps: the step count (0-based, before this update) and the schedule's length.
      t_start, t_end, alpha, beta: as the reference (0 <= t_start < t_end <= 1, alpha, beta in [0, 1]).
      adaptive: False for the linear schedule alone (the reference's ``disable_adaptive``).
    Returns the new state.
    """
    t_start = _unit("taid_update", "t_start", t_start, closed_high=False)
    t_end = _unit("taid_update", "t_end", t_end)
    if not t_start < t_end:
        raise ValueError(f"taid_update: t_start must be < t_end, got {t_start} and {t_end}")
    alpha, beta = _unit("taid_update", "alpha", alpha), _unit("taid_update", "beta", beta)
    loss = jax.lax.stop_gradient(jnp.asarray(loss, jnp.float32))
    t, prev, momentum = (jnp.asarray(state[k], jnp.float32) for k in ("t", "prev_loss", "momentum"))
    first = jnp.isinf(prev)
    rel = (prev - loss) / (prev + 1e-15)
    new_m = beta * momentum + (1.0 - beta) * rel
    progress = jnp.asarray(step, jnp.float32) / jnp.maximum(jnp.asarray(num_steps, jnp.float32), 1.0)
    t_lin = t_start + (t_end - t_start) * progress
    if adaptive:
        new_t = jnp.minimum(t_end, jnp.maximum(t_lin, t + alpha * jax.nn.sigmoid(new_m) * (1.0 - t)))
    else:
        new_t = t_lin
    return {"t": jnp.where(first, t, new_t), "prev_loss": loss,
            "momentum": jnp.where(first, momentum, new_m)}


def ab_divergence(student_logits, teacher_logits, alpha: float = 1.0, beta: float = 0.0,
                  temperature: float = 1.0, *, where=None, reduction: str = "mean") -> jax.Array:
    """The alpha-beta divergence D_AB(p || q) of ABKD, p = softmax(t / T) (teacher), q =
    softmax(s / T) (student), summed over the vocabulary, averaged over positions:

      alpha, beta != 0, alpha + beta != 0:
          -1/(alpha beta) sum_v ( p^a q^b - a/(a+b) p^(a+b) - b/(a+b) q^(a+b) )
      alpha = 0, beta != 0:   1/beta  sum_v ( q^b log(q^b / p^b) - q^b + p^b )
      beta = 0, alpha != 0:   1/alpha sum_v ( p^a log(p^a / q^a) - p^a + q^a )
      alpha = -beta != 0:     1/alpha sum_v ( log(q^a / p^a) + (q^a / p^a)^-1 - 1 )
      alpha = beta = 0:       1/2 sum_v ( log q - log p )^2
    (a = alpha, b = beta). Special cases: (alpha, beta) = (1, 0) is the forward KL(p || q) (`kd`
    at T, without its T^2), (0, 1) the reverse KL(q || p) (`reverse_kl`); alpha + beta = 1 gives
    the alpha-divergences. The powers are taken in log space (exp(alpha log p)).

    Paper: Wang, Chen, Shen, Zhang, Wang, Zhang, "ABKD: Pursuing a Proper Allocation of the
    Probability Mass in Knowledge Distillation via alpha-beta-Divergence", ICML 2025. Reproduces
    ghwang-s/abkd ``ABKL.forward`` (standard_classification/distiller_zoo/abkl.py @a0fb144): the
    same five branches, in that order, and ``divergence.mean()`` over the batch (no T^2 factor; its
    entropy outputs are diagnostics, not returned here).

    Args:
      student_logits, teacher_logits: (..., V), the same shape.
      alpha, beta: the divergence's parameters, finite Python numbers (any real values).
      temperature: T > 0 (the reference's kd_T), applied to both.
      where, reduction: the padding mask and the reduction ("Padding and reduction" in
        `kdjax.losses.logit`).
    """
    try:
        alpha, beta = float(alpha), float(beta)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise ValueError(f"ab_divergence: alpha and beta must be Python numbers, got {alpha!r}, {beta!r}") from None
    if not (math.isfinite(alpha) and math.isfinite(beta)):
        raise ValueError(f"ab_divergence: alpha and beta must be finite, got {alpha} and {beta}")
    _positive("ab_divergence", "temperature", temperature)
    s, t, where = _pair("ab_divergence", student_logits, teacher_logits, where, reduction)
    lq, lp = _lsm(s, temperature), _lsm(t, temperature)
    a, b = alpha, beta
    if a == 0 and b == 0:
        per = 0.5 * jnp.sum((lq - lp) ** 2, axis=-1)
    elif a == 0:
        qb, pb = jnp.exp(b * lq), jnp.exp(b * lp)
        per = jnp.sum(qb * b * (lq - lp) - qb + pb, axis=-1) / b
    elif b == 0:
        pa, qa = jnp.exp(a * lp), jnp.exp(a * lq)
        per = jnp.sum(pa * a * (lp - lq) - pa + qa, axis=-1) / a
    elif a + b == 0:
        log_ratio = a * (lq - lp)  # log(q^a / p^a)
        per = jnp.sum(log_ratio + jnp.exp(-log_ratio) - 1.0, axis=-1) / a
    else:
        cross = jnp.exp(a * lp + b * lq)
        per = -jnp.sum(cross - a / (a + b) * jnp.exp((a + b) * lp) - b / (a + b) * jnp.exp((a + b) * lq),
                       axis=-1) / (a * b)
    return _reduce(per, where, reduction)


_REMAINDERS = ("zero", "bucket")


def topk_kd(student_logits, teacher_values, teacher_indices, temperature: float = 1.0, *,
            remainder: str = "zero", where=None, reduction: str = "mean") -> jax.Array:
    """KD from a teacher stored only as its top-k entries (values, vocabulary indices), as
    offline LLM-distillation pipelines store it; T^2-scaled.

    With q = softmax(s / T) over the full vocabulary (V) gathered at the k stored ids, and the
    teacher's distribution over those ids:
      remainder 'zero':   p_j = softmax_j(v / T) over the k stored values (the mass outside the
                          top k is taken as 0, so p is renormalised over the k ids);
                          loss = T^2 sum_j p_j (log p_j - log q_j)
      remainder 'bucket': the values are the teacher's log-probabilities (log-softmax over the
                          full vocabulary at T = 1); the mass outside the top k, 1 - sum_j e^v_j,
                          is one more outcome for both models: p over k + 1 outcomes
                          proportional to (e^(v_j / T), (1 - sum_j e^v_j)^(1 / T)), q's extra
                          outcome 1 - sum_j q_j; loss = T^2 [sum_j p_j log(p_j / q_j)
                          + p_rest log(p_rest / q_rest)] (the rest term where p_rest > 1e-6)
    averaged over positions. Note that the student is not renormalised: its mass outside the k
    ids is not penalised under 'zero' (only its log-probabilities at the teacher's ids count).

    Reference: arcee-ai/DistillKit ``sparse_kl_div`` (distillkit/lossfuncs/kl.py @361c7ac and
    ``get_logprobs`` / ``get_target_logprobs`` in lossfuncs/common.py @a61c2e7): 'zero' is its
    MissingProbabilityHandling.ZERO (for logits or log-probs alike: both renormalise over the top
    k), 'bucket' its SYMMETRIC_UNIFORM (log-prob targets only), and its ``KLDLoss`` multiplies by
    T^2 and divides by the number of unmasked tokens ('mean' here). With k = V and 'zero' this is
    `kd`. No paper: the practice of storing top-k teacher logits (e.g. Gemma 2's and Llama 3.2's
    distillation) has no single reference loss.

    Args:
      student_logits: (..., V).
      teacher_values: (..., k) the teacher's top-k logits (or log-probabilities; 'bucket': must
        be log-probabilities), 1 <= k <= V.
      teacher_indices: (..., k) integer vocabulary ids in [0, V). Checked when concrete (outside
        ``jit``, e.g. where the stored ids are loaded); inside ``jit`` an out-of-range id gives
        NaN (gathered with mode 'fill'), not a silently wrong value.
      temperature: T > 0.
      remainder: 'zero' or 'bucket', see above.
      where, reduction: the padding mask and the reduction ("Padding and reduction" in
        `kdjax.losses.logit`).
    """
    fn = "topk_kd"
    if remainder not in _REMAINDERS:
        raise ValueError(f"{fn}: remainder must be 'zero' or 'bucket', got {remainder!r}")
    _positive(fn, "temperature", temperature)
    where, _ = _check_logits(fn, {"student_logits": student_logits}, where=where, reduction=reduction)
    shape, k_shape = tuple(np.shape(student_logits)), tuple(np.shape(teacher_values))
    vocab = shape[-1]
    if tuple(np.shape(teacher_indices)) != k_shape:
        raise ValueError(f"{fn}: teacher_values and teacher_indices must have the same shape, got {k_shape} and "
                         f"{tuple(np.shape(teacher_indices))}")
    if len(k_shape) != len(shape) or k_shape[:-1] != shape[:-1] or not 1 <= k_shape[-1] <= vocab:
        raise ValueError(f"{fn}: teacher_values must have shape {shape[:-1]} + (k,) with 1 <= k <= {vocab} (the "
                         f"leading axes and vocabulary of student_logits {shape}), got {k_shape}")
    if not jnp.issubdtype(jnp.asarray(teacher_indices).dtype, jnp.integer):
        raise ValueError(f"{fn}: teacher_indices must be integer vocabulary ids, got dtype "
                         f"{jnp.asarray(teacher_indices).dtype}")
    if not isinstance(teacher_indices, jax.core.Tracer):
        ids = np.asarray(teacher_indices)
        keep = np.ones(ids.shape[:-1], bool) if where is None or isinstance(where, jax.core.Tracer) else np.asarray(where)
        bad = ids[keep]
        if bad.size and (bad.min() < 0 or bad.max() >= vocab):
            raise ValueError(f"{fn}: teacher_indices must be vocabulary ids in [0, {vocab}), got ids from "
                             f"{int(bad.min())} to {int(bad.max())}")
    s = _masked(student_logits, where)
    v = _masked(teacher_values, where)
    ids = jnp.asarray(teacher_indices, jnp.int32)
    if where is not None:
        ids = jnp.where(where[..., None], ids, 0)
    lq_all = _lsm(s, temperature)
    lq = jnp.take_along_axis(lq_all, ids, axis=-1, mode="fill", fill_value=jnp.nan)
    if remainder == "zero":
        lp = _lsm(v, temperature)
        per = _kl(lp, lq)
    else:
        # the teacher's rest mass (at T = 1), and the k + 1 outcomes at T: p_j^(1/T), rest^(1/T)
        log_rest = _log1mexp(jnp.minimum(jax.nn.logsumexp(v, axis=-1), -1e-6))
        scaled = jnp.concatenate([v, log_rest[..., None]], axis=-1) / temperature
        lp_all = jax.nn.log_softmax(scaled, axis=-1)
        lp, lp_rest = lp_all[..., :-1], lp_all[..., -1]
        lq_rest = _log1mexp(jnp.minimum(jax.nn.logsumexp(lq, axis=-1), -1e-6))
        p_rest = jnp.exp(lp_rest)
        per = _kl(lp, lq) + jnp.where(p_rest > 1e-6, p_rest * (lp_rest - lq_rest), 0.0)
    return _reduce(per, where, reduction) * temperature**2


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2."""
    return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))
