"""Channel-correlation methods: ickd (registered after the `sequence` family: the registry's order
is a contract, so methods added later are appended at its end)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from kdjax import losses
from kdjax.distill.core import Context
from kdjax.distill.layers import _batch_norm, _torch_kernel
from kdjax.distill.registry import defaults, register, term


class ICKDEmbed(nn.Module):
    """ICKD's student embedding (ADLab-AutoDrive/ICKD ``Embed``): 1x1 conv without bias (PyTorch's
    default initialisation) + BatchNorm, the student's channels -> the teacher's."""

    out: int

    @nn.compact
    def __call__(self, x, ctx: Context):
        x = nn.Conv(self.out, (1, 1), use_bias=False, kernel_init=_torch_kernel, name="conv")(x.astype(jnp.float32))
        return _batch_norm(ctx, "bn")(x)


def _ickd_fn(name, student, teacher, ctx):
    return losses.ickd(ICKDEmbed(teacher.shape[-1], name=f"{name}_embed")(student, ctx), teacher)


# ICKD (Liu et al. ICCV 2021): ADLab-AutoDrive/ICKD Cifar100/train_student.sh (--distill ickd -a 0
# -b 2.5, RepDistiller's -r 1: CE 1, ICKD 2.5) on feat[-2], the last stage's map ('stage[-1]').
@register("ickd", paper="Liu, Chen, Liu, Li, Liu, Gao, Ding. Exploring Inter-Channel Correlation for "
                        "Diversity-preserved Knowledge Distillation (ICCV 2021)",
          ce_weight=1.0, defaults=defaults(2.5, "stage[-1]", "stage[-1]"), loss="ickd", feature_maps=True)
def _ickd(h, temperature, data):
    return [term("ickd", functools.partial(_ickd_fn, "ickd"), h)]
