"""Adapter building blocks (NHWC) shared by the methods' adapters: PyTorch default initialisation
where the reference relies on it (weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in))),
PyTorch-default BatchNorm synchronised over the data-parallel axis, and `Embed` (the linear
projection of CC, CRD and the adversarial term). Each method's own adapters live beside it."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.distill.core import AXIS, Context
from kdjax.losses.contrastive import normalize_embedding
from kdjax.losses.relation import flatten

_torch_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_bias(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _batch_norm(ctx: Context, name: str) -> nn.BatchNorm:
    """PyTorch-default BatchNorm; batch statistics synchronised over AXIS when training."""
    return nn.BatchNorm(use_running_average=not ctx.train, momentum=0.9, epsilon=1e-5,
                        axis_name=AXIS if ctx.train else None, name=name)


class Embed(nn.Module):
    """Linear projection of flattened features, optionally l2-normalised.

    RepDistiller ``LinearEmbed`` (normalize=False; torchdistill ``Linear4CCKD``) and ``Embed``
    (normalize=True; CRD)."""

    dim: int = 128
    normalize: bool = False

    @nn.compact
    def __call__(self, x):
        x = flatten(x)
        x = nn.Dense(self.dim, kernel_init=_torch_kernel, bias_init=_torch_bias(x.shape[-1]))(x)
        return normalize_embedding(x) if self.normalize else x
