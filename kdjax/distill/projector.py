"""Projector methods added since the registry was pinned: srd (registered after the `gram` family:
the registry's order is a contract, so methods added later are appended at its end)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from kdjax import losses
from kdjax.distill.core import AXIS, Context, _pairs
from kdjax.distill.ensemble import _teacher_logits
from kdjax.distill.layers import _torch_bias, _torch_kernel
from kdjax.distill.registry import defaults, own_temperature, register, term


class SRDNorm(nn.Module):
    """torchdistill ``SRDModelWrapper``'s head on a model's pooled features: an optional linear
    projector (the student's, to the teacher's width; PyTorch's default initialisation) and a
    BatchNorm1d without affine parameters (eps 1e-4). In training it normalises with the batch's
    statistics (synchronised over the devices), as the reference's wrappers, which are never put
    in eval mode, do for the student and the teacher alike; at evaluation, the running ones."""

    out: int | None = None  # None: no projector (the teacher's)

    @nn.compact
    def __call__(self, x, ctx: Context):
        x = x.astype(jnp.float32).reshape(x.shape[0], -1)
        if self.out is not None:
            x = nn.Dense(self.out, kernel_init=_torch_kernel, bias_init=_torch_bias(x.shape[-1]), name="linear")(x)
        return nn.BatchNorm(use_running_average=not ctx.train, momentum=0.9, epsilon=1e-4, use_bias=False,
                            use_scale=False, axis_name=AXIS if ctx.train else None, name="norm")(x)


def _srd_fn(name, student, teacher, ctx, *, exponent, temperature):
    (s_emb, t_emb), (s_logits, t_logits) = _pairs(name, student, teacher)
    t_logits = _teacher_logits(s_logits, t_logits, ctx, temperature)
    f_s = SRDNorm(t_emb.shape[-1], name=f"{name}_student_norm")(s_emb, ctx)
    f_t = SRDNorm(None, name=f"{name}_teacher_norm")(t_emb, ctx)
    return losses.srd(f_s, f_t, s_logits, t_logits, exponent, temperature)


# SRD (Miles, Mikolajczyk AAAI 2024): torchdistill configs/official/ilsvrc2012/roymiles/aaai2024
# (CE 1, SRDLoss weight 1, exponent 4, temperature 1) on the pooled last-stage features
# ('embedding') through SRDModelWrapper's linear projector + affine-free BatchNorm1d. The log of
# a sum over the batch: a batch-level term (global batch).
@register("srd", paper="Miles, Mikolajczyk. Understanding the Role of the Projector in Knowledge Distillation "
                       "(AAAI 2024)",
          ce_weight=1.0, defaults=defaults(1.0, "embedding,logits", "embedding,logits", exponent=4.0, temperature=1.0),
          loss="srd", global_batch=True, temperature=True)
def _srd(h, temperature, data):
    exponent = float(h["exponent"])
    if not exponent > 0:
        raise ValueError(f"distill.srd.exponent must be > 0, got {exponent}")
    fn = functools.partial(_srd_fn, "srd", exponent=exponent, temperature=own_temperature(h, temperature))
    return [term("srd", fn, h, paired=True)]
