"""Vision Transformers (Dosovitskiy et al., ICLR 2021) in timm's layout, and DeiT's distilled
variant with a distillation token and a second head (Touvron et al., ICML 2021).

``ViT`` follows timm's ``VisionTransformer`` with its defaults (class token, learned position
embedding over class token + patches, pre-norm blocks, LayerNorm eps 1e-6, exact GELU, final norm,
the class token's output to the head), so `kdjax.models.pretrained` can load timm's
``vit_*_patch16_224`` and ``deit_*_distilled_patch16_224`` weights and give timm's logits.

The position embedding is a parameter over the grid of ``image_size`` / ``patch_size``; an input of
another resolution reads it resampled to its own grid (`resample_matrix`: bicubic with
antialiasing, torch's ``F.interpolate(mode='bicubic', antialias=True)`` as timm's
``resample_abs_pos_embed`` calls it; the prefix tokens' entries are kept as they are). This is what
timm does for ``dynamic_img_size=True`` and, once, when it loads a checkpoint into a model of
another ``img_size``.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np
import jax
import jax.numpy as jnp
import flax.linen as nn

from .layers import sow_feature

_dense_init = nn.initializers.truncated_normal(0.02)


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter ``a`` (-0.5: torch's antialiased bicubic, PIL)."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=64)
def resample_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float64 matrix of 1-D bicubic resampling with antialiasing, as torch's
    ``_upsample_bicubic2d_aa`` computes its weights (align_corners=False): output pixel ``i``
    centred at ``c = s (i + 0.5)`` with ``s = in / out`` reads the inputs ``j`` within
    ``support = 2 max(s, 1)`` of it with weights ``cubic((j + 0.5 - c) / max(s, 1))``, normalised
    to sum to 1 (no clamping at the borders: the window is cut there and renormalised)."""
    scale = in_size / out_size
    support = 2.0 * max(scale, 1.0)
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    m = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        j = np.arange(lo, hi)
        w = _cubic((j - center + 0.5) * inv)
        if w.sum() != 0:
            w = w / w.sum()
        m[i, lo:hi] = w
    return m


def resample_pos_embed(pos: jax.Array, old_grid: tuple[int, int], new_grid: tuple[int, int],
                       num_prefix: int) -> jax.Array:
    """(1, P + h*w, D) position embedding -> (1, P + H*W, D): the first ``num_prefix`` entries as they
    are, the grid part resampled separably with `resample_matrix` (rows, then columns)."""
    if tuple(old_grid) == tuple(new_grid):
        return pos
    prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
    (h, w), (nh, nw) = old_grid, new_grid
    grid = grid.reshape(h, w, -1).astype(jnp.float32)
    rh = jnp.asarray(resample_matrix(h, nh), jnp.float32)
    rw = jnp.asarray(resample_matrix(w, nw), jnp.float32)
    grid = jnp.einsum("Hh,hwd,Ww->HWd", rh, grid, rw, precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([prefix, grid.reshape(1, nh * nw, -1).astype(pos.dtype)], axis=1)


class Attention(nn.Module):
    """Multi-head self-attention with per-head query / key / value projections (kernels
    (D, heads, D / heads)) and an output projection ((heads, D / heads, D)), softmax(q k^T / sqrt(d)) v."""
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        hd = d // self.num_heads
        proj = lambda name: nn.DenseGeneral((self.num_heads, hd), dtype=self.dtype, kernel_init=_dense_init,  # noqa: E731
                                            name=name)
        q, k, v = proj("query")(x), proj("key")(x), proj("value")(x)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (hd ** -0.5)
        attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
        y = jnp.einsum("bhqk,bkhd->bqhd", attn, v)
        return nn.DenseGeneral(d, axis=(-2, -1), dtype=self.dtype, kernel_init=_dense_init, name="out")(y)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)) with MLP = Dense(ratio D) ->
    GELU (exact) -> Dense(D); dropout (training only) after the attention and each MLP layer."""
    num_heads: int
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        d = x.shape[-1]
        norm = lambda name: nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, dtype=self.dtype, name=name)  # noqa: E731
        drop = lambda y: nn.Dropout(self.dropout, deterministic=not train or not self.dropout)(y)  # noqa: E731
        x = x + drop(Attention(self.num_heads, self.dtype, name="attn")(norm("norm1")(x)))
        y = nn.Dense(int(d * self.mlp_ratio), dtype=self.dtype, kernel_init=_dense_init, name="fc1")(norm("norm2")(x))
        y = drop(nn.gelu(y, approximate=False))
        y = drop(nn.Dense(d, dtype=self.dtype, kernel_init=_dense_init, name="fc2")(y))
        return x + y


class ViT(nn.Module):
    """Vision Transformer on NHWC images: ``patch_size`` x ``patch_size`` patches -> Dense(``embed_dim``)
    (a strided conv, ``patch_embed``), a class token (``cls_token``; and with ``distilled`` DeiT's
    distillation token ``dist_token``) in front, + the position embedding ``pos_embed`` (over the
    ``image_size`` grid; resampled for other input sizes, see the module docstring), ``depth``
    blocks, LayerNorm ``norm``, then ``head`` on the class token. With ``distilled``, ``head_dist``
    reads the distillation token and the logits are the mean of the two heads' logits, as timm's
    and DeiT's models return them outside distillation training.

    Features: ``block1`` .. ``block{depth}`` (B, tokens, D): the tokens after each block, prefix
    tokens first; ``embedding`` (B, D): the class token after ``norm`` (with ``distilled``, the mean
    of the class and distillation tokens, as timm's pre-logits); ``logits``; with ``distilled`` also
    ``logits_cls`` and ``logits_dist``, the two heads' own logits (float32). There are no
    on-request extras: the attention maps are not sown.

    ``dropout``: rate after the attention and in the MLP (training only; timm's ``proj_drop``).
    ``bn_axis_name`` is part of every kdjax model's signature; a ViT has no BatchNorm, so nothing
    is synchronised over it."""
    num_classes: int
    patch_size: int = 16
    image_size: int = 224
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    distilled: bool = False
    dropout: float = 0.0
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None

    @property
    def num_prefix_tokens(self) -> int:
        return 2 if self.distilled else 1

    @nn.compact
    def __call__(self, x, train: bool = False, extra_features: tuple[str, ...] = ()):
        if extra_features:
            raise ValueError(f"ViT computes no on-request features; asked for {', '.join(extra_features)}")
        p, d = self.patch_size, self.embed_dim
        if x.shape[1] % p or x.shape[2] % p:
            raise ValueError(f"ViT: input {x.shape[1]}x{x.shape[2]} is not a multiple of the patch size {p}")
        x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, kernel_init=_dense_init,
                    name="patch_embed")(x)
        b, gh, gw, _ = x.shape
        x = x.reshape(b, gh * gw, d)
        zeros = nn.initializers.zeros
        prefix = [self.param("cls_token", zeros, (1, 1, d))]
        if self.distilled:
            prefix.append(self.param("dist_token", _dense_init, (1, 1, d)))
        grid = self.image_size // p
        pos = self.param("pos_embed", _dense_init, (1, self.num_prefix_tokens + grid * grid, d))
        pos = resample_pos_embed(pos, (grid, grid), (gh, gw), self.num_prefix_tokens)
        x = jnp.concatenate([jnp.broadcast_to(t, (b, 1, d)).astype(x.dtype) for t in prefix] + [x], axis=1)
        x = x + pos.astype(x.dtype)
        x = nn.Dropout(self.dropout, deterministic=not train or not self.dropout)(x)
        for i in range(self.depth):
            x = Block(self.num_heads, self.mlp_ratio, self.dropout, self.dtype, name=f"blocks_{i}")(x, train)
            sow_feature(self, f"block{i + 1}", x)
        x = nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, dtype=self.dtype, name="norm")(x)
        head = lambda name: nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros,  # noqa: E731
                                     name=name)
        if not self.distilled:
            sow_feature(self, "embedding", x[:, 0])
            logits = head("head")(x[:, 0]).astype(jnp.float32)
        else:
            sow_feature(self, "embedding", (x[:, 0] + x[:, 1]) / 2)
            cls, dist = head("head")(x[:, 0]).astype(jnp.float32), head("head_dist")(x[:, 1]).astype(jnp.float32)
            sow_feature(self, "logits_cls", cls)
            sow_feature(self, "logits_dist", dist)
            logits = (cls + dist) / 2
        sow_feature(self, "logits", logits)
        return logits


# timm's sizes (embed_dim, num_heads) by name; all have depth 12 and MLP ratio 4.
SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}


def vit(size: str, patch_size: int = 16, image_size: int = 224, distilled: bool = False, **kw) -> ViT:
    """ViT-Ti / S / B (``size`` 'tiny', 'small', 'base'), depth 12; kwargs (embed_dim, depth,
    num_heads, ...) override them (config.<role>.kwargs: e.g. a smaller ViT for a quick run)."""
    d, h = SIZES[size]
    kw = {"embed_dim": d, "depth": 12, "num_heads": h, **kw}
    return ViT(patch_size=patch_size, image_size=image_size, distilled=distilled, **kw)
