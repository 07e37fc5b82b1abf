"""Weight penalties: a pytree of parameters in, scalar out."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax.losses._common import _f32


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
