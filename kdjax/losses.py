"""Knowledge-distillation losses as pure JAX functions.

Every function here is a pure function of ``jnp`` arrays: no Flax, no config,
no hidden state. They are ``jax.jit``-able and differentiable, compute in
float32 internally (so bf16 inputs are fine) and return a float32 scalar unless
stated otherwise. Layout conventions:

* logits ``(..., K)`` with integer labels of the leading shape ``(...)``: ``(B, K)`` and
  ``(B,)`` for classifiers, ``(B, T, V)`` and ``(B, T)`` for sequence models (one position per
  token), as optax's losses;
* feature maps NHWC ``(B, H, W, C)``;
* embeddings ``(B, D)`` (functions documented as flattening accept ``(B, ...)``).

Every logit loss (``cross_entropy``, ``soft_cross_entropy``, ``kd``, ``dkd``, ``dist``,
``logit_standardized_kd``, ``wttm``, ``nkd``, ``mse_logits``) also takes, keyword-only:

* ``where``: an optional bool mask of the leading shape (e.g. ``(B, T)``), False for padding.
  Padded positions are left out of the loss and get exactly zero gradient, whatever their
  logits hold (they are replaced by zeros first, so even inf/NaN padding is harmless) and
  whatever their labels are (e.g. -100);
* ``reduction``: ``'mean'`` (default: the mean over the unmasked positions, 0 when there are
  none), ``'sum'`` (over the unmasked positions) or ``'none'`` (the per-position values, of the
  leading shape, 0 at padding). ``dist`` accepts only ``'mean'`` (its intra-class term is
  defined over the whole batch; its leading axes are flattened into that batch).

With the defaults, every value is the same as for ``(B, K)`` inputs before these arguments
existed. Feature and relation losses take no mask: each docstring says which shapes it accepts
(flatten a ``(B, T, D)`` sequence to the unpadded ``(N, D)`` tokens first where the loss relates
rows of the batch to each other).

Sequence distillation (a language model's (B, T, V) logits, ``mask`` (B, T) False at padding)::

    def loss_fn(params, tokens, mask, teacher_logits):
        logits = model.apply(params, tokens)                       # (B, T, V)
        return losses.kd(logits, teacher_logits, temperature=2.0, where=mask)

Shape errors (wrong rank, mismatched batch or shape) raise ``ValueError`` at
trace time, e.g. ``kd: student_logits and teacher_logits must have the same
shape, got (8, 10) and (8, 100)``.

Loss weights (the CE weight, the distillation weight, warm-up schedules,
learnable regressors/projections) belong to the trainer, not to these
functions; the only weights accepted here are the ones that mix the internal
terms of a single method (e.g. DKD's alpha/beta, RKD's distance/angle weights).

None of the functions applies ``jax.lax.stop_gradient`` to teacher inputs
(the teacher is normally not differentiated); wrap teacher outputs in
``stop_gradient`` yourself if the teacher is trainable and should not receive
gradients. The CRD memory banks and normalisation constants are state and are
always treated as constants.

Matrix products (Gram matrices, pooling, memory-bank scores) are computed with
``precision=HIGHEST`` so that TPU/GPU results match CPU float32 closely.

CRD usage (explicit state, threaded through the train step)::

    memory = losses.crd_init_memory(jax.random.key(0), num_data=50_000, dim=128)

    def train_step(params, memory, batch, rng):
        neg = losses.crd_sample_negatives(rng, batch["index"], 50_000, 16384,
                                          labels=batch["label"],
                                          dataset_labels=all_train_labels)
        def loss_fn(params):
            s_emb, t_emb = ...  # l2-normalised projections, (B, 128) each
            loss, new_memory = losses.crd_nce(s_emb, t_emb, memory,
                                              batch["index"], neg)
            return loss, (new_memory, s_emb, t_emb)
        (loss, (memory, s_emb, t_emb)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(params)
        memory = losses.crd_update_memory(memory, s_emb, t_emb, batch["index"])
        ...
        return params, memory

References are cited by repository and commit inspected:
RepDistiller (HobbitLong/RepDistiller @1e2f816), mdistiller
(megvii-research/mdistiller @a08d46f), torchdistill
(yoshitomo-matsubara/torchdistill @3e4373c), DIST
(hunto/image_classification_sota @6f7a70a, lib/models/losses/dist_kd.py),
logit standardisation (sunshangquan/logit-standardization-KD @f6e5aa5),
big_vision (google-research/big_vision @0127fb6,
big_vision/evaluators/proj/distill/distance.py), WTTM (zkxufo/TTM @fe457b3), NKD
(yzd-v/cls_KD @1e5d48f), CTKD (zhengli97/CTKD @7d52522).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    # logits
    "cross_entropy",
    "soft_cross_entropy",
    "kd",
    "dkd",
    "dist",
    "logit_standardized_kd",
    "logit_standardize",
    "wttm",
    "mlkd",
    "nkd",
    "multiscale_logits",
    "sdd",
    "mse_logits",
    # learnable temperature (CTKD)
    "gradient_reversal",
    "ctkd_lambda",
    "ctkd_temperature",
    # features
    "fitnet",
    "ofd_margin",
    "ofd",
    "attention_transfer",
    "similarity_preserving",
    "nst",
    "vid",
    "hcl",
    "kdsvd",
    "fsp",
    "activation_boundary",
    "factor_transfer",
    # embeddings / relations
    "rkd",
    "pkt",
    "correlation_congruence",
    "cosine_distance",
    "discriminator_bce",
    # CRD
    "crd_init_memory",
    "crd_sample_negatives",
    "crd_contrast_loss",
    "crd_nce",
    "crd_update_memory",
    # weight penalties
    "l2_penalty",
    "l1_penalty",
]

_HI = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------
# Private helpers
# --------------------------------------------------------------------------


def _check(
    fn: str,
    arrays: Mapping[str, Any],
    *,
    ndim: int | None = None,
    min_ndim: int | None = None,
    layout: str = "",
    match: str | None = None,
) -> None:
    """Trace-time shape validation shared by all losses.

    Args:
      fn: public function name, used as the message prefix.
      arrays: ordered ``{argument name: array}``.
      ndim / min_ndim: required exact / minimum rank of every array.
      layout: human-readable layout appended to rank errors, e.g. "(B, K)".
      match: None, "shape" (all shapes equal), "batch" (leading axes equal) or
        "last" (last axes equal); compared against the first array.
    """
    shapes = {name: tuple(np.shape(a)) for name, a in arrays.items()}
    lay = f" {layout}" if layout else ""
    for name, shape in shapes.items():
        if ndim is not None and len(shape) != ndim:
            raise ValueError(f"{fn}: {name} must have rank {ndim}{lay}, got shape {shape}")
        if min_ndim is not None and len(shape) < min_ndim:
            raise ValueError(
                f"{fn}: {name} must have rank >= {min_ndim}{lay}, got shape {shape}"
            )
    if match is None:
        return
    names = list(shapes)
    first = names[0]
    what = {"shape": "shape", "batch": "batch size", "last": "last-axis size"}[match]
    for name in names[1:]:
        a, b = shapes[first], shapes[name]
        if match == "shape":
            ok = a == b
        elif match == "batch":
            ok = a[:1] == b[:1]
        else:
            ok = a[-1:] == b[-1:]
        if not ok:
            raise ValueError(
                f"{fn}: {first} and {name} must have the same {what}, got {a} and {b}"
            )


def _f32(x) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def _flat(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1)


def _safe_sqrt(x: jax.Array) -> jax.Array:
    """sqrt(x) for x >= 0 with a zero (not NaN) gradient at x == 0."""
    pos = x > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


def _norm(x: jax.Array, axis: int = -1, keepdims: bool = True) -> jax.Array:
    return _safe_sqrt(jnp.sum(x * x, axis=axis, keepdims=keepdims))


def _l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """torch.nn.functional.normalize: x / max(||x||_2, eps)."""
    return x / jnp.maximum(_norm(x, axis), eps)


def _kl_logits(teacher_z: jax.Array, student_z: jax.Array) -> jax.Array:
    """Per-row KL(softmax(teacher_z) || softmax(student_z)), shape (B,)."""
    return optax.losses.kl_divergence_with_log_targets(
        jax.nn.log_softmax(student_z, axis=-1), jax.nn.log_softmax(teacher_z, axis=-1)
    )


def _pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) averaging matrix of torch adaptive_avg_pool along one axis.

    Bin i averages inputs [floor(i*n_in/n_out), ceil((i+1)*n_in/n_out)).
    """
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        lo = (i * n_in) // n_out
        hi = -((-(i + 1) * n_in) // n_out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def _adaptive_avg_pool(x: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """torch F.adaptive_avg_pool2d for an NHWC array (static output size)."""
    h, w = x.shape[1], x.shape[2]
    if (h, w) == tuple(hw):
        return x
    ph = jnp.asarray(_pool_matrix(h, hw[0]))
    pw = jnp.asarray(_pool_matrix(w, hw[1]))
    return jnp.einsum("oh,bhwc,pw->bopc", ph, x, pw, precision=_HI)


def _pool_to_common(fs: jax.Array, ft: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Adaptive-average-pool the larger spatial map down to the smaller one."""
    hw = (min(fs.shape[1], ft.shape[1]), min(fs.shape[2], ft.shape[2]))
    return _adaptive_avg_pool(fs, hw), _adaptive_avg_pool(ft, hw)


_REDUCTIONS = ("mean", "sum", "none")


def _check_logits(
    fn: str,
    logits: Mapping[str, Any],
    *,
    labels: Any = None,
    where: Any = None,
    reduction: str = "mean",
    min_ndim: int = 1,
    reductions: Sequence[str] = _REDUCTIONS,
    why: str = "",
) -> tuple[jax.Array | None, jax.Array | None]:
    """Validates (..., K) logits, labels/where of the leading shape, and the reduction.

    Returns ``(where, labels)``: ``where`` as a bool array (None if not given) and ``labels``
    as an int array with the padded positions replaced by class 0 (None if not given), so
    padding may carry any label (e.g. -100).
    """
    if reduction not in reductions:
        choices = ", ".join(repr(r) for r in reductions)
        raise ValueError(f"{fn}: reduction must be {choices if len(reductions) == 1 else 'one of ' + choices}"
                         f"{why}, got {reduction!r}")
    _check(fn, logits, min_ndim=min_ndim, layout="(..., K)" if min_ndim == 1 else "(B, ..., K)",
           match="shape")
    first = next(iter(logits))
    shape = tuple(np.shape(logits[first]))
    lead = shape[:-1]
    for name, arr in (("labels", labels), ("where", where)):
        if arr is not None and tuple(np.shape(arr)) != lead:
            raise ValueError(f"{fn}: {name} must have shape {lead} (the leading axes of {first} "
                             f"{shape}), got {tuple(np.shape(arr))}")
    if where is not None:
        dtype = jnp.asarray(where).dtype
        if not (jnp.issubdtype(dtype, jnp.bool_) or jnp.issubdtype(dtype, jnp.integer)):
            raise ValueError(f"{fn}: where must be a boolean mask, got dtype {dtype} (for "
                             "per-position weights use reduction='none' and weight the result)")
        where = jnp.asarray(where).astype(bool)
    if labels is not None:
        labels = jnp.asarray(labels)
        if where is not None:
            labels = jnp.where(where, labels, jnp.zeros((), labels.dtype))
    return where, labels


def _masked(z: jax.Array, where: jax.Array | None) -> jax.Array:
    """float32 logits with the padded positions (where == False) replaced by zeros, so that
    padding, whatever it holds (even inf or NaN), gives finite values and zero gradients."""
    z = _f32(z)
    return z if where is None else jnp.where(where[..., None], z, 0.0)


def _reduce(values: jax.Array, where: jax.Array | None, reduction: str) -> jax.Array:
    """Per-position values (leading shape) -> 'mean' over the unmasked positions (0 if none),
    'sum' over them, or 'none': the values themselves with the padded positions set to 0."""
    if where is None:
        if reduction == "mean":
            return jnp.mean(values)
        return jnp.sum(values) if reduction == "sum" else values
    values = jnp.where(where, values, 0.0)
    if reduction == "none":
        return values
    total = jnp.sum(values)
    if reduction == "sum":
        return total
    return total / jnp.maximum(jnp.sum(where, dtype=jnp.float32), 1.0)


# --------------------------------------------------------------------------
# Logit losses
# --------------------------------------------------------------------------


def cross_entropy(logits, labels, label_smoothing: float = 0.0, *, where=None,
                  reduction: str = "mean") -> jax.Array:
    """Softmax cross-entropy with integer labels, mean over positions.

    loss = mean_b [ -sum_k y_bk log softmax(z_b)_k ],
    y_b = (1 - eps) * onehot(label_b) + eps / K   (eps = label_smoothing),
    i.e. the same smoothing convention as ``torch.nn.CrossEntropyLoss``
    and ``optax.smooth_labels``. With eps = 0 this is the plain NLL of the label.

    Args:
      logits: (..., K) student logits, e.g. (B, K) or (B, T, K).
      labels: (...) integer class ids (the leading shape of ``logits``); any value at padding.
      label_smoothing: eps in [0, 1); mass spread uniformly over all K classes.
      where: optional bool mask of the leading shape (e.g. (B, T) for (B, T, K) logits); False
        marks padding, which is left out of the loss and gets zero gradient.
      reduction: 'mean' (default: over the unmasked positions; 0 if there are none), 'sum', or
        'none' (the per-position values, of the leading shape, 0 at padding).
    """
    where, labels = _check_logits("cross_entropy", {"logits": logits}, labels=labels,
                                  where=where, reduction=reduction)
    z = _masked(logits, where)
    if isinstance(label_smoothing, (int, float)) and label_smoothing == 0:
        per = optax.losses.softmax_cross_entropy_with_integer_labels(z, labels)
        return _reduce(per, where, reduction)
    y = optax.smooth_labels(jax.nn.one_hot(labels, z.shape[-1], dtype=jnp.float32),
                            label_smoothing)
    return _reduce(optax.losses.softmax_cross_entropy(z, y), where, reduction)


def soft_cross_entropy(student_logits, teacher_logits, temperature: float = 1.0, *,
                       where=None, reduction: str = "mean") -> jax.Array:
    """Cross-entropy against the teacher's softened distribution, mean over positions.

    loss = mean_b [ -sum_k softmax(t_b/T)_k log softmax(s_b/T)_k ]

    No T^2 factor. This is big_vision's function-matching "xent" objective
    (Beyer et al., "Knowledge distillation: A good teacher is patient and
    consistent", CVPR 2022; ``u.softmax_xent(kl=False)`` on teacher
    probabilities). It differs from ``kd`` (at T = 1) only by the teacher
    entropy, a constant w.r.t. the student.

    Args:
      student_logits, teacher_logits: (..., K), the same shape.
      temperature: T > 0, applied to both.
      where: optional bool mask of the leading shape (e.g. (B, T) for (B, T, K) logits); False
        marks padding, which is left out of the loss and gets zero gradient.
      reduction: 'mean' (default: over the unmasked positions; 0 if there are none), 'sum', or
        'none' (the per-position values, of the leading shape, 0 at padding).
    """
    where, _ = _check_logits("soft_cross_entropy", {"student_logits": student_logits,
                                                    "teacher_logits": teacher_logits},
                             where=where, reduction=reduction)
    s = _masked(student_logits, where) / temperature
    t = _masked(teacher_logits, where) / temperature
    per = optax.losses.softmax_cross_entropy(s, jax.nn.softmax(t, axis=-1))
    return _reduce(per, where, reduction)


def kd(student_logits, teacher_logits, temperature: float = 4.0, *, where=None,
       reduction: str = "mean") -> jax.Array:
    """Hinton knowledge distillation: T^2-scaled KL of softened distributions.

    loss = T^2 * mean_b KL( softmax(t_b/T) || softmax(s_b/T) )
         = T^2 * mean_b sum_k p_t,k (log p_t,k - log p_s,k)

    Reduction: sum over classes, mean over the batch ("batchmean"); with leading axes
    (B, T, K), mean over all (unmasked) positions, i.e. per-token KL averaged over tokens.
    Paper: Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural
    Network", 2015. Reproduces RepDistiller ``DistillKL``
    (``kl_div(sum) * T^2 / B``).

    The CE weight and KD weight (RepDistiller's gamma / alpha) are trainer
    config, not arguments here: total = w_ce * cross_entropy + w_kd * kd.

    Args:
      student_logits, teacher_logits: (..., K), the same shape, e.g. (B, K) or (B, T, V).
      temperature: softening temperature T (may be a traced scalar, e.g. CTKD).
      where: optional bool mask of the leading shape (e.g. (B, T) for (B, T, K) logits); False
        marks padding, which is left out of the loss and gets zero gradient.
      reduction: 'mean' (default: over the unmasked positions; 0 if there are none), 'sum', or
        'none' (the per-position values, of the leading shape, 0 at padding).
    """
    where, _ = _check_logits("kd", {"student_logits": student_logits,
                                    "teacher_logits": teacher_logits},
                             where=where, reduction=reduction)
    s = _masked(student_logits, where) / temperature
    t = _masked(teacher_logits, where) / temperature
    return _reduce(_kl_logits(t, s), where, reduction) * temperature**2


def dkd(student_logits, teacher_logits, labels, alpha: float = 1.0, beta: float = 8.0,
        temperature: float = 4.0, *, where=None, reduction: str = "mean") -> jax.Array:
    """Decoupled knowledge distillation: alpha * TCKD + beta * NCKD.

    With p = softmax(z/T) and g = target class:
      TCKD = T^2 * mean_b KL( [p_t,g, 1 - p_t,g] || [p_s,g, 1 - p_s,g] )
      NCKD = T^2 * mean_b KL( q_t || q_s ),  q = softmax(z/T - 1000 * onehot(g))
    i.e. NCKD is KL between the distributions over non-target classes
    (the target logit is pushed down by 1000 before the softmax, as in the
    reference, which makes its probability exactly 0 in float32).

    Paper: Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation",
    CVPR 2022. Reproduces mdistiller ``dkd_loss`` (DKD.py). The binary
    log-probabilities are computed with logsumexp instead of log(sum(softmax)),
    which is the same value but does not overflow to -inf for confident
    teachers. DKD's linear warm-up (``min(epoch / warmup, 1)``) and CE weight
    are the trainer's job.

    Both terms are per-example KLs averaged over the batch, so leading axes (..., K) are
    simply more positions (each with its own target class): 'mean' averages TCKD and NCKD over
    the unmasked positions, 'none' gives alpha * TCKD + beta * NCKD (times T^2) per position.

    Args:
      student_logits, teacher_logits: (..., K), the same shape, K >= 2.
      labels: (...) integer target classes (the leading shape); any value at padding.
      alpha: weight of the target-class term TCKD (mdistiller DKD.ALPHA).
      beta: weight of the non-target term NCKD (mdistiller DKD.BETA; 8 on CIFAR).
      temperature: T.
      where: optional bool mask of the leading shape (e.g. (B, T) for (B, T, K) logits); False
        marks padding, which is left out of the loss and gets zero gradient.
      reduction: 'mean' (default: over the unmasked positions; 0 if there are none), 'sum', or
        'none' (the per-position values, of the leading shape, 0 at padding).
    """
    where, labels = _check_logits("dkd", {"student_logits": student_logits,
                                          "teacher_logits": teacher_logits},
                                  labels=labels, where=where, reduction=reduction)
    zs = _masked(student_logits, where) / temperature
    zt = _masked(teacher_logits, where) / temperature
    gt = jax.nn.one_hot(labels, zs.shape[-1], dtype=jnp.float32)

    def binary_log_probs(z):
        lse = jax.nn.logsumexp(z, axis=-1)
        log_p_gt = jnp.sum(z * gt, axis=-1) - lse
        log_p_other = jax.nn.logsumexp(jnp.where(gt > 0, -jnp.inf, z), axis=-1) - lse
        return jnp.stack([log_p_gt, log_p_other], axis=-1)

    tckd = _reduce(optax.losses.kl_divergence_with_log_targets(
        binary_log_probs(zs), binary_log_probs(zt)), where, reduction)
    nckd = _reduce(_kl_logits(zt - 1000.0 * gt, zs - 1000.0 * gt), where, reduction)
    return (alpha * tckd + beta * nckd) * temperature**2


def dist(student_logits, teacher_logits, beta: float = 1.0, gamma: float = 1.0,
         temperature: float = 1.0, *, where=None, reduction: str = "mean") -> jax.Array:
    """DIST: inter- and intra-class Pearson-correlation relation loss.

    With Y = softmax(z/T) (B, K) and rho(u, v) = <u - mean u, v - mean v> /
    (||u - mean u|| ||v - mean v|| + 1e-8):
      inter = 1 - mean_b rho(Ys[b, :], Yt[b, :])     (rows: per sample)
      intra = 1 - mean_k rho(Ys[:, k], Yt[:, k])     (columns: per class)
      loss  = T^2 * (beta * inter + gamma * intra)

    Paper: Huang, You, Wang, Qian, Xu, "Knowledge Distillation from A Stronger
    Teacher", NeurIPS 2022. Reproduces hunto/image_classification_sota
    ``DIST`` (lib/models/losses/dist_kd.py; the ``tau**2`` factor is from there,
    the segmentation copy in hunto/DIST_KD has no temperature).

    The intra-class term is defined over the batch, not per example. Leading axes
    (B, ..., K) are flattened into that batch: (B, T, K) logits are B*T rows, so each class
    is correlated over all (unmasked) tokens of the batch, and `inter` is the mean over those
    rows. With ``where``, padded rows are left out of both terms (each class's mean and
    correlation are over the unmasked rows only). There is no per-position value and no
    meaningful sum, so only ``reduction='mean'`` is accepted; 'sum' and 'none' are refused.
    Needs at least one leading axis.

    Args:
      student_logits, teacher_logits: (B, ..., K), the same shape.
      beta: weight of the inter-class (per-sample) relation.
      gamma: weight of the intra-class (per-class, across batch) relation.
      temperature: tau.
      where: optional bool mask of the leading shape; False marks padding.
      reduction: 'mean' only (see above).
    """
    where, _ = _check_logits(
        "dist", {"student_logits": student_logits, "teacher_logits": teacher_logits},
        where=where, reduction=reduction, min_ndim=2, reductions=("mean",),
        why=" (its intra-class term correlates each class over the whole batch, so there is no "
            "per-position value)")
    k = np.shape(student_logits)[-1]
    ys = jax.nn.softmax(_masked(student_logits, where).reshape(-1, k) / temperature, axis=-1)
    yt = jax.nn.softmax(_masked(teacher_logits, where).reshape(-1, k) / temperature, axis=-1)

    def pearson(a, b, axis):
        a = a - jnp.mean(a, axis=axis, keepdims=True)
        b = b - jnp.mean(b, axis=axis, keepdims=True)
        num = jnp.sum(a * b, axis=axis)
        den = _norm(a, axis, keepdims=False) * _norm(b, axis, keepdims=False) + 1e-8
        return num / den

    if where is None:
        inter = 1.0 - jnp.mean(pearson(ys, yt, axis=1))
        intra = 1.0 - jnp.mean(pearson(ys, yt, axis=0))
        return temperature**2 * (beta * inter + gamma * intra)

    keep = where.reshape(-1)
    inter = 1.0 - _reduce(pearson(ys, yt, axis=1), keep, "mean")
    w = keep[:, None].astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w), 1.0)

    def centred(a):  # columns centred on the unmasked rows' mean; padded rows zero
        return (a - jnp.sum(w * a, axis=0, keepdims=True) / n) * w

    a, b = centred(ys), centred(yt)
    rho = jnp.sum(a * b, axis=0) / (_norm(a, 0, keepdims=False) * _norm(b, 0, keepdims=False)
                                     + 1e-8)
    intra = 1.0 - jnp.mean(rho)
    return temperature**2 * (beta * inter + gamma * intra)


def logit_standardized_kd(student_logits, teacher_logits, temperature: float = 2.0, *,
                          where=None, reduction: str = "mean") -> jax.Array:
    """KD on z-scored logits (logit standardisation).

    z' = (z - mean_k z) / (std_k z + 1e-7), std with Bessel's correction
    (unbiased, as ``torch.Tensor.std``), per sample, for student and teacher;
    loss = kd(z'_s, z'_t, T) = T^2 * mean_b KL(softmax(z'_t/T) || softmax(z'_s/T)).

    The reference keeps the T^2 factor (``kl_div(batchmean) * T * T``) even
    though the standardised logits have unit variance; its CIFAR configs use
    base temperature 2-4 with a KD weight of ~9 (trainer config, not here).

    Paper: Sun, Ren, Li, Wang, Cao, "Logit Standardization in Knowledge
    Distillation", CVPR 2024. Reproduces sunshangquan/logit-standardization-KD
    ``normalize`` + ``kd_loss`` (mdistiller/distillers/KD.py).

    Args:
      student_logits, teacher_logits: (..., K), the same shape, K >= 2.
      temperature: base temperature T applied after standardisation.
      where: optional bool mask of the leading shape (e.g. (B, T) for (B, T, K) logits); False
        marks padding, which is left out of the loss and gets zero gradient.
      reduction: 'mean' (default: over the unmasked positions; 0 if there are none), 'sum', or
        'none' (the per-position values, of the leading shape, 0 at padding).

    Equal to ``kd(logit_standardize(s), logit_standardize(t), T)``; in the method layer the
    same standardisation is a modifier of any logit method (``distill.logit_standardize``).
    """
    where, _ = _check_logits("logit_standardized_kd",
                             {"student_logits": student_logits, "teacher_logits": teacher_logits},
                             where=where, reduction=reduction)
    s, t = _masked(student_logits, where), _masked(teacher_logits, where)
    return kd(logit_standardize(s), logit_standardize(t), temperature, where=where,
              reduction=reduction)


def logit_standardize(logits, eps: float = 1e-7) -> jax.Array:
    """Per-sample z-score of logits over the class axis (logit standardisation).

    z' = (z - mean_k z) / (std_k z + eps), std with Bessel's correction (unbiased, as
    ``torch.Tensor.std``). Returns float32 logits of the input's shape (..., K), not a loss;
    every position (row) is standardised on its own, so padding needs no mask here.

    Paper: Sun, Ren, Li, Wang, Cao, "Logit Standardization in Knowledge Distillation", CVPR
    2024. Reproduces sunshangquan/logit-standardization-KD ``normalize`` (mdistiller/distillers/
    KD.py, DKD.py, MLKD.py), which the reference applies to the teacher's and the student's
    logits before the temperature of any of its logit losses (``--logit-stand``). kdjax applies
    it the same way to every logit term with ``distill.logit_standardize=True``.

    Args:
      logits: (..., K), K >= 2, e.g. (B, K) or (B, T, K).
      eps: added to the standard deviation (1e-7 in the reference).
    """
    _check("logit_standardize", {"logits": logits}, min_ndim=1, layout="(..., K)")
    z = _f32(logits)
    c = z - jnp.mean(z, axis=-1, keepdims=True)
    std = _safe_sqrt(jnp.sum(c * c, axis=-1, keepdims=True) / (z.shape[-1] - 1))
    return c / (std + eps)


def wttm(student_logits, teacher_logits, gamma: float = 0.2, *, where=None,
         reduction: str = "mean") -> jax.Array:
    """Weighted transformed teacher matching (WTTM).

    With p = softmax(t) and q = softmax(s) (both at temperature 1) and the power transform
    p^gamma (gamma = 1/T in the paper's terms):
      U_b  = sum_k p_bk^gamma                         (power sum: the per-sample weight)
      p~_b = p_b^gamma / U_b  (= softmax(gamma * t_b), the transformed teacher)
      loss = mean_b U_b * KL( p~_b || q_b )
    Only the teacher is transformed; the student stays at T = 1 and there is no T^2 factor.
    U_b lies in [1, K^(1 - gamma)]: smoother teacher outputs get larger weights. It is not
    normalised over the batch, so the loss scale grows with K (the method weight absorbs it).

    Reduction: sum over classes, weighted by U_b, mean over the batch.
    Paper: Zheng & Yang, "Knowledge Distillation Based on Transformed Teacher Matching", ICLR
    2024. Reproduces zkxufo/TTM ``WTTM`` (distiller_zoo/wttm.py @fe457b3): ``pow(softmax(y_t),
    l)``, ``norm = sum``, ``mean(norm * KL)``. The power is taken in log space here
    (gamma * log_softmax), which is the same value without underflow of tiny probabilities.
    TTM, the unweighted variant (``TTM`` in the same repository), is this with U_b = 1, i.e.
    ``kd(s, gamma * t, 1)``.

    Args:
      student_logits, teacher_logits: (..., K), the same shape (each position has its own
        weight U).
      gamma: power-transform exponent, 0 < gamma <= 1 (the reference's ``--ttm_l``).
      where: optional bool mask of the leading shape (e.g. (B, T) for (B, T, K) logits); False
        marks padding, which is left out of the loss and gets zero gradient.
      reduction: 'mean' (default: over the unmasked positions; 0 if there are none), 'sum', or
        'none' (the per-position values, of the leading shape, 0 at padding).
    """
    where, _ = _check_logits("wttm", {"student_logits": student_logits,
                                      "teacher_logits": teacher_logits},
                             where=where, reduction=reduction)
    log_pt = gamma * jax.nn.log_softmax(_masked(teacher_logits, where), axis=-1)  # log p^gamma
    weight = jnp.exp(jax.nn.logsumexp(log_pt, axis=-1))  # U = sum p^gamma
    kl = _kl_logits(log_pt, _masked(student_logits, where))  # softmax(log p^gamma) = p^gamma / U
    return _reduce(weight * kl, where, reduction)


def _median_fraction(values: jax.Array) -> jax.Array:
    """Fraction of the entries of a 1-D array that are <= its median (numpy's 50th percentile,
    linear interpolation): MLKD's confidence masks, as the reference reduces them."""
    return jnp.mean((values <= jnp.median(values)).astype(jnp.float32))


def mlkd(student_weak, student_strong, teacher_weak, teacher_strong,
         temperatures: Sequence[float] = (4.0, 3.0, 5.0, 2.0, 6.0),
         strong_temperatures: Sequence[float] = (4.0, 3.0, 5.0), *, confidence_logits=None,
         standardize: bool = False) -> jax.Array:
    """Multi-level logit distillation (MLKD) on a weakly and a strongly augmented view.

    With P = softmax(z / T) row-wise ((B, K) for a batch of B examples, K classes) and the
    teacher's weak-view probabilities at T = 1, p = softmax(confidence_logits) (default: the
    teacher's weak-view logits):
      KD_T(s, t) = T^2 mean_b KL(P_t,b || P_s,b)                     (instance level, `kd`)
      CC_T(s, t) = || P_s^T P_s - P_t^T P_t ||_F^2 / K               (class level, K x K)
      BC_T(s, t) = || P_s P_s^T - P_t P_t^T ||_F^2 / B               (batch level, B x B)
      m_s = mean_b [max_k p_bk <= median_b(max_k p_bk)]              (sample-confidence mask)
      m_c = mean_k [sum_b p_bk <= median_k(sum_b p_bk)]              (class-confidence mask)
      loss = sum_{T in temperatures} ( m_s KD_T(w) + V_T + m_c CC_T(w) + m_s BC_T(w) ),
      V_T  = KD_T(strong) if T in strong_temperatures else KD_T(w),
    where (w) is (student_weak, teacher_weak) and (strong) the strong view's pair.

    Reduction: KD batch mean; CC and BC sums over their K x K / B x B entries divided by K / B; a
    scalar. The masks depend on the whole batch (medians), as do CC and BC: a batch-level loss.
    Paper: Jin, Wang, Lin, "Multi-Level Logit Distillation", CVPR 2023. Reproduces the official
    Jin-Ying/Multi-Level-Logit-Distillation ``KD_ours`` (mdistiller/distillers/KD_ours.py @5ee473f)
    with its cfg.KD.TEMPERATURE = 4 and the extra temperatures 3, 5, 2, 6; where paper and code
    differ this follows the code:
      * the confidence masks multiply batch-mean losses (``(kd_loss(...) * mask).mean()`` with
        ``reduce=True``), so they scale each loss by the masked fraction (about 1/2), m_s / m_c
        above, instead of selecting examples or classes;
      * its strong-view KD reads the strong view at T = 4, 3, 5 but the weak view at T = 2, 6
        (`strong_temperatures`; set it to `temperatures` for the strong view at every T);
      * its class- and batch-level losses of the strong view are computed but left out of the
        objective, so only the weak view's enter here.
    The hard-label CE on the strong view (the reference's CE is on both views) is a separate term
    of the method (kdjax.distill). ``standardize`` z-scores the logits of the instance-level KD
    only (`logit_standardize`), as sunshangquan/logit-standardization-KD's MLKD.py does with
    ``--logit-stand``; the masks and the class and batch levels read the raw logits.

    Args:
      student_weak, student_strong, teacher_weak, teacher_strong: (B, K) logits.
      temperatures: the temperatures of every level (the reference's 4, 3, 5, 2, 6).
      strong_temperatures: those at which the strong-view KD reads the strong view.
      confidence_logits: (B, K) teacher logits the masks are computed from (default
        teacher_weak; kdjax.distill passes an ensemble's teachers combined at T = 1).
      standardize: z-score the instance-level KD's logits (logit standardisation).
    """
    views = {"student_weak": student_weak, "student_strong": student_strong,
             "teacher_weak": teacher_weak, "teacher_strong": teacher_strong}
    _check("mlkd", views, ndim=2, layout="(B, K)", match="shape")
    sw, ss, tw, ts = (_f32(v) for v in views.values())
    conf = jax.nn.softmax(jax.lax.stop_gradient(tw if confidence_logits is None else _f32(confidence_logits)), -1)
    m_s, m_c = _median_fraction(jnp.max(conf, -1)), _median_fraction(jnp.sum(conf, 0))
    inst = (lambda s, t, temp: kd(logit_standardize(s), logit_standardize(t), temp)) if standardize else kd

    def gram_gap(s, t, temp, axis):  # || P_s^T P_s - P_t^T P_t ||^2 (axis 0) or P P^T (axis 1)
        ps, pt = jax.nn.softmax(s / temp, -1), jax.nn.softmax(t / temp, -1)
        eq = "bi,bj->ij" if axis == 0 else "ib,jb->ij"
        g = jnp.einsum(eq, ps, ps, precision=_HI) - jnp.einsum(eq, pt, pt, precision=_HI)
        return jnp.sum(g * g) / s.shape[1 - axis]

    strong = {float(x) for x in strong_temperatures}
    loss = jnp.zeros((), jnp.float32)
    for temp in temperatures:
        kd_w = inst(sw, tw, temp)
        loss += m_s * kd_w + (inst(ss, ts, temp) if float(temp) in strong else kd_w)
        loss += m_c * gram_gap(sw, tw, temp, 0) + m_s * gram_gap(sw, tw, temp, 1)
    return loss


def nkd(student_logits, teacher_logits, labels, gamma: float = 1.5,
        temperature: float = 1.0, *, where=None, reduction: str = "mean") -> jax.Array:
    """Normalized knowledge distillation (NKD): target term + normalised non-target term.

    With g = target class, S = softmax(s), T = softmax(t) at temperature 1, and the non-target
    distributions renormalised over the K - 1 other classes at temperature tau,
    N(T^tau)_i = softmax_{i != g}(t_i / tau), N(S^tau)_i = softmax_{i != g}(s_i / tau):
      L_target = -mean_b T_b,g log S_b,g
      L_non    = -gamma * tau^2 * mean_b sum_{i != g} N(T^tau)_b,i log N(S^tau)_b,i
      loss     = L_target + L_non
    Both parts are cross-entropies (not KL: no teacher entropy is subtracted), so the loss
    is not 0 when student == teacher. Softmax over the K - 1 non-target logits is exactly the
    paper's renormalisation N(.) of the non-target probabilities.

    Reduction: sum over classes, mean over the batch.
    Paper: Yang, Zeng, Yuan, Li, "From Knowledge Distillation to Self-Knowledge Distillation:
    A Unified Approach with Normalized Loss and Customized Soft Labels", ICCV 2023. Reproduces
    yzd-v/cls_KD ``NKDLoss`` (mmcls/models/dis_losses/nkd.py @1e5d48f): the target
    probability at T = 1 (``.detach()`` there; the teacher is constant here anyway), the
    non-target logits gathered by a mask and softmaxed at ``temp``. Its class defaults are
    temp 1, gamma 1.5 (ImageNet ResNet configs); the CIFAR-100 config uses temp 3, gamma 3.5.
    Soft (mixed) labels are reduced to their argmax in the reference; pass that class here.

    Both parts are per-example values averaged over the batch, so leading axes (..., K) are
    more positions, each with its own target class; 'none' gives L_target + L_non per position.

    Args:
      student_logits, teacher_logits: (..., K), the same shape, K >= 2.
      labels: (...) integer target classes (the leading shape); any value at padding.
      gamma: weight of the non-target term.
      temperature: tau, applied to the non-target part only.
      where: optional bool mask of the leading shape (e.g. (B, T) for (B, T, K) logits); False
        marks padding, which is left out of the loss and gets zero gradient.
      reduction: 'mean' (default: over the unmasked positions; 0 if there are none), 'sum', or
        'none' (the per-position values, of the leading shape, 0 at padding).
    """
    where, labels = _check_logits("nkd", {"student_logits": student_logits,
                                          "teacher_logits": teacher_logits},
                                  labels=labels, where=where, reduction=reduction)
    zs, zt = _masked(student_logits, where), _masked(teacher_logits, where)
    labels = jnp.asarray(labels, jnp.int32)[..., None]
    t_target = jnp.take_along_axis(jax.nn.softmax(zt, axis=-1), labels, axis=-1)
    log_s_target = jnp.take_along_axis(jax.nn.log_softmax(zs, axis=-1), labels, axis=-1)
    loss_t = -_reduce((t_target * log_s_target)[..., 0], where, reduction)
    # Column j of the K - 1 non-target classes is class j, or j + 1 from the target on.
    k = zs.shape[-1]
    cols = jnp.arange(k - 1)
    others = cols + (cols >= labels).astype(jnp.int32)
    zs_non = jnp.take_along_axis(zs, others, axis=-1) / temperature
    zt_non = jnp.take_along_axis(zt, others, axis=-1) / temperature
    ce_non = optax.losses.softmax_cross_entropy(zs_non, jax.nn.softmax(zt_non, axis=-1))
    return loss_t + gamma * temperature**2 * _reduce(ce_non, where, reduction)


def multiscale_logits(class_map, scales: Sequence[int] = (1, 2, 4)) -> jax.Array:
    """Scale-decoupled logits: a class map averaged over the cells of several grids.

    ``class_map`` (B, H, W, K) is a classifier applied at every position of the map it pools
    (`kdjax.models` feature 'class_map'); since the head is affine, the average of the class map
    over a cell equals the head applied to the average-pooled features of that cell, i.e. the
    reference's ``fc(SPP(x))``. As the reference's SPP, the map is adaptive-average-pooled to the
    finest grid (max(scales)) and the other grids are pooled from that one. Returns (B, R, K)
    with R = sum(s^2): the cells of each scale in the order of ``scales``, row-major; with
    scales[0] = 1, region 0 is the global (ordinary) logits. Paper: Wei, Luo, Luo, CVPR 2024
    (shicaiwei123/SDD-CVPR2024 ``SPP``, mdistiller/models/cifar/utils.py).
    """
    _check("multiscale_logits", {"class_map": class_map}, ndim=4, layout="(B, H, W, K)")
    scales = [int(s) for s in scales]
    if not scales or min(scales) < 1:
        raise ValueError(f"multiscale_logits: scales must be positive integers, got {scales}")
    b, k = class_map.shape[0], class_map.shape[-1]
    finest = _adaptive_avg_pool(_f32(class_map), (max(scales), max(scales)))
    return jnp.concatenate([_adaptive_avg_pool(finest, (s, s)).reshape(b, s * s, k) for s in scales], axis=1)


def sdd(student_logits, teacher_logits, labels, base: str = "kd", temperature: float = 4.0,
        alpha: float = 1.0, beta: float = 8.0, complementary_weight: float = 2.0) -> jax.Array:
    """Scale decoupled distillation: a logit loss on every region's logits, weighted up where
    the region's teacher prediction disagrees with the global one.

    Inputs are (B, R, K) multi-scale logits (`multiscale_logits`; region 0 = the global logits).
    With l_{b,r} the per-example loss of region r (base 'kd': T^2 KL(p_t || p_s) at temperature
    T, `kd`; base 'dkd': alpha TCKD + beta NCKD, `dkd`, with the example's label) and
    c_{b,r} = [argmax t_{b,r} == y_b] whether the teacher classifies region r correctly:
      w_{b,r} = complementary_weight  if c_{b,r} != c_{b,0}  (complementary: the region and the
                                       global prediction disagree on being right)
              = 1                      otherwise              (consistent)
      loss    = sum_{b,r} w_{b,r} l_{b,r} / (B R)
    Reduction: mean over examples and regions of the weighted per-region losses.

    Paper: Wei, Luo, Luo, "Scale Decoupled Distillation", CVPR 2024. Reproduces
    shicaiwei123/SDD-CVPR2024 ``sdd_kd_loss`` (mdistiller/distillers/KD.py) and ``multi_dkd``
    (SDD_DKD.py): the four masks gt_lt, gw_lw (weight 1) and gt_lw, gw_lt (weight 2) there are
    the two cases above. The reference's kd variant sets NaN entries to 0; here the KL is
    computed from log-softmaxes and has none.

    Args:
      student_logits, teacher_logits: (B, R, K) multi-scale logits, the same shape.
      labels: (B,) integer classes.
      base: 'kd' or 'dkd', the per-region loss.
      temperature: T.
      alpha, beta: DKD's TCKD / NCKD weights (base 'dkd' only).
      complementary_weight: the weight of the complementary regions (2 in the reference).
    """
    _check("sdd", {"student_logits": student_logits, "teacher_logits": teacher_logits},
           ndim=3, layout="(B, R, K)", match="shape")
    if base not in ("kd", "dkd"):
        raise ValueError(f"sdd: base must be 'kd' or 'dkd', got {base!r}")
    b, r, _ = np.shape(student_logits)
    labels = jnp.asarray(labels, jnp.int32)
    if labels.shape != (b,):
        raise ValueError(f"sdd: labels must have shape ({b},), got {labels.shape}")
    zs, zt = _f32(student_logits), _f32(teacher_logits)
    region_labels = jnp.broadcast_to(labels[:, None], (b, r))
    if base == "kd":
        per = kd(zs, zt, temperature, reduction="none")
    else:
        per = dkd(zs, zt, region_labels, alpha, beta, temperature, reduction="none")
    right = jnp.argmax(zt, axis=-1) == region_labels
    w = jnp.where(right == right[:, :1], 1.0, complementary_weight)
    return jnp.mean(w * per)


@jax.custom_vjp
def gradient_reversal(x, lam):
    """Gradient-reversal layer: identity forward, gradient times -lam backward.

    y = x;  dL/dx = -lam * dL/dy;  no gradient to lam. Ganin & Lempitsky, "Unsupervised Domain
    Adaptation by Backpropagation", ICML 2015. CTKD uses it so that the temperature ascends
    the distillation loss the student descends (zhengli97/CTKD ``GradientReversalFunction``,
    which multiplies by its schedule value in [-1, 0], i.e. by -lam here).

    Args:
      x: any array (CTKD: the raw temperature parameter).
      lam: scalar >= 0 (may be traced).
    """
    return x


def _grl_fwd(x, lam):
    return x, lam


def _grl_bwd(lam, g):
    return (jax.tree.map(lambda v: (-lam * v).astype(v.dtype), g), jnp.zeros_like(lam))


gradient_reversal.defvjp(_grl_fwd, _grl_bwd)


def ctkd_lambda(epoch, lambda_start: float = 0.0, lambda_end: float = 1.0,
                epochs: float = 10.0) -> jax.Array:
    """CTKD's cosine curriculum for the gradient-reversal weight lambda.

    i = clip(epoch, 0, epochs);
    lambda = lambda_start + (lambda_end - lambda_start) * (1 - cos(pi * i / epochs)) / 2,
    so lambda rises from lambda_start to lambda_end over `epochs` epochs, then stays.

    Paper: Li, Li, Yang, Zhao, Song, Wang, Chen, Yang, Wang, "Curriculum Temperature for
    Knowledge Distillation", AAAI 2023. Reproduces zhengli97/CTKD ``CosineDecay``
    (train_student.py @7d52522) with ``--decay_max 0 --decay_min -1 --decay_loops 10``: its
    value is -lambda (the sign of the reversal), evaluated once per epoch at the 1-based epoch
    number (the method layer passes floor(step / steps_per_epoch) + 1).

    Args:
      epoch: scalar, possibly traced.
      lambda_start, lambda_end: -decay_max and -decay_min of the reference.
      epochs: the reference's ``decay_loops``.
    """
    i = jnp.clip(jnp.asarray(epoch, jnp.float32), 0.0, epochs)
    return lambda_start + (lambda_end - lambda_start) * (1.0 - jnp.cos(jnp.pi * i / epochs)) / 2.0


def ctkd_temperature(raw, lam, t_start: float = 1.0, t_end: float = 20.0) -> jax.Array:
    """CTKD's global learnable temperature: T = t_start + t_end * sigmoid(GRL(raw, lam)).

    `raw` is the trainable scalar (initialised to 1 in the reference, so T starts at
    1 + 20 * sigmoid(1) = 15.62); the gradient-reversal layer makes the optimiser move `raw`
    to increase the distillation loss, weighted by lam (``ctkd_lambda``). T stays in
    (t_start, t_start + t_end). Reproduces zhengli97/CTKD ``Global_T`` (models/temp_global.py)
    and ``temp = t_start + t_end * sigmoid(temp)`` (helper/loops.py).

    Args:
      raw: () trainable parameter.
      lam: () reversal weight.
      t_start, t_end: the reference's ``--t_start 1 --t_end 20``.
    """
    x = gradient_reversal(_f32(raw), jnp.asarray(lam, jnp.float32))
    return t_start + t_end * jax.nn.sigmoid(x)


def mse_logits(student_logits, teacher_logits, *, where=None,
               reduction: str = "mean") -> jax.Array:
    """Squared L2 distance between logits, summed over classes, mean over positions.

    loss = mean_b sum_k (s_bk - t_bk)^2

    big_vision's ``dist(kind='l2')`` (sum over the feature axis; the trainer
    then takes ``jnp.mean`` over the batch). Note: this is K times
    ``mean((s - t)^2)`` over all elements. Paper: Beyer et al., "Knowledge
    distillation: A good teacher is patient and consistent", CVPR 2022.

    Args:
      student_logits, teacher_logits: (..., K), the same shape.
      where: optional bool mask of the leading shape (e.g. (B, T) for (B, T, K) logits); False
        marks padding, which is left out of the loss and gets zero gradient.
      reduction: 'mean' (default: over the unmasked positions; 0 if there are none), 'sum', or
        'none' (the per-position values, of the leading shape, 0 at padding).
    """
    where, _ = _check_logits("mse_logits", {"student_logits": student_logits,
                                            "teacher_logits": teacher_logits},
                             where=where, reduction=reduction)
    d = _masked(student_logits, where) - _masked(teacher_logits, where)
    return _reduce(jnp.sum(d * d, axis=-1), where, reduction)


# --------------------------------------------------------------------------
# Feature losses
# --------------------------------------------------------------------------


def fitnet(student_feat, teacher_feat) -> jax.Array:
    """FitNets hint loss: mean squared error over all elements.

    loss = mean_{b,h,w,c} (s - t)^2

    The student feature must already be regressed to the teacher's shape (the
    regressor is a trainer-side module). Paper: Romero et al., "FitNets:
    Hints for Thin Deep Nets", ICLR 2015. Reproduces RepDistiller ``HintLoss``
    (``nn.MSELoss()``, mean reduction).

    Shapes: any (B, ...) of rank >= 2, student and teacher equal: (B, H, W, C) maps,
    (B, D) embeddings, (B, T, D) token features. The mean runs over every element, padding
    included: drop padded tokens (or zero them in both) first.

    Args:
      student_feat, teacher_feat: same shape (B, ...).
    """
    _check("fitnet", {"student_feat": student_feat, "teacher_feat": teacher_feat},
           min_ndim=2, layout="(B, ...)", match="shape")
    d = _f32(student_feat) - _f32(teacher_feat)
    return jnp.mean(d * d)


def ofd_margin(scale, bias) -> jax.Array:
    """OFD's margin m per channel: E[x | x < 0] of a pre-ReLU response x ~ N(bias, scale^2).

    With s = |scale|, mu = bias and Phi the standard normal CDF:
      m = mu - s * exp(-(mu/s)^2 / 2) / sqrt(2 pi) / Phi(-mu/s)   if Phi(-mu/s) > 0.001
      m = -3 s                                                     otherwise
    (the mean of the negative part of the Gaussian; the second case for channels that are
    almost never negative). The Gaussian is the BatchNorm's affine output: scale and bias are
    the BN's gamma and beta. Paper: Heo et al. ICCV 2019, eq. (3); reproduces
    clovaai/overhaul-distillation ``get_margin_from_BN`` (CIFAR-100/distiller.py), as mdistiller
    ``OFD.init_ofd_modules``. A zero scale (a dead channel, where the reference divides by zero)
    gives m = min(mu, 0) here.

    Args:
      scale, bias: (C,) BatchNorm scale (gamma) and bias (beta).
    Returns: (C,) float32 margins (<= 0).
    """
    from jax.scipy.stats import norm  # noqa: PLC0415 (jax.scipy is not imported by `import jax`)

    _check("ofd_margin", {"scale": scale, "bias": bias}, ndim=1, layout="(C,)", match="shape")
    s, mu = jnp.abs(_f32(scale)), _f32(bias)
    safe = jnp.where(s > 0, s, 1.0)
    z = -mu / safe
    cdf = norm.cdf(z)
    gauss = mu - s * jnp.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi) / jnp.maximum(cdf, 1e-3)
    m = jnp.where(cdf > 1e-3, gauss, -3.0 * s)
    return jnp.where(s > 0, m, jnp.minimum(mu, 0.0))


def ofd(student_feat, teacher_feat, margin) -> jax.Array:
    """Overhaul of feature distillation: partial L2 to the margin-ReLU of the teacher's
    pre-ReLU map.

    With t' = max(t, m) (the margin ReLU, m the per-channel margin, `ofd_margin`) and s the
    student's map after its connector (1x1 conv + BN, a trainer-side module):
      loss = sum_{b,h,w,c} (s - t')^2 * [s > t' or t' > 0] / B
    i.e. no loss where s <= t' <= 0 (the student is already below a teacher response that the
    ReLU zeroes). Reduction: sum over positions and channels, mean over the batch (the
    reference's ``loss_distill.sum() / batch_size``; its 1/1000 factor is the term's weight).

    Paper: Heo, Kim, Yun, Park, Kwak, Choi, "A Comprehensive Overhaul of Feature Distillation",
    ICCV 2019. Reproduces clovaai/overhaul-distillation ``distillation_loss`` (CIFAR-100/
    distiller.py; mdistiller's ``feat_loss`` is the same function written as three cases).

    Args:
      student_feat: (B, H, W, C) student map, already mapped to the teacher's channels.
      teacher_feat: (B, H, W, C) teacher's pre-ReLU map, the same shape.
      margin: (C,) or (B, C) per-channel margins (<= 0).
    """
    _check("ofd", {"student_feat": student_feat, "teacher_feat": teacher_feat},
           ndim=4, layout="(B, H, W, C)", match="shape")
    m = _f32(margin)
    if m.shape[-1:] != tuple(np.shape(teacher_feat))[-1:] or m.ndim not in (1, 2):
        raise ValueError(f"ofd: margin must have shape (C,) or (B, C) with C = {np.shape(teacher_feat)[-1]}, "
                         f"got {m.shape}")
    m = m[..., None, None, :] if m.ndim == 2 else m
    s = _f32(student_feat)
    t = jnp.maximum(_f32(teacher_feat), m)
    mask = (s > t) | (t > 0)
    return jnp.sum(jnp.where(mask, (s - t) ** 2, 0.0)) / s.shape[0]


def attention_transfer(student_feat, teacher_feat, p: float = 2.0) -> jax.Array:
    """Attention transfer: match l2-normalised spatial attention maps.

    a(F) = normalize_2( flatten_{hw}( mean_c F^p ) )   per sample, eps 1e-12
    loss = mean_{b, hw} (a(F_s) - a(F_t))^2

    If spatial sizes differ the larger map is adaptive-average-pooled to the
    smaller size first (RepDistiller compares only H and pools to a square
    (H_min, H_min); here H and W are pooled to (H_min, W_min), identical for
    square maps). Channel counts may differ.

    Paper: Zagoruyko, Komodakis, "Paying More Attention to Attention", ICLR
    2017. Reproduces RepDistiller ``Attention.at_loss`` for one feature pair
    (RepDistiller's trainer sums the per-layer losses with weight beta=1000).

    Shapes: NHWC (B, H, W, C) only; H, W and C may differ between student and teacher,
    B may not.

    Args:
      student_feat: (B, H, W, Cs).
      teacher_feat: (B, H', W', Ct).
      p: power applied elementwise before the channel mean (2 in the paper;
        non-integer p needs non-negative features).
    """
    _check("attention_transfer", {"student_feat": student_feat, "teacher_feat": teacher_feat},
           ndim=4, layout="(B, H, W, C)", match="batch")
    fs, ft = _pool_to_common(_f32(student_feat), _f32(teacher_feat))

    def att(f):
        return _l2_normalize(_flat(jnp.mean(f**p, axis=-1)))

    return jnp.mean((att(fs) - att(ft)) ** 2)


def similarity_preserving(student_feat, teacher_feat) -> jax.Array:
    """Similarity-preserving KD: match row-normalised batch Gram matrices.

    Q = flatten(F) (B, N);  G = normalize_rows(Q Q^T)  (each row of the
    B x B Gram matrix scaled to unit l2 norm, eps 1e-12)
    loss = sum_{i,j} (G_s - G_t)_{ij}^2 / B^2

    Paper: Tung, Mori, "Similarity-Preserving Knowledge Distillation", ICCV
    2019. Reproduces RepDistiller ``Similarity.similarity_loss`` (note it is
    the Gram matrix rows that are normalised, not the rows of Q).

    Shapes: (B, ...) of rank >= 2, flattened per sample to (B, N); only B must match. The
    loss relates the B rows to each other, so for token features pass the unpadded tokens as
    (N, D) rows, not padded (B, T, D).

    Args:
      student_feat, teacher_feat: (B, ...) of any rank >= 2; non-batch shapes
        may differ.
    """
    _check("similarity_preserving",
           {"student_feat": student_feat, "teacher_feat": teacher_feat},
           min_ndim=2, layout="(B, ...)", match="batch")

    def gram(f):
        q = _flat(_f32(f))
        return _l2_normalize(jnp.matmul(q, q.T, precision=_HI))

    b = np.shape(student_feat)[0]
    d = gram(student_feat) - gram(teacher_feat)
    return jnp.sum(d * d) / (b * b)


def nst(student_feat, teacher_feat) -> jax.Array:
    """Neuron selectivity transfer: polynomial-kernel MMD between channel maps.

    Each channel's spatial map f_c (HW,) is l2-normalised (eps 1e-12); with
    k(x, y) = (x . y)^2,
      loss = mean_{b,c,c'} k(t_c, t_c') + mean_{b,c,c'} k(s_c, s_c')
             - 2 mean_{b,c,c'} k(s_c, t_c')
    (means over batch and channel pairs = per-sample MMD^2, batch mean).

    If spatial sizes differ the larger map is adaptive-average-pooled to the
    smaller (as RepDistiller; see ``attention_transfer`` for the square-pool
    detail). Channel counts may differ.

    Paper: Huang, Wang, "Like What You Like: Knowledge Distill via Neuron
    Selectivity Transfer", 2017. Reproduces RepDistiller ``NSTLoss.nst_loss``
    (full_loss=True); the reference detaches the teacher-teacher term, which
    is a constant w.r.t. the student anyway.

    Shapes: NHWC (B, H, W, C) only; H, W and C may differ between student and teacher,
    B may not.

    Args:
      student_feat: (B, H, W, Cs).
      teacher_feat: (B, H', W', Ct).
    """
    _check("nst", {"student_feat": student_feat, "teacher_feat": teacher_feat},
           ndim=4, layout="(B, H, W, C)", match="batch")
    fs, ft = _pool_to_common(_f32(student_feat), _f32(teacher_feat))

    def chan(f):  # (B, C, HW), each channel map unit-norm
        b, h, w, c = f.shape
        return _l2_normalize(jnp.transpose(f.reshape(b, h * w, c), (0, 2, 1)))

    def kmean(x, y):
        return jnp.mean(jnp.einsum("bcn,bdn->bcd", x, y, precision=_HI) ** 2)

    s, t = chan(fs), chan(ft)
    return kmean(t, t) + kmean(s, s) - 2.0 * kmean(s, t)


def vid(student_mean, teacher_feat, variance) -> jax.Array:
    """Variational information distillation: Gaussian negative log-likelihood.

    loss = mean_{all elements} 0.5 * ( (mu - t)^2 / var_c + log var_c )

    (the constant 0.5 log 2 pi is dropped, as in the reference). The trainer
    owns the regressor that produces ``student_mean`` and the variance
    parameters; RepDistiller parametrises var = softplus(raw) + 1e-5 with raw
    initialised so that var = 5.0, per channel. Spatial pooling of mismatched
    maps (RepDistiller pools before its regressor) is also the trainer's job.

    Paper: Ahn, Hu, Damianou, Lawrence, Dai, "Variational Information
    Distillation for Knowledge Transfer", CVPR 2019. Reproduces RepDistiller
    ``VIDLoss.forward`` given the regressor output.

    Shapes: ``student_mean`` and ``teacher_feat`` equal, (B, ..., C) of rank >= 2 (NHWC maps,
    (B, D), (B, T, D)); ``variance`` (C,). Mean over every element, padding included.

    Args:
      student_mean: (B, ..., C) predicted mean mu (regressed student feature).
      teacher_feat: same shape as ``student_mean``.
      variance: (C,) positive per-channel variance, broadcast over the last axis.
    """
    _check("vid", {"student_mean": student_mean, "teacher_feat": teacher_feat},
           min_ndim=2, layout="(B, ..., C)", match="shape")
    _check("vid", {"variance": variance}, ndim=1, layout="(C,)")
    _check("vid", {"teacher_feat": teacher_feat, "variance": variance}, match="last")
    var = _f32(variance)
    d = _f32(student_mean) - _f32(teacher_feat)
    return jnp.mean(0.5 * (d * d / var + jnp.log(var)))


def hcl(student_feats: Sequence[Any], teacher_feats: Sequence[Any]) -> jax.Array:
    """ReviewKD hierarchical context loss, summed over feature levels.

    For each pair (s, t) of NHWC maps with height h:
      level = mse(s, t) + sum_i w_i * mse(pool_l(s), pool_l(t)),
      over l in (4, 2, 1) with l < h, w_i = 1/2, 1/4, 1/8 for the 1st, 2nd,
      3rd level actually used; pool_l = adaptive average pool to (l, l);
      level /= (1 + sum_i w_i);
    loss = sum over levels (not mean). mse is the mean over all elements.

    Paper: Chen, Liu, Zhao, Jia, "Distilling Knowledge via Knowledge Review",
    CVPR 2021. Reproduces mdistiller ``ReviewKD.hcl_loss``.

    Shapes: two equal-length lists of NHWC (B, H, W, C) maps, the i-th pair of equal shape.

    Args:
      student_feats, teacher_feats: equal-length sequences of (B, H, W, C)
        arrays; the i-th student and teacher maps must have the same shape
        (ReviewKD's ABF modules produce teacher-shaped student maps).
    """
    student_feats, teacher_feats = list(student_feats), list(teacher_feats)
    if len(student_feats) != len(teacher_feats):
        raise ValueError(
            f"hcl: student_feats and teacher_feats must have the same length, got "
            f"{len(student_feats)} and {len(teacher_feats)}")
    total = jnp.zeros((), jnp.float32)
    for i, (fs, ft) in enumerate(zip(student_feats, teacher_feats)):
        _check("hcl", {f"student_feats[{i}]": fs, f"teacher_feats[{i}]": ft},
               ndim=4, layout="(B, H, W, C)", match="shape")
        fs, ft = _f32(fs), _f32(ft)
        h = fs.shape[1]
        loss = jnp.mean((fs - ft) ** 2)
        cnt, tot = 1.0, 1.0
        for l in (4, 2, 1):
            if l >= h:
                continue
            cnt /= 2.0
            d = _adaptive_avg_pool(fs, (l, l)) - _adaptive_avg_pool(ft, (l, l))
            loss = loss + jnp.mean(d * d) * cnt
            tot += cnt
        total = total + loss / tot
    return total


def _pair_lists(fn: str, student_feats, teacher_feats) -> tuple[list, list]:
    """Two equal-length lists of NHWC maps (the i-th student map goes with the i-th teacher's)."""
    student_feats, teacher_feats = list(student_feats), list(teacher_feats)
    if len(student_feats) != len(teacher_feats):
        raise ValueError(f"{fn}: student_feats and teacher_feats must have the same length, got "
                         f"{len(student_feats)} and {len(teacher_feats)}")
    for i, (fs, ft) in enumerate(zip(student_feats, teacher_feats)):
        _check(fn, {f"student_feats[{i}]": fs, f"teacher_feats[{i}]": ft},
               ndim=4, layout="(B, H, W, C)", match="batch")
    return student_feats, teacher_feats


def _same_widths(fn: str, student_feats, teacher_feats, why: str) -> None:
    for i, (fs, ft) in enumerate(zip(student_feats, teacher_feats)):
        cs, ct = np.shape(fs)[-1], np.shape(ft)[-1]
        if cs != ct:
            raise ValueError(f"{fn}: student_feats[{i}] has {cs} channels and teacher_feats[{i}] {ct}; {why}, "
                             "so every paired map needs the same width (choose a student as wide as the teacher)")


@jax.custom_vjp
def _eigh_desc(g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eigen-decomposition of symmetric (B, n, n) matrices, eigenvalues in descending order.

    One matrix per LAPACK call (`lax.map`): jaxlib's CPU eigh spreads a batch over XLA's
    intra-op thread pool and blocks until it is done, which deadlocks now and then when several
    devices of one process run it at once (2 host devices under shard_map: 5 hangs in 6 runs of a
    kdsvd gradient step, jaxlib 0.10.2); with one matrix per call nothing is spread."""
    w, v = jax.lax.map(jnp.linalg.eigh, g)
    return w[..., ::-1], v[..., ::-1]


def _eigh_desc_fwd(g):
    out = _eigh_desc(g)
    return out, out


def _eigh_desc_bwd(res, cot):
    """The eigh gradient V (diag(gw) + F o (V^T gV)) V^T with F_ij = 1 / (w_j - w_i), except that
    F is 0 where the two eigenvalues (nearly) coincide: the usual formula is inf * 0 = NaN there
    (e.g. the many zero eigenvalues of a low-rank Gram matrix), although only the leading
    eigenvectors carry a cotangent. Symmetrised, as the input is symmetric."""
    w, v = res
    gw, gv = cot
    diff = w[..., None, :] - w[..., :, None]  # [i, j] = w_j - w_i
    tol = 1e-6 * jnp.maximum(jnp.max(jnp.abs(w), axis=-1, keepdims=True)[..., None], 1e-30)
    safe = jnp.abs(diff) > tol
    f = jnp.where(safe, 1.0 / jnp.where(safe, diff, 1.0), 0.0)
    inner = f * jnp.einsum("...ki,...kj->...ij", v, gv, precision=_HI)
    inner = inner + gw[..., None, :] * jnp.eye(w.shape[-1], dtype=w.dtype)
    grad = jnp.einsum("...ik,...kl,...jl->...ij", v, inner, v, precision=_HI)
    return (0.5 * (grad + jnp.swapaxes(grad, -1, -2)),)


_eigh_desc.defvjp(_eigh_desc_fwd, _eigh_desc_bwd)


def _canonical_sign(v: jax.Array) -> jax.Array:
    """Flips each column of (..., n, k) so that its largest-magnitude entry is positive."""
    idx = jnp.argmax(jnp.abs(v), axis=-2, keepdims=True)
    sign = jnp.sign(jnp.take_along_axis(v, idx, axis=-2))
    return v * jnp.where(sign == 0, 1.0, sign)


def _gram(f: jax.Array) -> jax.Array:
    """(B, H, W, C) -> X^T X of X = (B, HW, C): (B, C, C)."""
    x = f.reshape(f.shape[0], -1, f.shape[-1])
    return jnp.einsum("bkc,bkd->bcd", x, x, precision=_HI)


def _top_singular(lam: jax.Array, v: jax.Array, n: int, hw: int) -> tuple[jax.Array, jax.Array]:
    """Eigenpairs of X^T X (descending) -> the leading n singular values of X = (B, HW, C),
    l2-normalised over the n, and the matching right singular vectors (B, C, n), sign-canonical
    (`_canonical_sign`); n is capped at min(HW, C) as a thin SVD returns no more."""
    n = min(n, hw, v.shape[-1])
    s = _safe_sqrt(jnp.maximum(lam[:, :n], 0.0))
    return _l2_normalize(s), _canonical_sign(v[:, :, :n])


def kdsvd(student_feats: Sequence[Any], teacher_feats: Sequence[Any], k: int = 1) -> jax.Array:
    """KDSVD: RBF relations between the leading singular vectors of consecutive feature maps.

    Per map i, X_i = reshape(F_i, (B, HW, C)). The teacher's k leading right singular vectors
    V_t (B, C, k) and singular values s_t (l2-normalised over the k), the student's k + 3 leading
    V_s; each teacher vector is matched with the student vector of largest |cosine|, times the
    sign of that cosine (V_s <- V_s M, M one signed 1 per column); both scaled by s_t. For i > 0,
      R(V_i, V_{i-1})[b, c, c', j] = exp(-(V_i[b, c, j] - V_{i-1}[b, c', j])^2 / 8)
      loss_i = sum_{b,c,c',j} (R_s - R_t)^2 / B
    loss = sum_{i>0} loss_i (one map: 0).

    Sign convention: an SVD determines each singular vector only up to sign, and R(V_i, V_{i-1})
    depends on the teacher's signs (the student's are aligned to the teacher's), so the reference
    value depends on the SVD routine's choice. Here every singular vector is made sign-canonical,
    its largest-magnitude entry positive, so every backend gives the same loss. The decomposition is
    the eigen-decomposition of X^T X with a gradient that is 0 (not NaN) for the pairs of coinciding
    eigenvalues (the reference zeroes NaN values, not gradients; the original TensorFlow code uses
    a custom SVD gradient for the same reason).

    Paper: Lee, Kim, Song, "Self-supervised Knowledge Distillation Using Singular Value
    Decomposition", ECCV 2018 (sseung0703/SSKD_SVD). Reproduces RepDistiller ``KDSVD`` (k = 1),
    which reshapes as the original code, (B, HW, C); mdistiller ``kdsvd_loss`` views its NCHW
    tensor as (B, C*H, W) instead (singular vectors over the width), which is not followed here.

    Shapes: equal-length lists of NHWC (B, H, W, C) maps in forward order; the i-th student and
    teacher maps need the same channel count C_i (H, W may differ).

    Args:
      student_feats, teacher_feats: equal-length sequences of (B, H, W, C_i) maps.
      k: number of teacher singular vectors (the student keeps k + 3 candidates).
    """
    student_feats, teacher_feats = _pair_lists("kdsvd", student_feats, teacher_feats)
    _same_widths("kdsvd", student_feats, teacher_feats, "KDSVD matches singular vectors over channels")
    total = jnp.zeros((), jnp.float32)
    prev = None
    for fs, ft in zip(student_feats, teacher_feats):
        g = jnp.concatenate([_gram(_f32(fs)), _gram(_f32(ft))])  # student and teacher: one decomposition
        lam, vecs = _eigh_desc(g)
        b = fs.shape[0]
        _, v_s = _top_singular(lam[:b], vecs[:b], k + 3, fs.shape[1] * fs.shape[2])
        s_t, v_t = _top_singular(lam[b:], vecs[b:], k, ft.shape[1] * ft.shape[2])
        cos = jnp.einsum("bcm,bcj->bmj", v_s, v_t, precision=_HI)
        best = jnp.max(jnp.abs(cos), axis=1, keepdims=True)
        v_s = jnp.einsum("bcm,bmj->bcj", v_s, jnp.where(jnp.abs(cos) == best, jnp.sign(cos), 0.0),
                         precision=_HI)
        v_t, v_s = v_t * s_t[:, None, :], v_s * s_t[:, None, :]
        if prev is not None:
            rbf = lambda a, b: jnp.exp(-((a[:, :, None, :] - b[:, None, :, :]) ** 2) / 8.0)
            d = rbf(v_s, prev[0]) - rbf(v_t, prev[1])
            total = total + jnp.sum(d * d) / fs.shape[0]
        prev = (v_s, v_t)
    return total


def fsp(student_feats: Sequence[Any], teacher_feats: Sequence[Any]) -> jax.Array:
    """FSP ("flow of solution procedure") matrices of consecutive feature maps.

    For consecutive maps (bottom F_i, top F_{i+1}) the larger is adaptive-average-pooled to the
    smaller's size, then G[b, c, c'] = mean_{hw} F_i[b, hw, c] * F_{i+1}[b, hw, c'];
      loss = sum_i mean_{b,c,c'} (G_s^(i) - G_t^(i))^2
    (n maps give n - 1 matrices; the mean is over batch and both channel axes).

    Paper: Yim, Joo, Bae, Kim, "A Gift from Knowledge Distillation: Fast Optimization, Network
    Minimization and Transfer Learning", CVPR 2017. Reproduces RepDistiller ``FSP`` (whose trainer
    sums the per-pair losses; it pools to a square (H_min, H_min), here (H_min, W_min), the same
    for square maps, as ``attention_transfer``).

    Shapes: equal-length lists of NHWC (B, H, W, C) maps in forward order; the i-th student and
    teacher maps need the same channel count (RepDistiller refuses otherwise too); H, W may differ.

    Args:
      student_feats, teacher_feats: equal-length sequences (>= 2) of (B, H, W, C_i) maps.
    """
    student_feats, teacher_feats = _pair_lists("fsp", student_feats, teacher_feats)
    _same_widths("fsp", student_feats, teacher_feats, "FSP matrices are channels x channels")
    if len(student_feats) < 2:
        raise ValueError(f"fsp: needs at least 2 feature maps (FSP relates consecutive maps), got {len(student_feats)}")

    def matrices(feats):
        out = []
        for bot, top in zip(feats[:-1], feats[1:]):
            bot, top = _pool_to_common(_f32(bot), _f32(top))
            out.append(jnp.einsum("bhwc,bhwd->bcd", bot, top, precision=_HI) / (bot.shape[1] * bot.shape[2]))
        return out

    return sum(jnp.mean((gs - gt) ** 2) for gs, gt in zip(matrices(student_feats), matrices(teacher_feats)))


def activation_boundary(student_feats: Sequence[Any], teacher_feats: Sequence[Any],
                        margin: float = 1.0) -> jax.Array:
    """AB: the student's (pre-)activations on the teacher's side of every neuron's boundary.

    Per level i (of n), with the student's map s (regressed to the teacher's shape) and the
    teacher's t, elementwise
      l = (s + m)^2 [s > -m and t <= 0] + (s - m)^2 [s <= m and t > 0]
    loss = sum_i 2^(i - n + 1) * sum_{b,h,w,c} l / B * 3 / 1000
    (the deepest level weighs 1, each shallower one half the next).

    Paper: Heo, Lee, Yun, Choi, "Knowledge Transfer via Distillation of Activation Boundaries
    Formed by Hidden Neurons", AAAI 2019 (bhheo/AB_distillation). Reproduces RepDistiller
    ``ABLoss`` (its trainer sums the levels; the 3/1000 scale is the reference's). The reference
    reads pre-ReLU maps; the teacher's side is the same for post-ReLU maps (t > 0 iff relu(t) > 0).

    Shapes: equal-length lists of NHWC (B, H, W, C) maps, the i-th pair of equal shape.

    Args:
      student_feats, teacher_feats: equal-length sequences of (B, H, W, C) maps.
      margin: m.
    """
    student_feats, teacher_feats = _pair_lists("activation_boundary", student_feats, teacher_feats)
    n = len(student_feats)
    total = jnp.zeros((), jnp.float32)
    for i, (s, t) in enumerate(zip(student_feats, teacher_feats)):
        _check("activation_boundary", {f"student_feats[{i}]": s, f"teacher_feats[{i}]": t}, match="shape")
        s, t = _f32(s), _f32(t)
        l = ((s + margin) ** 2 * ((s > -margin) & (t <= 0)) + (s - margin) ** 2 * ((s <= margin) & (t > 0)))
        total = total + 2.0 ** (i - n + 1) * jnp.sum(l) / s.shape[0] / 1000.0 * 3.0
    return total


def factor_transfer(student_factor, teacher_factor, p1: float = 2.0, p2: float = 1.0) -> jax.Array:
    """FT factor loss: distance of the l2-normalised channel-mean factors.

    factor(F) = normalize_2(flatten_{hw}(mean_c F^p1))   per sample, eps 1e-12
    loss = mean_{b,hw} |factor(F_s) - factor(F_t)|     (p2 = 1)
           mean_{b,hw} (factor(F_s) - factor(F_t))^p2  (otherwise)

    The factors are the outputs of the student's translator and the teacher's paraphraser
    (trainer-side modules). If spatial sizes differ the larger is adaptive-average-pooled to the
    smaller first (RepDistiller pools to a square, see ``attention_transfer``).

    Paper: Kim, Park, Kwak, "Paraphrasing Complex Network: Network Compression via Factor
    Transfer", NeurIPS 2018. Reproduces RepDistiller ``FactorTransfer`` (p1 = 2, p2 = 1): it
    normalises the mean over channels, where the paper normalises the flattened factor.

    Shapes: NHWC (B, H, W, C); H, W and C may differ between student and teacher, B may not.

    Args:
      student_factor: (B, H, W, Cs) translator output.
      teacher_factor: (B, H', W', Ct) paraphraser (encoder) output.
      p1: power before the channel mean.
      p2: 1 for the mean absolute difference, else the power of the difference.
    """
    _check("factor_transfer", {"student_factor": student_factor, "teacher_factor": teacher_factor},
           ndim=4, layout="(B, H, W, C)", match="batch")
    fs, ft = _pool_to_common(_f32(student_factor), _f32(teacher_factor))
    factor = lambda f: _l2_normalize(_flat(jnp.mean(f**p1, axis=-1)))
    d = factor(fs) - factor(ft)
    return jnp.mean(jnp.abs(d)) if p2 == 1 else jnp.mean(d**p2)


# --------------------------------------------------------------------------
# Embedding / relational losses
# --------------------------------------------------------------------------


def rkd(student_emb, teacher_emb, distance_weight: float = 25.0,
        angle_weight: float = 50.0) -> jax.Array:
    """Relational KD: distance-wise and angle-wise structure matching.

    Inputs are flattened to (B, N). Distance term: d_ij = ||e_i - e_j||
    (computed as sqrt(max(|e_i|^2 + |e_j|^2 - 2 e_i.e_j, 1e-12)), diagonal 0),
    divided by the mean of its positive entries; L_d = mean_{ij} huber(d_s - d_t).
    Angle term: u_ij = normalize(e_j - e_i) (eps 1e-12; u_ii = 0),
    A_ijk = u_ij . u_ik; L_a = mean_{ijk} huber(A_s - A_t) (over all B^3
    entries, including the zero ones). huber = smooth-L1 with delta 1.
    loss = distance_weight * L_d + angle_weight * L_a.

    Paper: Park, Kim, Lu, Cho, "Relational Knowledge Distillation", CVPR 2019.
    Reproduces RepDistiller ``RKDLoss`` (the reference computes the teacher
    side under no_grad; no stop_gradient here).

    Shapes: (B, ...) of rank >= 2, flattened per sample; only B must match. Relational over
    the B rows (B x B distances, B^3 angles): pass unpadded token rows (N, D) for sequences.

    Args:
      student_emb: (B, ...) flattened to (B, Ns).
      teacher_emb: (B, ...) flattened to (B, Nt); Ns may differ from Nt.
      distance_weight: w_d (25 in RepDistiller).
      angle_weight: w_a (50 in RepDistiller).
    """
    _check("rkd", {"student_emb": student_emb, "teacher_emb": teacher_emb},
           min_ndim=2, layout="(B, ...)", match="batch")
    s, t = _flat(_f32(student_emb)), _flat(_f32(teacher_emb))

    def pdist(e):
        sq = jnp.sum(e * e, axis=1)
        d2 = sq[:, None] + sq[None, :] - 2.0 * jnp.matmul(e, e.T, precision=_HI)
        d = jnp.sqrt(jnp.maximum(d2, 1e-12))
        d = jnp.where(jnp.eye(e.shape[0], dtype=bool), 0.0, d)
        pos = d > 0
        return d / (jnp.sum(jnp.where(pos, d, 0.0)) / jnp.sum(pos))

    def angles(e):
        u = _l2_normalize(e[None, :, :] - e[:, None, :])  # u[i, j] = e_j - e_i
        return jnp.einsum("ijd,ikd->ijk", u, u, precision=_HI)

    loss_d = jnp.mean(optax.losses.huber_loss(pdist(s), pdist(t), delta=1.0))
    loss_a = jnp.mean(optax.losses.huber_loss(angles(s), angles(t), delta=1.0))
    return distance_weight * loss_d + angle_weight * loss_a


def pkt(student_emb, teacher_emb, eps: float = 1e-7) -> jax.Array:
    """Probabilistic knowledge transfer via cosine-similarity distributions.

    x_i <- x_i / (||x_i|| + eps) (NaNs replaced by 0); S = x x^T;
    P = (S + 1) / 2 with rows normalised to sum 1 (for student and teacher);
    loss = mean_{i,j} P_t,ij * log( (P_t,ij + eps) / (P_s,ij + eps) )
    (mean over all B^2 entries, i.e. the per-row KL summed and divided by B^2).

    Paper: Passalis, Tefas, "Learning Deep Representations with Probabilistic
    Knowledge Transfer", ECCV 2018. Reproduces RepDistiller
    ``PKT.cosine_similarity_loss``.

    Shapes: (B, ...) of rank >= 2, flattened per sample; only B must match. Relational over
    the B rows (B x B similarities): pass unpadded token rows (N, D) for sequences.

    Args:
      student_emb: (B, ...) flattened to (B, Ds).
      teacher_emb: (B, ...) flattened to (B, Dt); Ds may differ from Dt.
      eps: stabiliser in the norm and in the log ratio (1e-7 in the reference).
    """
    _check("pkt", {"student_emb": student_emb, "teacher_emb": teacher_emb},
           min_ndim=2, layout="(B, ...)", match="batch")

    def cond_prob(e):
        e = _flat(_f32(e))
        e = e / (_norm(e, axis=1) + eps)
        e = jnp.where(jnp.isnan(e), 0.0, e)
        sim = (jnp.matmul(e, e.T, precision=_HI) + 1.0) / 2.0
        return sim / jnp.sum(sim, axis=1, keepdims=True)

    ps, pt = cond_prob(student_emb), cond_prob(teacher_emb)
    return jnp.mean(pt * jnp.log((pt + eps) / (ps + eps)))


def correlation_congruence(student_emb, teacher_emb, gamma: float = 0.4, order: int = 2,
                           normalize: bool = False) -> jax.Array:
    """Correlation congruence KD with a Taylor-expanded Gaussian RBF kernel.

    C_ij = exp(-2 gamma) * sum_{p=0}^{order} (2 gamma)^p / p! * (x_i . x_j)^p
    (the order-P Taylor expansion of exp(-gamma ||x_i - x_j||^2), exact in
    the limit for unit-norm x), for the student and the teacher batch (B x B);
    loss = ||C_s - C_t||_F / B^2   (Frobenius norm, NOT squared).

    Paper: Peng, Jin, Liu, Zhou, Wu, Liu, Li, Zhang, "Correlation Congruence
    for Knowledge Distillation", ICCV 2019. Reproduces torchdistill
    ``CCKDLoss`` (kernel 'gaussian', reduction 'batchmean'), which uses the raw
    (linear-projected) embeddings without l2 normalisation. Other CC ports
    (e.g. CIRKD / image_classification_sota ``CC``) first l2-normalise and use
    ``mse_loss`` instead; ``normalize=True`` enables only the former.

    Shapes: (B, ...) of rank >= 2, flattened per sample; only B must match. Relational
    over the B rows (B x B kernel): pass unpadded token rows (N, D) for sequences.

    Args:
      student_emb: (B, ...) flattened to (B, Ds).
      teacher_emb: (B, ...) flattened to (B, Dt); Ds may differ from Dt.
      gamma: RBF kernel width gamma (0.4 in torchdistill's configs).
      order: P, the Taylor expansion order (torchdistill ``max_p``, 2).
      normalize: l2-normalise embeddings first (not done by torchdistill).
    """
    _check("correlation_congruence", {"student_emb": student_emb, "teacher_emb": teacher_emb},
           min_ndim=2, layout="(B, ...)", match="batch")

    def corr(e):
        e = _flat(_f32(e))
        if normalize:
            e = _l2_normalize(e)
        dots = jnp.matmul(e, e.T, precision=_HI)
        c = jnp.ones_like(dots)
        for p in range(1, order + 1):
            c = c + (2.0 * gamma) ** p / math.factorial(p) * dots**p
        return c * jnp.exp(-2.0 * gamma)

    b = np.shape(student_emb)[0]
    d = corr(student_emb) - corr(teacher_emb)
    return _safe_sqrt(jnp.sum(d * d)) / (b * b)


def cosine_distance(student_emb, teacher_emb, eps: float = 1e-8) -> jax.Array:
    """Batch mean of 1 - cosine similarity.

    loss = mean_b [ 1 - <s_b, t_b> / (max(||s_b||, eps) max(||t_b||, eps)) ]

    Inputs are flattened to (B, N) and must have the same shape. Uses
    ``optax.losses.cosine_distance`` (whose epsilon floors the squared norm,
    so it is passed eps^2). Common embedding-matching loss (e.g. big_vision
    feature distillation, DeiT-style); no single reference.

    Shapes: (B, ...) of rank >= 2, student and teacher equal, flattened per sample to
    (B, N); one distance per row, batch mean (for (B, T, D) tokens: reshape to (B*T, D) and
    drop the padded rows).

    Args:
      student_emb, teacher_emb: (B, ...) of the same shape.
      eps: lower bound on each vector norm.
    """
    _check("cosine_distance", {"student_emb": student_emb, "teacher_emb": teacher_emb},
           min_ndim=2, layout="(B, ...)", match="shape")
    s, t = _flat(_f32(student_emb)), _flat(_f32(teacher_emb))
    return jnp.mean(optax.losses.cosine_distance(s, t, epsilon=eps * eps))


def discriminator_bce(real_logits, fake_logits) -> jax.Array:
    """Binary cross-entropy of a discriminator that tells real (label 1) from fake (label 0).

    loss = mean_i softplus(-r_i) + mean_j softplus(f_j)
         = -mean_i log sigmoid(r_i) - mean_j log(1 - sigmoid(f_j))

    with r the discriminator's logits on real samples (adversarial distillation: the teacher's
    outputs) and f those on fake samples (the student's). Each half is a mean over its own
    elements, then the two are summed: torch ``BCEWithLogitsLoss()(d_real, ones) +
    BCEWithLogitsLoss()(d_fake, zeros)``, the discriminator loss of the GAN recipe (Goodfellow et
    al. NeurIPS 2014; the PyTorch DCGAN example's errD_real + errD_fake). 2 log 2 = 1.386 when the
    discriminator cannot tell the two apart. The discriminator descends it; in the generator's
    (student's) minimax objective the student ascends it.

    Papers: Xu, Hsu, Huang, "Training Shallow and Thin Networks for Acceleration via Knowledge
    Distillation with Conditional Adversarial Networks", ICLR workshop 2018 (the discriminator
    reads logits, conditioned on the label); Wang, Zhang, Sun, Qi, "KDGAN: Knowledge Distillation
    with Generative Adversarial Networks", NeurIPS 2018, whose official code (xiaojiew94/KDGAN
    @8f1367d, arxiv/kdgan/mdlcompr_cifar/dis_model.py) trains its discriminator with the same sigmoid
    cross-entropy (``tf.losses.sigmoid_cross_entropy``, mean reduction).

    Shapes: ``real_logits`` (B, ...) and ``fake_logits`` (B', ...) of rank >= 1 (one logit per
    sample, e.g. (B,) or (B, 1)); the two batches may differ in size.

    Args:
      real_logits: discriminator logits of the real samples.
      fake_logits: discriminator logits of the fake samples.
    """
    _check("discriminator_bce", {"real_logits": real_logits, "fake_logits": fake_logits}, min_ndim=1,
           layout="(B, ...)")
    return jnp.mean(jax.nn.softplus(-_f32(real_logits))) + jnp.mean(jax.nn.softplus(_f32(fake_logits)))


# --------------------------------------------------------------------------
# CRD: contrastive representation distillation (explicit state)
# --------------------------------------------------------------------------


def crd_init_memory(rng: jax.Array, num_data: int, dim: int) -> dict[str, jax.Array]:
    """Initial CRD memory: two (num_data, dim) banks and two unset constants Z.

    Banks are uniform in [-stdv, stdv], stdv = 1 / sqrt(dim / 3) (RepDistiller
    ``ContrastMemory``; rows are not normalised until first updated).

    Returns:
      ``{"bank_s": (N, D) student-embedding bank (RepDistiller memory_v1),
         "bank_t": (N, D) teacher-embedding bank (memory_v2),
         "z_s": () normaliser of student-anchor scores (Z_v1), -1 = unset,
         "z_t": () normaliser of teacher-anchor scores (Z_v2), -1 = unset}``.
    """
    stdv = 1.0 / math.sqrt(dim / 3.0)
    ks, kt = jax.random.split(rng)
    init = lambda k: jax.random.uniform(k, (num_data, dim), jnp.float32, -stdv, stdv)
    return {"bank_s": init(ks), "bank_t": init(kt),
            "z_s": jnp.full((), -1.0, jnp.float32), "z_t": jnp.full((), -1.0, jnp.float32)}


def crd_sample_negatives(rng: jax.Array, indices, num_data: int, num_negatives: int, *,
                         labels=None, dataset_labels=None, replace: bool = False) -> jax.Array:
    """Sample CRD negative indices, uniformly, excluding each positive.

    Without labels, row b is drawn from {0..N-1} minus {indices[b]}. With
    ``labels`` (B,) and ``dataset_labels`` (N,), row b is drawn from the
    samples whose class differs from labels[b] — RepDistiller's
    ``CIFAR100InstanceSample(mode='exact')``, which samples negatives from
    ``cls_negative[target]`` without replacement (when enough exist).

    replace=False uses the top-k of masked uniform keys (B x N work);
    replace=True uses an exact index shift over the class-sorted dataset.
    Requires num_negatives <= the number of allowed samples per row
    (not checkable at trace time when labels are traced).

    Args:
      rng: PRNG key.
      indices: (B,) dataset indices of the positives.
      num_data: N, dataset size (= memory bank rows).
      num_negatives: K negatives per positive (RepDistiller nce_k = 16384).
      labels, dataset_labels: optional, both or neither (see above).
      replace: sample with replacement.

    Returns:
      (B, K) int32 negative indices.
    """
    _check("crd_sample_negatives", {"indices": indices}, ndim=1, layout="(B,)")
    if (labels is None) != (dataset_labels is None):
        raise ValueError("crd_sample_negatives: pass both labels and dataset_labels, or neither")
    if not replace and num_negatives > num_data - 1:
        raise ValueError(f"crd_sample_negatives: num_negatives must be <= num_data - 1, "
                         f"got {num_negatives} and num_data {num_data}")
    indices = jnp.asarray(indices, jnp.int32)
    if labels is None:  # every sample is its own class
        labels, dataset_labels = indices, jnp.arange(num_data, dtype=jnp.int32)
    else:
        _check("crd_sample_negatives", {"indices": indices, "labels": labels}, match="batch")
        _check("crd_sample_negatives", {"dataset_labels": dataset_labels}, ndim=1, layout="(N,)")
    labels = jnp.asarray(labels, jnp.int32)
    dataset_labels = jnp.asarray(dataset_labels, jnp.int32)
    b = indices.shape[0]
    if not replace:
        keys = jax.random.uniform(rng, (b, num_data))
        same = dataset_labels[None, :] == labels[:, None]
        keys = jnp.where(same, 2.0, keys)  # excluded entries are never among the smallest
        return jax.lax.top_k(-keys, num_negatives)[1].astype(jnp.int32)
    order = jnp.argsort(dataset_labels, stable=True)
    sorted_labels = dataset_labels[order]
    start = jnp.searchsorted(sorted_labels, labels, side="left")
    count = jnp.searchsorted(sorted_labels, labels, side="right") - start
    u = jax.random.uniform(rng, (b, num_negatives))
    r = jnp.floor(u * (num_data - count)[:, None]).astype(jnp.int32)
    r = jnp.minimum(r, (num_data - count - 1)[:, None])
    r = jnp.where(r >= start[:, None], r + count[:, None], r)
    return order[r].astype(jnp.int32)


def crd_contrast_loss(probs, num_data: int, eps: float = 1e-7) -> jax.Array:
    """CRD noise-contrastive loss on normalised scores (RepDistiller ContrastLoss).

    probs[:, 0] is the positive P, probs[:, 1:] the m negatives; Pn = 1/N.
      log D1 = log( P_pos / (P_pos + m Pn + eps) )
      log D0 = log( m Pn / (P_neg + m Pn + eps) )
      loss = -( sum_b log D1 + sum_{b,j} log D0 ) / B

    Paper: Tian, Krishnan, Isola, "Contrastive Representation Distillation",
    ICLR 2020 (Eq. 18). Reproduces RepDistiller crd/criterion.py ContrastLoss.

    Shapes: (B, 1 + m) only.

    Args:
      probs: (B, 1 + m) scores exp(<bank_row, emb>/T) / Z.
      num_data: N, the dataset size defining the noise distribution Pn = 1/N.
      eps: 1e-7 as in the reference.
    """
    _check("crd_contrast_loss", {"probs": probs}, ndim=2, layout="(B, 1 + m)")
    x = _f32(probs)
    b, m = x.shape[0], x.shape[1] - 1
    mpn = m / float(num_data)
    log_d1 = jnp.log(x[:, 0] / (x[:, 0] + mpn + eps))
    log_d0 = jnp.log(mpn / (x[:, 1:] + mpn + eps))
    return -(jnp.sum(log_d1) + jnp.sum(log_d0)) / b


def crd_nce(student_emb, teacher_emb, memory: Mapping[str, jax.Array], indices,
            negative_indices, temperature: float = 0.07
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """CRD loss (both anchors) from explicit memory; returns (loss, memory).

    With idx = [indices, negative_indices] (B, 1 + m) and N = bank rows:
      out_s = exp(<bank_t[idx], s_b> / T) / Z_s   (student anchor, teacher bank)
      out_t = exp(<bank_s[idx], t_b> / T) / Z_t   (teacher anchor, student bank)
      loss = crd_contrast_loss(out_s, N) + crd_contrast_loss(out_t, N)
    Z is frozen state: when ``memory['z_*'] < 0`` (first call) it is set to
    mean(exp scores) * N from this batch, as RepDistiller does, and returned in
    the new memory. Bank rows and Z are constants (stop_gradient). The banks
    themselves are not modified here: call ``crd_update_memory`` after the
    loss, mirroring the reference order (score with old bank, then update).

    Paper: Tian, Krishnan, Isola, "Contrastive Representation Distillation",
    ICLR 2020. Reproduces RepDistiller ``CRDLoss`` minus the ``Embed``
    projections (trainer-side modules: linear + l2 normalisation).

    Shapes: embeddings (B, D), indices (B,), negative_indices (B, m); memory banks (N, D).

    Args:
      student_emb, teacher_emb: (B, D) l2-normalised projected embeddings.
      memory: from ``crd_init_memory`` (or a previous call).
      indices: (B,) dataset indices of the batch (the positives).
      negative_indices: (B, m) dataset indices of negatives
        (``crd_sample_negatives``).
      temperature: T (RepDistiller nce_t = 0.07).

    Returns:
      (loss, memory with z_s / z_t set).
    """
    _check("crd_nce", {"student_emb": student_emb, "teacher_emb": teacher_emb},
           ndim=2, layout="(B, D)", match="shape")
    _check("crd_nce", {"indices": indices}, ndim=1, layout="(B,)")
    _check("crd_nce", {"negative_indices": negative_indices}, ndim=2, layout="(B, m)")
    _check("crd_nce", {"student_emb": student_emb, "indices": indices,
                       "negative_indices": negative_indices}, match="batch")
    _check("crd_nce", {"student_emb": student_emb, "bank_s": memory["bank_s"],
                       "bank_t": memory["bank_t"]}, match="last")
    s, t = _f32(student_emb), _f32(teacher_emb)
    idx = jnp.concatenate([jnp.asarray(indices)[:, None], jnp.asarray(negative_indices)], 1)
    n = memory["bank_s"].shape[0]

    def scores(bank, emb):
        rows = jax.lax.stop_gradient(bank[idx])  # (B, 1 + m, D)
        return jnp.exp(jnp.einsum("bkd,bd->bk", rows, emb, precision=_HI) / temperature)

    out_s, out_t = scores(memory["bank_t"], s), scores(memory["bank_s"], t)

    def z(old, out):
        first = jax.lax.stop_gradient(jnp.mean(out) * n)
        return jnp.where(old < 0, first, old).astype(jnp.float32)

    z_s, z_t = z(memory["z_s"], out_s), z(memory["z_t"], out_t)
    loss = crd_contrast_loss(out_s / z_s, n) + crd_contrast_loss(out_t / z_t, n)
    return loss, {**memory, "z_s": z_s, "z_t": z_t}


def crd_update_memory(memory: Mapping[str, jax.Array], student_emb, teacher_emb, indices,
                      momentum: float = 0.5) -> dict[str, jax.Array]:
    """Momentum update of the CRD banks at ``indices``, then l2 renormalise.

      bank_s[i] <- normalize(momentum * bank_s[i] + (1 - momentum) * s)
      bank_t[i] <- normalize(momentum * bank_t[i] + (1 - momentum) * t)
    (plain division by the l2 norm, as RepDistiller ``ContrastMemory``;
    gradients are stopped). Returns a new memory dict (Z entries unchanged).

    Args:
      memory: CRD memory dict.
      student_emb, teacher_emb: (B, D) embeddings of the batch.
      indices: (B,) dataset indices (distinct within a batch).
      momentum: weight of the old bank row (RepDistiller nce_m = 0.5).
    """
    _check("crd_update_memory", {"student_emb": student_emb, "teacher_emb": teacher_emb},
           ndim=2, layout="(B, D)", match="shape")
    _check("crd_update_memory", {"indices": indices}, ndim=1, layout="(B,)")
    _check("crd_update_memory", {"student_emb": student_emb, "indices": indices}, match="batch")
    indices = jnp.asarray(indices)

    def upd(bank, emb):
        emb = jax.lax.stop_gradient(_f32(emb))
        row = bank[indices] * momentum + emb * (1.0 - momentum)
        row = row / jnp.sqrt(jnp.sum(row * row, axis=1, keepdims=True))
        return bank.at[indices].set(row.astype(bank.dtype))

    return {**memory, "bank_s": upd(memory["bank_s"], student_emb),
            "bank_t": upd(memory["bank_t"], teacher_emb)}


# --------------------------------------------------------------------------
# Weight penalties
# --------------------------------------------------------------------------


def _leaves(params, kernels_only: bool):
    leaves = [_f32(x) for x in jax.tree.leaves(params)]
    return [x for x in leaves if x.ndim > 1] if kernels_only else leaves


def l2_penalty(params, kernels_only: bool = False) -> jax.Array:
    """0.5 * sum of squares over all leaves of a pytree.

    loss = 0.5 * sum_leaves sum w^2. Adding ``wd * l2_penalty(params)`` to the
    loss gives gradient wd * w, i.e. the same as coupled SGD weight decay wd
    (PyTorch ``SGD(weight_decay=wd)``).

    Args:
      params: any pytree of arrays.
      kernels_only: only leaves with ndim > 1 (skip biases and norm scales).
    """
    return 0.5 * sum((jnp.sum(x * x) for x in _leaves(params, kernels_only)),
                     jnp.zeros((), jnp.float32))


def l1_penalty(params, kernels_only: bool = False) -> jax.Array:
    """Sum of absolute values over all leaves of a pytree: sum |w|.

    Args:
      params: any pytree of arrays.
      kernels_only: only leaves with ndim > 1.
    """
    return sum((jnp.sum(jnp.abs(x)) for x in _leaves(params, kernels_only)),
               jnp.zeros((), jnp.float32))
