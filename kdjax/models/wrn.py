"""Wide ResNets (RepDistiller ``models/wrn.py``, pre-activation; dropout 0 there, ``dropout`` here)."""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import flax.linen as nn

from .layers import batch_norm, classifier, conv, sow_feature, sow_preact


class WideBasic(nn.Module):
    """Pre-activation block: BN -> ReLU -> conv3x3(stride) -> BN -> ReLU -> conv3x3, plus the
    input (identity) or, when channels change, conv1x1(stride) of the *pre-activated* input.
    ``dropout`` between the two convolutions, as in Zagoruyko & Komodakis (training only).
    ``return_preact``: return (output, bn1(input)), the input's pre-activation before its ReLU."""
    features: int
    stride: int = 1
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    dropout: float = 0.0
    return_preact: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = lambda name: batch_norm(train, self.bn_axis_name, self.dtype, name=name)
        equal = x.shape[-1] == self.features
        pre = bn("bn1")(x)
        a = nn.relu(pre)
        y = conv(self.features, 3, self.stride, dtype=self.dtype, name="conv1")(a)
        y = nn.Dropout(self.dropout, deterministic=not train or not self.dropout)(nn.relu(bn("bn2")(y)))
        y = conv(self.features, 3, 1, dtype=self.dtype, name="conv2")(y)
        if equal:
            out = x + y  # RepDistiller: equal in/out channels implies stride 1 here
        else:
            out = conv(self.features, 1, self.stride, dtype=self.dtype, name="shortcut_conv")(a) + y
        return (out, pre) if self.return_preact else out


class WideResNet(nn.Module):
    """WRN-depth-k: conv3x3(16), three stages of (depth-4)/6 blocks at 16k, 32k, 64k channels
    (strides 1, 2, 2), final BN -> ReLU, global average pool, Dense.

    Features: ``stage1`` .. ``stage3`` (raw stage outputs as RepDistiller's f1..f3: the blocks are
    pre-activation, so these are *before* the next BN/ReLU), ``embedding`` (B, 64k), ``logits``.
    On request (``extra_features``, `kdjax.models.layers.EXTRA_FEATURES`): ``preact_stage<N>`` =
    the next BN applied to stage N's output (the first block of stage N+1's bn1, or the final bn1),
    before its ReLU, with ``preact_margin<N>`` from that BN, as OFD's WideResNet
    (``extract_feature(preReLU=True)``, ``get_bn_before_relu``); ``class_map`` (``fc`` at every
    position of the final ReLU's map)."""
    num_classes: int
    depth: int = 40
    widen_factor: int = 2
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    dropout: float = 0.0  # inside every block (WRN's dropout; RepDistiller's default 0)

    @nn.compact
    def __call__(self, x, train: bool = False, extra_features: tuple[str, ...] = ()):
        if (self.depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {self.depth}")
        n = (self.depth - 4) // 6
        x = conv(16, 3, 1, dtype=self.dtype, name="conv1")(x)
        for s, c in enumerate((16, 32, 64)):
            for b in range(n):
                stride = 2 if (s > 0 and b == 0) else 1
                first = s > 0 and b == 0  # its bn1 is the previous stage's pre-activation
                x = WideBasic(c * self.widen_factor, stride, self.dtype, self.bn_axis_name, self.dropout,
                              return_preact=first, name=f"block{s + 1}_{b}")(x, train)
                if first:
                    x, pre = x
                    sow_preact(self, s, pre, (f"block{s + 1}_0", "bn1"), extra_features)
            sow_feature(self, f"stage{s + 1}", x)
        x = batch_norm(train, self.bn_axis_name, self.dtype, name="bn1")(x)
        sow_preact(self, 3, x, ("bn1",), extra_features)
        x = nn.relu(x)
        return classifier(self, x, "fc", extra_features)
