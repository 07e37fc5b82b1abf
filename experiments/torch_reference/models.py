"""PyTorch counterparts of the kdjax models that the benchmark and the Fashion-MNIST recipe use,
layer for layer (same convolutions, paddings, strides, BatchNorm placement, shortcuts, heads and
parameter counts; ``check_params.py`` compares the counts with ``kdjax.models.num_params``).

Plain PyTorch, never imported by kdjax (torch is not a kdjax dependency). Layouts:

  resnet18, resnet34         kuangliu CIFAR ResNet (3x3 stride-1 stem, no max-pool) = kdjax resnet18/34
  resnet8x4, resnet32x4, ... RepDistiller CIFAR ResNets (depth 6n+2, basic blocks) = kdjax resnet{d}[x4]
  mobilenetv2                kuangliu CIFAR MobileNetV2 (stride-1 stem, conv shortcuts) = kdjax mobilenetv2
  cnn_small, cnn_tiny        kdjax.models.digits.SmallCNN
  mlp                        kdjax.models.digits.MLP (hidden=(32,) by default)

Initialisation follows kdjax (and therefore Flax), so a whole training recipe starts from the same
distribution: convolutions kaiming-normal fan_out (variance 2 / (k*k*out)), dense kernels
LeCun truncated normal (variance 1 / fan_in, truncated at 2 std, like flax's default), biases 0,
BatchNorm scale 1 and bias 0 (PyTorch's momentum 0.1 = Flax's 0.9, eps 1e-5 in both).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """kxk convolution with padding k // 2 and no bias (kdjax.models.layers.conv)."""
    return nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)


class BasicBlock(nn.Module):
    """conv3x3(stride) -> BN -> ReLU -> conv3x3 -> BN, + shortcut (conv1x1(stride) -> BN when the
    stride or channel count changes), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = conv(cin, cout, 3, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = conv(cout, cout, 3), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class ResNet(nn.Module):
    """kdjax.models.resnet.ResNet: stem conv3x3 -> BN -> ReLU, stages of basic blocks (stride 2 at
    the start of every stage but the first), global average pool, Linear."""

    def __init__(self, num_classes: int, stem_channels=16, stage_channels=(16, 32, 64), blocks=(3, 3, 3), in_ch=3):
        super().__init__()
        self.conv1, self.bn1 = conv(in_ch, stem_channels, 3), nn.BatchNorm2d(stem_channels)
        layers, c = [], stem_channels
        for s, (out, n) in enumerate(zip(stage_channels, blocks)):
            for b in range(n):
                layers.append(BasicBlock(c, out, 2 if (s > 0 and b == 0) else 1))
                c = out
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(x.mean((2, 3)))


def cifar_resnet(depth: int, widths=(16, 16, 32, 64), **kw) -> ResNet:
    n = (depth - 2) // 6
    return ResNet(stem_channels=widths[0], stage_channels=tuple(widths[1:]), blocks=(n, n, n), **kw)


class InvertedResidual(nn.Module):
    """1x1 expand -> BN -> ReLU -> 3x3 depthwise(stride) -> BN -> ReLU -> 1x1 project -> BN;
    residual only at stride 1 (identity, or conv1x1 -> BN when the channels change)."""

    def __init__(self, cin: int, cout: int, expansion: int, stride: int):
        super().__init__()
        hidden = cin * expansion
        self.stride = stride
        self.conv1, self.bn1 = conv(cin, hidden, 1), nn.BatchNorm2d(hidden)
        self.conv2, self.bn2 = conv(hidden, hidden, 3, stride, groups=hidden), nn.BatchNorm2d(hidden)
        self.conv3, self.bn3 = conv(hidden, cout, 1), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride == 1 and cin != cout:
            self.shortcut = nn.Sequential(conv(cin, cout, 1), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return y + self.shortcut(x) if self.stride == 1 else y


class MobileNetV2(nn.Module):
    """kuangliu CIFAR MobileNetV2 = kdjax.models.mobilenetv2 (stride-1 stem, conv shortcuts)."""

    CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int, in_ch=3):
        super().__init__()
        self.conv1, self.bn1 = conv(in_ch, 32, 3), nn.BatchNorm2d(32)
        layers, c = [], 32
        for t, out, n, s in self.CFG:
            for k in range(n):
                layers.append(InvertedResidual(c, out, t, s if k == 0 else 1))
                c = out
        self.layers = nn.Sequential(*layers)
        self.conv2, self.bn2 = conv(c, 1280, 1), nn.BatchNorm2d(1280)
        self.fc = nn.Linear(1280, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class SmallCNN(nn.Module):
    """kdjax.models.digits.SmallCNN: per stage [conv3x3 -> BN -> ReLU] * layers (the first conv of
    later stages has stride 2), global average pool, Linear."""

    def __init__(self, num_classes: int, channels=(32, 64), layers_per_stage=(2, 2), in_ch=1):
        super().__init__()
        layers, c = [], in_ch
        for s, (out, n) in enumerate(zip(channels, layers_per_stage)):
            for k in range(n):
                layers += [conv(c, out, 3, 2 if (s > 0 and k == 0) else 1), nn.BatchNorm2d(out), nn.ReLU()]
                c = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class MLP(nn.Module):
    """kdjax.models.digits.MLP: flatten -> [Linear(h) -> ReLU] * len(hidden) -> Linear."""

    def __init__(self, num_classes: int, hidden=(32,), in_features=28 * 28):
        super().__init__()
        layers, c = [], in_features
        for h in hidden:
            layers += [nn.Linear(c, h), nn.ReLU()]
            c = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.head(self.body(x.flatten(1)))


MODELS = {
    "resnet18": lambda nc, shape: ResNet(nc, 64, (64, 128, 256, 512), (2, 2, 2, 2), in_ch=shape[-1]),
    "resnet34": lambda nc, shape: ResNet(nc, 64, (64, 128, 256, 512), (3, 4, 6, 3), in_ch=shape[-1]),
    **{f"resnet{d}": (lambda d: lambda nc, shape: cifar_resnet(d, num_classes=nc, in_ch=shape[-1]))(d)
       for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": lambda nc, shape: cifar_resnet(8, (32, 64, 128, 256), num_classes=nc, in_ch=shape[-1]),
    "resnet32x4": lambda nc, shape: cifar_resnet(32, (32, 64, 128, 256), num_classes=nc, in_ch=shape[-1]),
    "mobilenetv2": lambda nc, shape: MobileNetV2(nc, in_ch=shape[-1]),
    "cnn_small": lambda nc, shape: SmallCNN(nc, (32, 64), (2, 2), in_ch=shape[-1]),
    "cnn_tiny": lambda nc, shape: SmallCNN(nc, (16, 32), (2, 1), in_ch=shape[-1]),
    "mlp": lambda nc, shape: MLP(nc, (32,), in_features=math.prod(shape)),
    # kdjax's ImageNet layouts are torchvision's and timm's own (parity-tested in tests/test_pretrained.py):
    # their counterparts are those libraries' models, imported only when asked for
    "resnet18_imagenet": lambda nc, shape: _torchvision("resnet18", nc),
    "resnet34_imagenet": lambda nc, shape: _torchvision("resnet34", nc),
    "resnet50_imagenet": lambda nc, shape: _torchvision("resnet50", nc),
    "deit_small_distilled_patch16": lambda nc, shape: _timm("deit_small_distilled_patch16_224", nc),
}


def _torchvision(name: str, num_classes: int) -> nn.Module:
    import torchvision

    return getattr(torchvision.models, name)(num_classes=num_classes)


def _timm(name: str, num_classes: int) -> nn.Module:
    import timm

    return timm.create_model(name, num_classes=num_classes)  # distilled: the mean of both heads, as kdjax


def init_like_flax(model: nn.Module) -> nn.Module:
    """Re-initialises `model` with kdjax's (Flax's) initialisers; see the module docstring."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            std = math.sqrt(1.0 / m.in_features) / 0.87962566103423978  # flax lecun_normal (truncated)
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def get_model(name: str, num_classes: int, image_shape=(32, 32, 3)) -> nn.Module:
    """Model `name` for (H, W, C) inputs, initialised as kdjax initialises it."""
    if name not in MODELS:
        raise ValueError(f"no PyTorch counterpart for {name!r}; have: {', '.join(sorted(MODELS))}")
    return init_like_flax(MODELS[name](num_classes, tuple(image_shape)))


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def num_bn_stats(model: nn.Module) -> int:
    """Running means and variances (kdjax's 'batch_stats'), without num_batches_tracked."""
    return sum(b.numel() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var")))
