"""Feature losses: feature maps (NHWC ``(B, H, W, C)``) or lists of them in, scalar out.

No mask: each docstring says which shapes it accepts (flatten a ``(B, T, D)`` sequence to the
unpadded ``(N, D)`` tokens first where the loss relates rows of the batch to each other). The
student's feature usually needs a trainer-side adapter first (a regressor, a connector); that is
`kdjax.distill`'s job, not these functions'.

Public helpers (not losses, so not in ``kdjax.losses.__all__``): `adaptive_avg_pool` (torch
``F.adaptive_avg_pool2d`` of an NHWC array) and `pool_to_common` (the larger of two maps pooled to
the smaller's spatial size), as the losses here pool mismatched maps.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.losses._common import (
    _HI,
    _check,
    _f32,
    _flat,
    _l2_normalize,
    _safe_sqrt,
    adaptive_avg_pool,
    pool_to_common,
)


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
    fs, ft = pool_to_common(_f32(student_feat), _f32(teacher_feat))

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
    fs, ft = pool_to_common(_f32(student_feat), _f32(teacher_feat))

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
            d = adaptive_avg_pool(fs, (l, l)) - adaptive_avg_pool(ft, (l, l))
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
            bot, top = pool_to_common(_f32(bot), _f32(top))
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
    fs, ft = pool_to_common(_f32(student_factor), _f32(teacher_factor))
    factor = lambda f: _l2_normalize(_flat(jnp.mean(f**p1, axis=-1)))
    d = factor(fs) - factor(ft)
    return jnp.mean(jnp.abs(d)) if p2 == 1 else jnp.mean(d**p2)


def ickd(student_feat, teacher_feat) -> jax.Array:
    """Inter-channel correlation KD: match the row-normalised channel Gram matrices per example.

    With F the (HW, C) map of one example, G = normalize_rows(F^T F) (the C x C inter-channel
    correlation, each row scaled to unit l2 norm, eps 1e-12, as ``F.normalize(dim=2)``):
      loss = sum_{b, i, j} (G_s - G_t)_{b,ij}^2 / (C B)
    Reduction: summed over the C x C entries and the batch, divided by C B (a per-example value
    averaged over the batch, so no cross-example relation). The spatial sizes may differ (the Gram
    is over HW); the channel counts must match: the method maps the student's channels to the
    teacher's with its 1x1 conv + BatchNorm embedding first (kdjax.distill).

    Paper: Liu, Chen, Liu, Li, Liu, Gao, Ding, "Exploring Inter-Channel Correlation for
    Diversity-preserved Knowledge Distillation", ICCV 2021. Reproduces ADLab-AutoDrive/ICKD
    ``ICKDLoss.batch_loss`` (Cifar100/distiller_zoo/ICKD.py @04e1d3e) after its ``embed_s``.

    Args:
      student_feat, teacher_feat: (B, H, W, C) NHWC maps, the same B and C.
    """
    _check("ickd", {"student_feat": student_feat, "teacher_feat": teacher_feat}, ndim=4,
           layout="(B, H, W, C)", match="batch")
    _check("ickd", {"student_feat": student_feat, "teacher_feat": teacher_feat}, match="last")
    b, c = np.shape(student_feat)[0], np.shape(student_feat)[-1]
    gs, gt = _l2_normalize(_gram(_f32(student_feat))), _l2_normalize(_gram(_f32(teacher_feat)))
    d = gs - gt
    return jnp.sum(d * d) / (c * b)
