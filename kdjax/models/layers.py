"""Shared building blocks: PyTorch-equivalent BatchNorm / conv presets (on CPU a 1x1 conv is a
matmul and a conv's input is `materialize`d), feature sowing, the pooled classifier head the conv
nets end with, and a depthwise 3x3 convolution whose implementation is chosen per backend."""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax import lax

# torchvision-style kaiming normal, fan_out (also RepDistiller's normal(0, sqrt(2 / (k*k*out)))).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def batch_norm(train: bool, axis_name: str | None, dtype: Any, name: str | None = None) -> nn.BatchNorm:
    """BatchNorm with PyTorch defaults (momentum 0.1 there = 0.9 here, eps 1e-5).

    ``axis_name`` (e.g. 'data' under shard_map/pmap) averages the batch statistics over that
    axis, i.e. SyncBN over the global batch."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        axis_name=axis_name, dtype=dtype, name=name)


def conv(features: int, kernel: int, stride: int = 1, *, dtype: Any, use_bias: bool = False,
         name: str | None = None) -> nn.Conv:
    """kxk convolution with PyTorch padding (k // 2 on every side, so stride 2 matches torch
    exactly; flax 'SAME' would pad (0, 1) for even sizes), no bias by default. On the CPU backend
    it runs as `_cpu_conv`: the same parameters and values, laid out for XLA:CPU's kernels."""
    p = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((p, p), (p, p)),
                   use_bias=use_bias, kernel_init=conv_init, dtype=dtype, name=name,
                   conv_general_dilated=_cpu_conv if jax.default_backend() == "cpu" else None)


_LAX_CONV_CODE = lax.conv_general_dilated.__code__  # Qwix intercepts by swapping the code object


_FUSION_BARRIERS = contextvars.ContextVar("kdjax_fusion_barriers", default=True)


def materialize(x: jax.Array, like: jax.Array) -> jax.Array:
    """``x``, unchanged, computed in full before anything reads it (on the CPU backend, outside
    `portable`; elsewhere ``x`` itself): an identity inside a conditional (on whether ``like``'s
    first element is finite; both branches return ``x``), which XLA does not fuse across. XLA:CPU
    otherwise folds the element-wise work that produced ``x`` (BatchNorm and ReLU) into each of
    its consumers, and the consumers of a convolution's input include the layout transpose that
    feeds the weight gradient: recomputed there, in transposed order, that work made the transpose
    4x slower. (``lax.optimization_barrier`` does not do this: XLA:CPU removes it before fusion.)"""
    if not _FUSION_BARRIERS.get() or jax.default_backend() != "cpu":
        return x
    return lax.cond(jnp.isfinite(like.reshape(-1)[0]), lambda v: v, lambda v: v * 1, x)


@contextlib.contextmanager
def portable():
    """Trace models without `materialize`'s conditionals, for a program that is not only for
    XLA:CPU (`kdjax.export` lowers one artifact for CPU, CUDA and TPU; on a GPU a conditional
    reads its predicate on the host). It applies to traces made inside it: jax reuses a cached
    trace of a function it has traced before, so pass a new one (as `kdjax.export` does)."""
    token = _FUSION_BARRIERS.set(False)
    try:
        yield
    finally:
        _FUSION_BARRIERS.reset(token)


def _cpu_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
              dimension_numbers=None, feature_group_count=1, precision=None):
    """``lax.conv_general_dilated`` as `conv` runs it on XLA:CPU. A plain 1x1 NHWC convolution is
    what it is, a matrix product over the channels (strided: of the subsampled map): XLA:CPU ran
    its gradient through transposed copies, and as a matmul the forward and both gradients are
    1.3-3.6x faster on the pointwise layers of MobileNetV2. Any other convolution reads its input
    `materialize`d. While lax's convolution is intercepted (`kdjax.quantize`: Qwix quantises a
    layer by its op and names its scales after it) it is lax's convolution, as is."""
    def lax_conv(x):
        return lax.conv_general_dilated(x, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, precision=precision)
    if lax.conv_general_dilated.__code__ is not _LAX_CONV_CODE:
        return lax_conv(lhs)
    plain = (rhs.shape[:2] == (1, 1) and feature_group_count == 1 and all(p == (0, 0) for p in padding)
             and all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
             and dimension_numbers == lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC")))
    if not plain:
        return lax_conv(materialize(lhs, rhs))
    sh, sw = window_strides
    x = lhs[:, ::sh, ::sw, :] if (sh, sw) != (1, 1) else lhs
    y = lax.dot_general(x.reshape(-1, x.shape[-1]), rhs[0, 0], (((1,), (0,)), ((), ())), precision=precision)
    return y.reshape(x.shape[:-1] + (rhs.shape[-1],))


def _overwrite(_, x):
    return x


def sow_feature(module: nn.Module, name: str, x: jax.Array) -> None:
    """Record ``x`` as feature ``name`` in the 'features' collection (stored as the bare array,
    overwritten on repeated calls). A no-op unless 'features' is mutable, and skipped during
    ``init`` so initial variables hold only params / batch_stats."""
    if module.is_initializing():
        return
    module.sow("features", name, x, reduce_fn=_overwrite, init_fn=lambda: None)


# Features a model computes only when asked (``apply_model(..., extra=...)``), so the default
# forward pass, its feature names and its cost are those of a plain classifier:
#   'preact'     ``preact_stage<N>``: stage N's map before its last ReLU (the pre-activation the
#                stage's ReLU, or the next pre-activation block's ReLU, would see), and
#                ``preact_margin<N>`` (B, C): per channel, the expected value of that pre-ReLU
#                response where it is negative, from the BatchNorm that produced it
#                (`kdjax.losses.ofd_margin`, OFD's margin; the same for every example);
#   'class_map'  ``class_map`` (B, H, W, K): the classifier applied at every position of the map
#                that is globally pooled before it (a class activation map), float32. Its average
#                over any region is the logits of that region's pooled features (the head is
#                affine), e.g. SDD's multi-scale logits (`kdjax.losses.multiscale_logits`).
EXTRA_FEATURES = ("preact", "class_map")


def sow_preact(module: nn.Module, n: int, x: jax.Array, bn_path: tuple[str, ...] | None, extra) -> None:
    """When 'preact' is in ``extra``: sow ``x`` as ``preact_stage<n>`` and the OFD margin of the
    BatchNorm at ``bn_path`` (submodule names under ``module``; its scale and bias) as
    ``preact_margin<n>``, broadcast to (B, C); ``bn_path`` None: no single BatchNorm precedes the
    ReLU, so the map only (such a model can be an OFD student, not a teacher)."""
    if "preact" not in extra or module.is_initializing():
        return
    if bn_path is None:
        sow_feature(module, f"preact_stage{n}", x)
        return
    from kdjax import losses  # pure jnp; imported here to keep the models free of it otherwise

    params = module.variables["params"]
    for name in bn_path:
        params = params[name]
    margin = losses.ofd_margin(params["scale"], params["bias"])
    sow_feature(module, f"preact_stage{n}", x)
    sow_feature(module, f"preact_margin{n}", jnp.broadcast_to(margin, (x.shape[0], margin.shape[-1])))


def sow_class_map(module: nn.Module, head: nn.Module, x: jax.Array, extra) -> None:
    """When 'class_map' is in ``extra``: sow ``head`` applied at every position of the (B, H, W, C)
    map ``x`` (the map the model pools before ``head``) as ``class_map`` (B, H, W, K), float32."""
    if "class_map" in extra and not module.is_initializing():
        sow_feature(module, "class_map", head(x).astype(jnp.float32))


def global_avg_pool(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=(1, 2))


def classifier(module: nn.Module, fmap: jax.Array, name: str, extra, dropout: float = 0.0,
               train: bool = False) -> jax.Array:
    """The head every conv net here ends with, called from ``module``'s compact ``__call__``: global
    average pool of the (B, H, W, C) map ``fmap`` (sown as ``embedding``) -> dropout at rate
    ``dropout`` (training only) -> ``Dense(module.num_classes)`` named ``name`` -> float32 logits
    (sown as ``logits``, and returned); and, on request, the head's class map (`sow_class_map`)."""
    x = global_avg_pool(fmap)
    sow_feature(module, "embedding", x)
    if dropout:
        x = nn.Dropout(dropout, deterministic=not train)(x)
    head = nn.Dense(module.num_classes, dtype=module.dtype, name=name)
    logits = head(x).astype(jnp.float32)
    sow_class_map(module, head, fmap, extra)
    sow_feature(module, "logits", logits)
    return logits


def _depthwise_xla(x, kernel, stride):
    c = x.shape[-1]
    return lax.conv_general_dilated(
        x, kernel, window_strides=(stride, stride), padding=((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)


def _depthwise_shift(x, kernel, stride):
    """The same 3x3 depthwise conv as nine shifted (strided) slices times per-channel weights.
    XLA:CPU's grouped convolution (and especially its gradient) is very slow; this is not."""
    n, h, w, c = x.shape
    ho, wo = (h + 2 - 3) // stride + 1, (w + 2 - 3) // stride + 1
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = None
    for i in range(3):
        for j in range(3):
            patch = lax.slice(xp, (0, i, j, 0),
                              (n, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c),
                              (1, stride, stride, 1))
            term = patch * kernel[i, j, 0]
            out = term if out is None else out + term
    return out


# Its gradient recomputes the nine slices from x instead of keeping them from the forward pass:
# the same values (bit for bit), but the backward's reductions read x in place rather than nine
# stored copies of it; 1.2-1.8x faster per layer on XLA:CPU.
_depthwise_shift_remat = jax.checkpoint(_depthwise_shift, static_argnums=(2,))


class DepthwiseConv(nn.Module):
    """3x3 depthwise convolution (groups = channels), stride 1 or 2, padding 1, no bias.

    ``impl``: 'xla' (native grouped conv; right on GPU/TPU), 'shift' (nine shifted
    multiply-adds; much faster on XLA:CPU) or 'auto' ('shift' on the CPU backend, else 'xla').
    Both use one parameter ``kernel`` of shape (3, 3, 1, C) with the same init, so
    checkpoints move freely between backends."""
    stride: int = 1
    impl: str = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.stride not in (1, 2):
            raise ValueError(f"DepthwiseConv stride must be 1 or 2, got {self.stride}")
        impl = self.impl
        if impl == "auto":
            impl = "shift" if jax.default_backend() == "cpu" else "xla"
        if impl not in ("shift", "xla"):
            raise ValueError(f"DepthwiseConv impl must be 'auto', 'shift' or 'xla', got {self.impl!r}")
        c = x.shape[-1]
        kernel = self.param("kernel", conv_init, (3, 3, 1, c), self.param_dtype)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        if impl == "xla":
            return _depthwise_xla(x, kernel, self.stride)
        return _depthwise_shift_remat(materialize(x, kernel), kernel, self.stride)
