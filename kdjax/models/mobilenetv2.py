"""MobileNetV2 for 32x32 inputs: the kuangliu CIFAR layout (``mobilenetv2``, exactly the
MobileNetV2 in shared/bench/torch_kd_step.py) and RepDistiller's ``mobile_half``
(``mobilenetv2_half``: width 0.5, stride-2 stem, identity-only residuals); and torchvision's
ImageNet ``mobilenet_v2`` (``mobilenetv2_imagenet``: stride-2 stem, ReLU6, no expand conv in the
t = 1 block, identity-only residuals, dropout 0.2 before the classifier)."""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import flax.linen as nn

from .layers import DepthwiseConv, batch_norm, classifier, conv, sow_feature, sow_preact

# (expansion t, out channels c, repeats n, first stride s)
CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
# Index of the cfg group that ends each resolution stage (RepDistiller's f1..f4).
STAGE_ENDS = (1, 2, 4, 6)
# torchvision's strides: the second group also downsamples (kuangliu set it to 1 for 32x32 inputs).
IMAGENET_CFG = tuple((t, c, n, 2 if g == 1 else s) for g, (t, c, n, s) in enumerate(CFG))
ACTIVATIONS = {"relu": nn.relu, "relu6": nn.relu6}


class InvertedResidual(nn.Module):
    """1x1 expand -> BN -> ReLU -> 3x3 depthwise(stride) -> BN -> ReLU -> 1x1 project -> BN
    (linear bottleneck; the expand conv is present even for t = 1, as in both references).
    Residual only when stride == 1: identity if channels match, otherwise conv1x1 -> BN when
    ``conv_shortcut`` (kuangliu) or none (RepDistiller). ``expand_t1=False`` (torchvision) drops the
    expand conv (conv1/bn1) when t = 1; ``activation``: 'relu' or 'relu6' (torchvision)."""
    features: int
    expansion: int
    stride: int
    conv_shortcut: bool = True
    expand_t1: bool = True
    activation: str = "relu"
    depthwise_impl: str = "auto"
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = lambda name: batch_norm(train, self.bn_axis_name, self.dtype, name=name)
        act = ACTIVATIONS[self.activation]
        hidden = x.shape[-1] * self.expansion
        y = x
        if self.expansion != 1 or self.expand_t1:
            y = act(bn("bn1")(conv(hidden, 1, dtype=self.dtype, name="conv1")(x)))
        y = DepthwiseConv(self.stride, self.depthwise_impl, self.dtype, name="conv2")(y)
        y = act(bn("bn2")(y))
        y = bn("bn3")(conv(self.features, 1, dtype=self.dtype, name="conv3")(y))
        if self.stride != 1:
            return y
        if x.shape[-1] == self.features:
            return y + x
        if self.conv_shortcut:
            return y + bn("shortcut_bn")(conv(self.features, 1, dtype=self.dtype, name="shortcut_conv")(x))
        return y


class MobileNetV2(nn.Module):
    """Stem conv3x3(stride ``stem_stride``) -> BN -> ReLU, the 17 inverted-residual blocks of
    ``CFG`` (channels ``int(c * width_mult)``), conv1x1 -> BN -> ReLU to ``last_channel``
    (1280, or ``int(1280 * width_mult)`` if width_mult > 1), global average pool, Dense.

    Features (one per resolution stage, taken after cfg groups 1, 2, 4, 6 as RepDistiller's
    f1..f4; block outputs are linear bottlenecks, so these are not post-ReLU):
    ``stage1`` .. ``stage4`` (32, 16, 8, 4 px for kuangliu on 32x32; 16, 8, 4, 2 px for
    mobile_half), ``embedding`` (B, 1280), ``logits``.

    ``depthwise_impl``: see :class:`kdjax.models.layers.DepthwiseConv`. On request
    (``extra_features``, `kdjax.models.layers.EXTRA_FEATURES`): ``preact_stage<N>`` = ``stage<N>``
    (no ReLU follows a linear bottleneck) with ``preact_margin<N>`` from the stage's last block's
    bn3 (as OFD's ``get_bn_before_relu``), and ``class_map`` (``fc`` at every position of the
    map after conv2/bn2/ReLU).

    ``imagenet=True``: torchvision's layout (`IMAGENET_CFG` strides, ReLU6, no t = 1 expand conv;
    pass ``stem_stride=2, conv_shortcut=False``, as `mobilenetv2_imagenet` does), with
    ``dropout`` before the classifier (torchvision: 0.2)."""
    num_classes: int
    width_mult: float = 1.0
    stem_stride: int = 1
    conv_shortcut: bool = True
    imagenet: bool = False
    dropout: float = 0.0
    depthwise_impl: str = "auto"
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False, extra_features: tuple[str, ...] = ()):
        bn = lambda name: batch_norm(train, self.bn_axis_name, self.dtype, name=name)
        act = nn.relu6 if self.imagenet else nn.relu
        x = conv(int(32 * self.width_mult), 3, self.stem_stride, dtype=self.dtype, name="conv1")(x)
        x = act(bn("bn1")(x))
        stage = 0
        for g, (t, c, n, s) in enumerate(IMAGENET_CFG if self.imagenet else CFG):
            for k in range(n):
                x = InvertedResidual(int(c * self.width_mult), t, s if k == 0 else 1, self.conv_shortcut,
                                     not self.imagenet, "relu6" if self.imagenet else "relu",
                                     self.depthwise_impl, self.dtype, self.bn_axis_name,
                                     name=f"block{g}_{k}")(x, train)
            if g in STAGE_ENDS:
                stage += 1
                sow_feature(self, f"stage{stage}", x)
                sow_preact(self, stage, x, (f"block{g}_{n - 1}", "bn3"), extra_features)
        last = int(1280 * self.width_mult) if self.width_mult > 1.0 else 1280
        x = act(bn("bn2")(conv(last, 1, dtype=self.dtype, name="conv2")(x)))
        return classifier(self, x, "fc", extra_features, self.dropout, train)


def mobilenetv2(**kw) -> MobileNetV2:
    """kuangliu CIFAR MobileNetV2 (stride-1 stem, conv shortcuts), 2.30M params for 10 classes."""
    return MobileNetV2(**kw)


def mobilenetv2_half(**kw) -> MobileNetV2:
    """RepDistiller ``mobile_half``: width 0.5, stride-2 stem, no conv shortcuts."""
    kw = {"width_mult": 0.5, "stem_stride": 2, "conv_shortcut": False, **kw}
    return MobileNetV2(**kw)


def mobilenetv2_imagenet(**kw) -> MobileNetV2:
    """torchvision ``mobilenet_v2`` (width 1.0): stride-2 stem, ImageNet strides, ReLU6, dropout 0.2;
    3.50M params for 1000 classes."""
    kw = {"stem_stride": 2, "conv_shortcut": False, "imagenet": True, "dropout": 0.2, **kw}
    return MobileNetV2(**kw)
