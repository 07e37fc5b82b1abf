"""ResNets for 32x32 inputs: RepDistiller's CIFAR ResNets (depth 6n+2, 3 stages) and the
kuangliu ResNet-18/34/50 (4 stages, 64..512 channels; ResNet-50 with bottleneck blocks, 4x wider
outputs: RepDistiller's CIFAR ``ResNet50``). 3x3 stride-1 stem, no max-pool."""
from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
import flax.linen as nn

from .layers import batch_norm, classifier, conv, sow_feature, sow_preact


class BasicBlock(nn.Module):
    """conv3x3(stride) -> BN -> ReLU -> conv3x3 -> BN, + shortcut, ReLU. The shortcut is
    conv1x1(stride) -> BN when the stride or channel count changes, else identity.
    ``return_preact``: return (output, the sum before the final ReLU)."""
    features: int
    stride: int = 1
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    return_preact: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = lambda name: batch_norm(train, self.bn_axis_name, self.dtype, name=name)
        y = nn.relu(bn("bn1")(conv(self.features, 3, self.stride, dtype=self.dtype, name="conv1")(x)))
        y = bn("bn2")(conv(self.features, 3, 1, dtype=self.dtype, name="conv2")(y))
        if self.stride != 1 or x.shape[-1] != self.features:
            x = bn("shortcut_bn")(conv(self.features, 1, self.stride, dtype=self.dtype, name="shortcut_conv")(x))
        pre = y + x
        return (nn.relu(pre), pre) if self.return_preact else nn.relu(pre)


class Bottleneck(nn.Module):
    """conv1x1 -> BN -> ReLU -> conv3x3(stride) -> BN -> ReLU -> conv1x1(4 x features) -> BN,
    + shortcut, ReLU (torchvision's v1.5: the stride on the 3x3). The shortcut is
    conv1x1(stride) -> BN when the stride or channel count changes, else identity.
    ``return_preact``: return (output, the sum before the final ReLU)."""
    features: int
    stride: int = 1
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    return_preact: bool = False
    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = lambda name: batch_norm(train, self.bn_axis_name, self.dtype, name=name)
        out = self.features * self.expansion
        y = nn.relu(bn("bn1")(conv(self.features, 1, dtype=self.dtype, name="conv1")(x)))
        y = nn.relu(bn("bn2")(conv(self.features, 3, self.stride, dtype=self.dtype, name="conv2")(y)))
        y = bn("bn3")(conv(out, 1, dtype=self.dtype, name="conv3")(y))
        if self.stride != 1 or x.shape[-1] != out:
            x = bn("shortcut_bn")(conv(out, 1, self.stride, dtype=self.dtype, name="shortcut_conv")(x))
        pre = y + x
        return (nn.relu(pre), pre) if self.return_preact else nn.relu(pre)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    """Basic-block ResNet: stem conv3x3(``stem_channels``) -> BN -> ReLU, then one stage per
    entry of ``stage_channels`` with ``blocks[i]`` blocks (stride 2 at the start of every stage
    but the first), global average pool, Dense.

    ``block``: 'basic' (BasicBlock) or 'bottleneck' (Bottleneck, whose output is 4x its
    ``stage_channels`` entry).

    Features: ``stage1`` .. ``stage{len(stage_channels)}`` (each stage's output, after its last
    block's ReLU), ``embedding`` (pooled, (B, stage_channels[-1] x expansion)), ``logits``.
    For 32x32 inputs the stage maps are 32x32, 16x16, 8x8(, 4x4). On request (``extra_features``,
    `kdjax.models.layers.EXTRA_FEATURES`): ``preact_stage<N>`` (the last block's sum before its
    ReLU) with ``preact_margin<N>`` from that block's last BN (bn2; bn3 in a bottleneck), as OFD's
    ``get_bn_before_relu``, and
    ``class_map`` (``fc`` at every position of the last stage's map).

    ``stem``: 'cifar' (conv3x3 stride 1, the CIFAR layouts) or 'imagenet' (torchvision's
    ``resnet18/34/50``: conv7x7 stride 2 -> BN -> ReLU -> 3x3 max-pool stride 2, padding 1; for
    224x224 inputs the stage maps are 56, 28, 14, 7)."""
    num_classes: int
    stem: str = "cifar"
    stem_channels: int = 16
    stage_channels: Sequence[int] = (16, 32, 64)
    blocks: Sequence[int] = (3, 3, 3)
    block: str = "basic"
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False, extra_features: tuple[str, ...] = ()):
        if self.stem not in ("cifar", "imagenet"):
            raise ValueError(f"ResNet stem must be 'cifar' or 'imagenet', got {self.stem!r}")
        imagenet = self.stem == "imagenet"
        x = conv(self.stem_channels, 7 if imagenet else 3, 2 if imagenet else 1, dtype=self.dtype, name="conv1")(x)
        x = nn.relu(batch_norm(train, self.bn_axis_name, self.dtype, name="bn1")(x))
        if imagenet:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for s, (c, n) in enumerate(zip(self.stage_channels, self.blocks)):
            for b in range(n):
                stride = 2 if (s > 0 and b == 0) else 1
                last = b == n - 1
                x = BLOCKS[self.block](c, stride, self.dtype, self.bn_axis_name, return_preact=last,
                                       name=f"layer{s + 1}_{b}")(x, train)
                if last:
                    x, pre = x
                    bn = "bn3" if self.block == "bottleneck" else "bn2"
                    sow_preact(self, s + 1, pre, (f"layer{s + 1}_{b}", bn), extra_features)
            sow_feature(self, f"stage{s + 1}", x)
        return classifier(self, x, "fc", extra_features)


def cifar_resnet(depth: int, widths: Sequence[int] = (16, 16, 32, 64), **kw) -> ResNet:
    """RepDistiller ``ResNet(depth, num_filters=widths, 'basicblock')``: depth = 6n + 2."""
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    return ResNet(stem_channels=widths[0], stage_channels=tuple(widths[1:]), blocks=(n, n, n), **kw)


def resnet18(**kw) -> ResNet:
    """kuangliu / torch_kd_step.py ResNet18 (11.17M params for 10 classes)."""
    return ResNet(stem_channels=64, stage_channels=(64, 128, 256, 512), blocks=(2, 2, 2, 2), **kw)


def resnet34(**kw) -> ResNet:
    return ResNet(stem_channels=64, stage_channels=(64, 128, 256, 512), blocks=(3, 4, 6, 3), **kw)


def resnet50(**kw) -> ResNet:
    """kuangliu / RepDistiller ``ResNet50`` (bottleneck blocks 3-4-6-3, 2048-d embedding;
    23.71M params for 100 classes)."""
    return ResNet(stem_channels=64, stage_channels=(64, 128, 256, 512), blocks=(3, 4, 6, 3), block="bottleneck", **kw)
