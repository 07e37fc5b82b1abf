"""VGG with BatchNorm for CIFAR (RepDistiller ``models/vgg.py``, the ``*_bn`` variants that its
model_dict registers as vgg8/11/13/16/19): five conv blocks, no FC stack, Linear(512) head."""
from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
import flax.linen as nn

from .layers import batch_norm, classifier, conv, sow_feature, sow_preact

CFGS = {
    8: ((64,), (128,), (256,), (512,), (512,)),
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


def _maxpool(x):
    return nn.max_pool(x, (2, 2), strides=(2, 2))


class VGG(nn.Module):
    """Block i = [conv3x3 (with bias) -> BN -> ReLU] * len(cfg[i]). Max-pool 2x2 after blocks
    0, 1, 2 (and after block 3 only for 64x64 inputs, as in the reference), then global average
    pool and Dense.

    Features: ``stage1`` .. ``stage5`` (post-ReLU output of blocks 0..4; for 32x32 inputs
    32, 16, 8, 4, 4 px), ``embedding`` (B, 512), ``logits``. On request (``extra_features``,
    `kdjax.models.layers.EXTRA_FEATURES`): ``preact_stage<N>`` / ``preact_margin<N>`` (block N-1's
    last BatchNorm output, before its ReLU) and ``class_map`` (``classifier`` at every position of
    stage5's map)."""
    num_classes: int
    cfg: Sequence[Sequence[int]] = CFGS[13]
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False, extra_features: tuple[str, ...] = ()):
        h = x.shape[1]
        for b, block in enumerate(self.cfg):
            if b in (1, 2, 3) or (b == 4 and h == 64):
                x = _maxpool(x)
            for k, c in enumerate(block):
                x = conv(c, 3, 1, dtype=self.dtype, use_bias=True, name=f"conv{b}_{k}")(x)
                x = batch_norm(train, self.bn_axis_name, self.dtype, name=f"bn{b}_{k}")(x)
                if k == len(block) - 1:
                    sow_preact(self, b + 1, x, (f"bn{b}_{k}",), extra_features)
                x = nn.relu(x)
            sow_feature(self, f"stage{b + 1}", x)
        return classifier(self, x, "classifier", extra_features)
