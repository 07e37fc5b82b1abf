"""Small models for the 8x8 digits data set (also run on 28x28x1 / 32x32x3 inputs)."""
from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
import flax.linen as nn

from .layers import batch_norm, classifier, conv, sow_feature, sow_preact


class MLP(nn.Module):
    """flatten -> [Dense(h) -> ReLU] * len(hidden) -> Dense(num_classes).

    Features: ``hidden1`` .. ``hidden{len(hidden)}`` (post-ReLU), ``embedding`` (the last
    hidden activation, or the flattened input if ``hidden`` is empty), ``logits``.
    ``bn_axis_name`` is accepted for interface uniformity (there is no BatchNorm).
    ``dropout``: rate of the dropout after every hidden layer (training only; the features are
    taken before it). ``extra_features`` is accepted for interface uniformity: an MLP has no
    feature maps, so it adds nothing."""
    num_classes: int
    hidden: Sequence[int] = (32,)
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False, extra_features: tuple[str, ...] = ()):
        x = x.reshape((x.shape[0], -1))
        for i, h in enumerate(self.hidden):
            x = nn.relu(nn.Dense(h, dtype=self.dtype, name=f"fc{i + 1}")(x))
            sow_feature(self, f"hidden{i + 1}", x)
            if i == len(self.hidden) - 1:
                sow_feature(self, "embedding", x)
            x = nn.Dropout(self.dropout, deterministic=not train or not self.dropout)(x)
        if not self.hidden:
            sow_feature(self, "embedding", x)
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x).astype(jnp.float32)
        sow_feature(self, "logits", logits)
        return logits


class SmallCNN(nn.Module):
    """Plain conv net: stage s = [conv3x3 -> BN -> ReLU] * layers_per_stage[s] at ``channels[s]``
    (first conv of stages after the first has stride 2), then global average pool -> Dense.

    ``widths`` (optional): the output channels of every conv in forward order (conv1_0, conv1_1,
    conv2_0, ...; one entry per conv, i.e. ``sum(layers_per_stage)`` entries), overriding
    ``channels[s]`` conv by conv; this is how a channel-pruned net (``kdjax.prune.channel_prune``)
    is described. ``None`` (default) = ``channels[s]`` for every conv of stage s; ``channels`` and
    ``layers_per_stage`` still give the stages (and strides). Parameter names do not depend on it.

    Features: ``stage1`` .. ``stage{len(channels)}`` (post-ReLU maps), ``embedding`` (B, C) with C
    the last conv's width (``channels[-1]``, or ``widths[-1]``), ``logits``. On 8x8 digits with two
    stages the maps are 8x8 and 4x4. ``dropout``: rate of the dropout before the classifier
    (training only). On request (``extra_features``, `kdjax.models.layers.EXTRA_FEATURES`):
    ``preact_stage<N>`` / ``preact_margin<N>`` (the stage's last BatchNorm output, before its ReLU)
    and ``class_map`` (the head at every position of the last stage's map, without dropout)."""
    num_classes: int
    channels: Sequence[int] = (32, 64)
    layers_per_stage: Sequence[int] = (2, 2)
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    widths: Sequence[int] | None = None
    dropout: float = 0.0

    def conv_widths(self) -> tuple[int, ...]:
        """The output channels of every conv, in forward order (``widths`` or from ``channels``)."""
        default = tuple(int(c) for c, n in zip(self.channels, self.layers_per_stage) for _ in range(n))
        if self.widths is None:
            return default
        widths = tuple(int(w) for w in self.widths)
        if len(widths) != len(default):
            raise ValueError(f"SmallCNN.widths needs one entry per conv ({len(default)} for "
                             f"layers_per_stage={tuple(self.layers_per_stage)}), got {len(widths)}: {widths}")
        if min(widths, default=1) < 1:
            raise ValueError(f"SmallCNN.widths must be positive, got {widths}")
        return widths

    @nn.compact
    def __call__(self, x, train: bool = False, extra_features: tuple[str, ...] = ()):
        widths = iter(self.conv_widths())
        for s, (_, n) in enumerate(zip(self.channels, self.layers_per_stage)):
            for k in range(n):
                stride = 2 if (s > 0 and k == 0) else 1
                x = conv(next(widths), 3, stride, dtype=self.dtype, name=f"conv{s + 1}_{k}")(x)
                x = batch_norm(train, self.bn_axis_name, self.dtype, name=f"bn{s + 1}_{k}")(x)
                if k == n - 1:
                    sow_preact(self, s + 1, x, (f"bn{s + 1}_{k}",), extra_features)
                x = nn.relu(x)
            sow_feature(self, f"stage{s + 1}", x)
        return classifier(self, x, "head", extra_features, self.dropout, train)
