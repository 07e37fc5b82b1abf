"""CRD: contrastive representation distillation with explicit state (the memory banks and the
normalisers Z are a dict threaded through the train step, never hidden).

Usage::

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

The banks and Z are always constants (stop_gradient).

Public helper (not a loss, so not in ``kdjax.losses.__all__``): `normalize_embedding`, the l2
normalisation of CRD's projected embeddings (kdjax.distill's ``Embed``).
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp

from kdjax.losses._common import _HI, _check, _f32


def normalize_embedding(x: jax.Array) -> jax.Array:
    """x / max(||x||_2, 1e-12) along the last axis, computed as x * rsqrt(max(||x||^2, 1e-24)).

    The normalisation of CRD's embeddings (RepDistiller ``Embed`` + ``Normalize``; kdjax.distill's
    ``Embed(normalize=True)``). Its values equal the feature losses' normalisation, but its
    gradient is computed by another formula (rsqrt), which CRD's training has always used: kept,
    so that CRD trains bit for bit as before.
    """
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


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
