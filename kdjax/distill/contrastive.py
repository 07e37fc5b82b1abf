"""Contrastive representation distillation: the CRD head (the students' and the teacher's `Embed`
and the memory bank, a non-parameter collection) and the method crd."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdjax import losses
from kdjax.distill.core import AXIS, CRD_COLLECTION, Context
from kdjax.distill.layers import Embed
from kdjax.distill.registry import defaults, register, term


# CRD: Tian et al. ICLR 2020; RepDistiller `--distill crd -a 0 -b 0.8` (CRD+KD: -a 1), feat_dim
# 128, nce_k 16384, nce_t 0.07, nce_m 0.5, mode 'exact' (negatives from other classes). Combine
# with KD as 'crd+kd' and distill.kd.weight=1.0 for RepDistiller's CRD+KD.
class CRD(nn.Module):
    """CRD head: student/teacher ``Embed`` (linear + l2 norm) and the memory bank.

    The memory (two (num_data, dim) banks and the normalisers Z, `losses.crd_init_memory`) lives in
    the non-parameter collection 'crd_memory'. Per example, negatives are drawn with a key folded
    from ctx.rng and the example's position in the global batch (device-count invariant). Scores use
    the bank before this batch's update (as RepDistiller); when ``ctx.train`` the banks are then
    updated with the all-gathered global batch, and Z (set once, from the first batch) is the
    global-batch mean, so the memory stays identical on every device."""

    num_data: int
    dim: int = 128
    num_negatives: int = 16384
    temperature: float = 0.07
    momentum: float = 0.5
    exclude_same_class: bool = True

    @nn.compact
    def __call__(self, student, teacher, ctx: Context, dataset_labels=None):
        if ctx.indices is None or ctx.rng is None:
            raise ValueError("crd needs ctx.indices (data-set index of each example) and ctx.rng")
        s = Embed(self.dim, normalize=True, name="embed_s")(student)
        t = Embed(self.dim, normalize=True, name="embed_t")(teacher)
        n, k = self.num_data, self.num_negatives
        init = None
        if not self.has_variable(CRD_COLLECTION, "bank_s"):
            init = losses.crd_init_memory(self.make_rng("params"), n, self.dim)
        state = {key: self.variable(CRD_COLLECTION, key, lambda key=key: init[key])
                 for key in ("bank_s", "bank_t", "z_s", "z_t")}
        memory = {key: v.value for key, v in state.items()}

        idx = jnp.asarray(ctx.indices, jnp.int32)
        b = idx.shape[0]
        offset = jax.lax.axis_index(AXIS) * b if ctx.train else 0
        keys = jax.vmap(lambda i: jax.random.fold_in(ctx.rng, i))(offset + jnp.arange(b))
        if self.exclude_same_class:
            if dataset_labels is None:
                raise ValueError("crd.exclude_same_class needs the training labels: pass "
                                 "build_terms(..., dataset_labels=train_labels), or set "
                                 "distill.crd.exclude_same_class=False")
            labels = jnp.asarray(dataset_labels, jnp.int32)
            neg = jax.vmap(lambda key, i, y: losses.crd_sample_negatives(
                key, i[None], n, k, labels=y[None], dataset_labels=labels)[0])(keys, idx, ctx.labels)
        else:
            neg = jax.vmap(lambda key, i: losses.crd_sample_negatives(key, i[None], n, k)[0])(keys, idx)

        if ctx.train:  # Z from the global batch, so that every device sets the same value
            full = jnp.concatenate([idx[:, None], neg], axis=1)

            def first_z(bank, emb):
                rows = bank[full]
                out = jnp.exp(jnp.einsum("bkd,bd->bk", rows, jax.lax.stop_gradient(emb),
                                         precision=jax.lax.Precision.HIGHEST) / self.temperature)
                return jax.lax.pmean(jnp.mean(out), AXIS) * n

            for z, bank, emb in (("z_s", "bank_t", s), ("z_t", "bank_s", t)):
                memory[z] = jax.lax.cond(memory[z] < 0, lambda bank=bank, emb=emb: first_z(memory[bank], emb),
                                         lambda z=z: memory[z])
        loss, memory = losses.crd_nce(s, t, memory, idx, neg, self.temperature)

        if ctx.train and self.is_mutable_collection(CRD_COLLECTION) and not self.is_initializing():
            gather = lambda x: jax.lax.all_gather(jax.lax.stop_gradient(x), AXIS, tiled=True)
            memory = losses.crd_update_memory(memory, gather(s), gather(t), gather(idx), self.momentum)
            for key, v in state.items():
                v.value = memory[key]
        return loss


def _crd_fn(name, student, teacher, ctx, *, head_kwargs, dataset_labels):
    if head_kwargs["num_data"] is None:
        raise ValueError("crd needs the training-set size: pass build_terms(..., num_data=N) "
                         "or set distill.crd.num_data")
    return CRD(**head_kwargs, name=name)(student, teacher, ctx, dataset_labels)


@register("crd", paper="Tian, Krishnan, Isola. Contrastive Representation Distillation (ICLR 2020)", ce_weight=1.0,
          defaults=defaults(0.8, "embedding", "embedding", dim=128, num_negatives=16384, temperature=0.07,
                            momentum=0.5, exclude_same_class=True, num_data=None),
          loss="crd_nce")
def _crd(h, temperature, data):
    labels = data.get("dataset_labels")
    labels = None if labels is None else np.asarray(labels, np.int32)
    num_data = h["num_data"] if h["num_data"] is not None else data.get("num_data")
    if num_data is None and labels is not None:
        num_data = len(labels)
    if labels is not None and len(labels) != num_data:
        raise ValueError(f"crd: dataset_labels has {len(labels)} entries but num_data is {num_data}")
    k = h["num_negatives"]
    if num_data is not None:
        allowed = int(num_data) - 1
        if h["exclude_same_class"] and labels is not None:
            allowed = int(num_data) - int(np.bincount(labels).max())
        k = min(int(k), allowed)
    head = {"num_data": None if num_data is None else int(num_data), "dim": int(h["dim"]),
            "num_negatives": int(k), "temperature": float(h["temperature"]),
            "momentum": float(h["momentum"]), "exclude_same_class": bool(h["exclude_same_class"])}
    fn = functools.partial(_crd_fn, "crd", head_kwargs=head, dataset_labels=labels)
    return [term("crd", fn, h)]
