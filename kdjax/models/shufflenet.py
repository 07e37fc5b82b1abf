"""ShuffleNet V1 and V2 for 32x32 inputs, as RepDistiller's CIFAR students (``ShuffleV1``:
groups 3, stage widths 240/480/960, 4/8/4 blocks; ``ShuffleV2``: net size 1, 116/232/464 and a
1x1 conv to 1024, 3/7/3 basic blocks after each stage's down-sampling block). Both have a 1x1
stride-1 stem of 24 channels (no max-pool), as the reference; 949,258 and 1,355,528 parameters
for 100 classes, as in RepDistiller (checked in tests/test_models.py).

Features: ``stage1`` .. ``stage3`` (each stage's output: 16, 8, 4 px on 32x32 inputs; RepDistiller's
f1..f3), ``embedding`` (pooled, (B, 960) / (B, 1024)), ``logits``. On request (``extra_features``,
`kdjax.models.layers.EXTRA_FEATURES`): ``class_map`` (``fc`` at every position of the pooled map)
for both; ``preact_stage<N>`` / ``preact_margin<N>`` for ShuffleV1 (the last block's sum before
its ReLU, margin from its bn3, as mdistiller's ``get_bn_before_relu``). ShuffleV2: ``preact_stage<N>``
only (mdistiller's ``preact``: the untouched half concatenated with the branch before its last
ReLU, unshuffled); its stage output is not one BatchNorm before a ReLU, so it has no margins and
can be an OFD student but not a teacher (mdistiller: "not supported for Overhaul teacher"; here
the feature check refuses it in one line).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from .layers import DepthwiseConv, batch_norm, classifier, conv, conv_init, sow_feature, sow_preact


def channel_shuffle(x, groups: int):
    """NHWC channel shuffle: channel ``k * C/g + j`` moves to ``j * g + k`` (ShuffleNet's
    reshape (g, C/g) -> transpose -> flatten, on the last axis)."""
    *lead, c = x.shape
    return x.reshape(*lead, groups, c // groups).swapaxes(-1, -2).reshape(*lead, c)


class GroupedPointwise(nn.Module):
    """1x1 convolution with ``groups`` groups, no bias: output group k reads input group k.

    The kernel is (1, 1, C_in / groups, C_out), the layout of ``nn.Conv(feature_group_count=g)``,
    so checkpoints are interchangeable with it; it is computed as one batched matrix product over
    the groups (``einsum``), which XLA:CPU runs much faster than a grouped convolution."""
    features: int
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c, g = x.shape[-1], self.groups
        if c % g or self.features % g:
            raise ValueError(f"GroupedPointwise: {c} input and {self.features} output channels must be "
                             f"divisible by groups={g}")
        kernel = self.param("kernel", conv_init, (1, 1, c // g, self.features), jnp.float32)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        w = kernel.reshape(c // g, g, self.features // g)
        y = jnp.einsum("...gi,igo->...go", x.reshape(*x.shape[:-1], g, c // g), w)
        return y.reshape(*x.shape[:-1], self.features)


class ShuffleV1Block(nn.Module):
    """Grouped 1x1 (groups ``g``; 1 when reading the 24-channel stem) -> BN -> ReLU -> shuffle ->
    3x3 depthwise(stride) -> BN -> ReLU -> grouped 1x1 -> BN; stride 2: concatenated with a 3x3
    stride-2 average pool of the input (padding 1, zeros counted), else added; ReLU."""
    features: int  # output channels of the residual branch
    stride: int
    groups: int
    first_groups: int
    depthwise_impl: str = "auto"
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    return_preact: bool = False  # return (output, the stride-1 sum before the final ReLU)

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = lambda name: batch_norm(train, self.bn_axis_name, self.dtype, name=name)
        mid = self.features // 4
        y = nn.relu(bn("bn1")(GroupedPointwise(mid, self.first_groups, self.dtype, name="conv1")(x)))
        y = channel_shuffle(y, self.first_groups)
        y = nn.relu(bn("bn2")(DepthwiseConv(self.stride, self.depthwise_impl, self.dtype, name="conv2")(y)))
        y = bn("bn3")(GroupedPointwise(self.features, self.groups, self.dtype, name="conv3")(y))
        if self.stride == 2:
            pooled = nn.avg_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), count_include_pad=True)
            pre = jnp.concatenate([y, pooled.astype(y.dtype)], axis=-1)
        else:
            pre = y + x
        return (nn.relu(pre), pre) if self.return_preact else nn.relu(pre)


class ShuffleNetV1(nn.Module):
    """Stem conv1x1(24) -> BN -> ReLU; per stage, ``blocks[i]`` ShuffleV1Blocks (the first one
    stride 2, its branch ``stage_channels[i] - in_channels`` wide so that the concatenation has
    ``stage_channels[i]``); global average pool; Dense."""
    num_classes: int
    stage_channels: Sequence[int] = (240, 480, 960)
    blocks: Sequence[int] = (4, 8, 4)
    groups: int = 3
    depthwise_impl: str = "auto"
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False, extra_features: tuple[str, ...] = ()):
        x = conv(24, 1, dtype=self.dtype, name="conv1")(x)
        x = nn.relu(batch_norm(train, self.bn_axis_name, self.dtype, name="bn1")(x))
        for s, (c, n) in enumerate(zip(self.stage_channels, self.blocks)):
            for b in range(n):
                width = c - x.shape[-1] if b == 0 else c
                first_groups = 1 if x.shape[-1] == 24 else self.groups
                last = b == n - 1 and n > 1  # a stride-1 block: its sum is the whole output
                x = ShuffleV1Block(width, 2 if b == 0 else 1, self.groups, first_groups, self.depthwise_impl,
                                   self.dtype, self.bn_axis_name, return_preact=last,
                                   name=f"layer{s + 1}_{b}")(x, train)
                if last:
                    x, pre = x
                    sow_preact(self, s + 1, pre, (f"layer{s + 1}_{b}", "bn3"), extra_features)
            sow_feature(self, f"stage{s + 1}", x)
        return classifier(self, x, "fc", extra_features)


class ShuffleV2Block(nn.Module):
    """ShuffleNet V2 unit. Stride 1 (basic): split the channels in halves, keep the first, and
    1x1 -> BN -> ReLU -> 3x3 depthwise -> BN -> 1x1 -> BN -> ReLU on the second; concatenate,
    shuffle (2 groups). Stride 2 (down-sampling): both branches read the whole input, the left
    3x3 depthwise(2) -> BN -> 1x1 -> BN -> ReLU, the right 1x1 -> BN -> ReLU -> 3x3 depthwise(2) ->
    BN -> 1x1 -> BN -> ReLU, each ``features // 2`` wide; concatenate, shuffle."""
    features: int
    stride: int
    depthwise_impl: str = "auto"
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    return_preact: bool = False  # stride 1: return (output, [left, branch before its ReLU])

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = lambda name: batch_norm(train, self.bn_axis_name, self.dtype, name=name)
        pw = lambda c, name: conv(c, 1, dtype=self.dtype, name=name)  # noqa: E731
        dw = lambda stride, name: DepthwiseConv(stride, self.depthwise_impl, self.dtype, name=name)  # noqa: E731
        if self.stride == 1:
            half = x.shape[-1] // 2
            left, right = x[..., :half], x[..., half:]
            y = nn.relu(bn("bn1")(pw(right.shape[-1], "conv1")(right)))
            y = bn("bn2")(dw(1, "conv2")(y))
            pre = bn("bn3")(pw(right.shape[-1], "conv3")(y))
            out = channel_shuffle(jnp.concatenate([left, nn.relu(pre)], axis=-1), 2)
            return (out, jnp.concatenate([left, pre], axis=-1)) if self.return_preact else out
        mid = self.features // 2
        left = bn("bn1")(dw(2, "conv1")(x))
        left = nn.relu(bn("bn2")(pw(mid, "conv2")(left)))
        right = nn.relu(bn("bn3")(pw(mid, "conv3")(x)))
        right = bn("bn4")(dw(2, "conv4")(right))
        right = nn.relu(bn("bn5")(pw(mid, "conv5")(right)))
        return channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


class ShuffleNetV2(nn.Module):
    """Stem conv1x1(24) -> BN -> ReLU; per stage a down-sampling block then ``blocks[i]`` basic
    blocks, ``stage_channels[i]`` wide; conv1x1(``last_channels``) -> BN -> ReLU; global average
    pool; Dense."""
    num_classes: int
    stage_channels: Sequence[int] = (116, 232, 464)
    blocks: Sequence[int] = (3, 7, 3)
    last_channels: int = 1024
    depthwise_impl: str = "auto"
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False, extra_features: tuple[str, ...] = ()):
        bn = lambda name: batch_norm(train, self.bn_axis_name, self.dtype, name=name)
        x = nn.relu(bn("bn1")(conv(24, 1, dtype=self.dtype, name="conv1")(x)))
        for s, (c, n) in enumerate(zip(self.stage_channels, self.blocks)):
            for b in range(n + 1):
                last = b == n and n > 0  # a stride-1 (basic) block
                x = ShuffleV2Block(c, 2 if b == 0 else 1, self.depthwise_impl, self.dtype, self.bn_axis_name,
                                   return_preact=last, name=f"layer{s + 1}_{b}")(x, train)
                if last:
                    x, pre = x
                    sow_preact(self, s + 1, pre, None, extra_features)
            sow_feature(self, f"stage{s + 1}", x)
        x = nn.relu(bn("bn2")(conv(self.last_channels, 1, dtype=self.dtype, name="conv2")(x)))
        return classifier(self, x, "fc", extra_features)
