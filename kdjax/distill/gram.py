"""Gram-matrix and correlation methods added since the registry was pinned: ickd (per-example
channel Gram matrices of feature maps), skd (the batch Gram matrix of the logits) and dist_plus
(DIST plus channel and spatial correlations of the last maps); registered after the `sequence`
family, in this order (the registry's order is a contract: methods added later go at its end)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from kdjax import losses
from kdjax.distill.core import Context
from kdjax.distill.ensemble import _teacher_logits
from kdjax.distill.layers import _batch_norm, _torch_kernel
from kdjax.distill.registry import defaults, own_temperature, register, term


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


def _skd_fn(student, teacher, ctx, *, temperature, tikhonov, direction_weight):
    teacher = _teacher_logits(student, teacher, ctx, temperature)
    levels = losses.skd(student, teacher, temperature, tikhonov, parts=True)
    return {"instance": levels["instance"], "direction": direction_weight * levels["direction"]}


# SKD (Jeong, Lee, Choi CVPR 2026): torchdistill configs/sample/ilsvrc2012/skd (SKDInstanceLoss T 4,
# SKDDirectionLoss tikhonov 0.1, both weight 1, no hard-label CE term). Batch-level (the Gram
# matrix and the covariance are over the batch): global batch. Logged as loss/skd/instance and
# loss/skd/direction (the latter weighted by direction_weight).
@register("skd", paper="Jeong, Lee, Choi. Streamlined Knowledge Distillation (CVPR 2026)", ce_weight=0.0,
          defaults=defaults(1.0, temperature=4.0, tikhonov=0.1, direction_weight=1.0), loss="skd", temperature=True,
          global_batch=True)
def _skd(h, temperature, data):
    tikhonov = float(h["tikhonov"])
    if not tikhonov > 0:
        raise ValueError(f"distill.skd.tikhonov must be > 0 (it keeps the covariance invertible), got {tikhonov}")
    fn = functools.partial(_skd_fn, temperature=own_temperature(h, temperature), tikhonov=tikhonov,
                           direction_weight=float(h["direction_weight"]))
    return [term("skd", fn, h)]


def _dist_plus_fn(student, teacher, ctx, **kwargs):
    (s_logits, s_map), (t_logits, t_map) = student, teacher
    return losses.dist_plus(s_logits, t_logits, s_map, t_map, **kwargs)


# DIST+ (Huang et al. TPAMI 2025): torchdistill configs/sample/ilsvrc2012/dist_plus (DISTPlusLoss on
# the logits and layer4 of both models: beta = gamma = 2, iota = kappa = 1, tau 1, weight 2, CE 1).
# Its feature relations need maps of equal shape: the last stage of each model (the teacher's
# widths). Batch-level (DIST's intra-class and the spatial relation are over the batch): global batch.
@register("dist_plus", paper="Huang, You, Wang, Qian, Xu. DIST+: Knowledge Distillation From a Stronger Adaptive "
                             "Teacher (TPAMI 2025)",
          ce_weight=1.0, defaults=defaults(2.0, "logits,stage[-1]", "logits,stage[-1]", beta=2.0, gamma=2.0, iota=1.0,
                                           kappa=1.0, temperature=1.0), loss="dist_plus", temperature=True,
          global_batch=True, feature_maps=True, same_widths=True)
def _dist_plus(h, temperature, data):
    fn = functools.partial(_dist_plus_fn, beta=float(h["beta"]), gamma=float(h["gamma"]), iota=float(h["iota"]),
                           kappa=float(h["kappa"]), temperature=own_temperature(h, temperature))
    return [term("dist_plus", fn, h)]
