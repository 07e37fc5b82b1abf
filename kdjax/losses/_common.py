"""Helpers shared by the loss families: shape checks, float32, flattening, norms, pooling, and the
logits' padding mask and reduction. Private to `kdjax.losses`; the pooling is public as
`kdjax.losses.feature.adaptive_avg_pool` / `pool_to_common`, the flattening as
`kdjax.losses.relation.flatten`."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

_HI = jax.lax.Precision.HIGHEST


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


def flatten(x) -> jax.Array:
    """(B, ...) -> (B, N) float32, one row per example (the relation losses' flattening)."""
    return _flat(_f32(x))


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


def adaptive_avg_pool(x: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """torch F.adaptive_avg_pool2d for an NHWC array (static output size)."""
    h, w = x.shape[1], x.shape[2]
    if (h, w) == tuple(hw):
        return x
    ph = jnp.asarray(_pool_matrix(h, hw[0]))
    pw = jnp.asarray(_pool_matrix(w, hw[1]))
    return jnp.einsum("oh,bhwc,pw->bopc", ph, x, pw, precision=_HI)


def pool_to_common(fs: jax.Array, ft: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Adaptive-average-pool the larger spatial map down to the smaller one."""
    hw = (min(fs.shape[1], ft.shape[1]), min(fs.shape[2], ft.shape[2]))
    return adaptive_avg_pool(fs, hw), adaptive_avg_pool(ft, hw)


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

