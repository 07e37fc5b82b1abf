"""Methods for vision-transformer students: deit (registered after 'ce': the registry's order is a
contract, new methods are appended).

DeiT (Touvron et al., ICML 2021) gives the student a distillation token with its own head: a
distilled ViT (`kdjax.models.ViT` with ``distilled=True``, e.g. ``deit_tiny_distilled_patch4_32``)
sows the two heads' logits as the features ``logits_cls`` and ``logits_dist``, and returns their
mean as ``logits`` (what it is evaluated on). The ``deit`` term trains the class head on the labels
and the distillation head on the teacher (`kdjax.losses.deit`), so its method has no separate CE
term (ce_weight 0): the CE on the class head is inside it, with ``config.loss.label_smoothing``.

Other logit methods can read the distillation head instead of the averaged logits by naming it:
``--config.distill.method=deit+dkd --config.distill.dkd.student=logits_dist``. Combined with
another method, the shared CE term (that method's ce_weight) reads the averaged ``logits``.
"""

from __future__ import annotations

import functools

from kdjax import losses
from kdjax.distill.ensemble import _teacher_logits
from kdjax.distill.registry import check_weight, defaults, register, term

DEIT_MODES = ("hard", "soft")


def _deit_fn(student, teacher, ctx, *, mode, alpha, tau, label_smoothing):
    cls, dist = student
    teacher = _teacher_logits(dist, teacher, ctx, tau)  # an ensemble's teachers combined at tau
    loss = functools.partial(losses.deit, cls, dist, teacher, mode=mode, alpha=alpha, temperature=tau,
                             label_smoothing=label_smoothing)
    if ctx.mix_perm is None:
        return loss(ctx.labels)
    # mixup / CutMix: the class head's CE against both labels, weighted (the distillation part,
    # which does not read the labels, enters with weight lam + (1 - lam) = 1)
    return ctx.mix_lam * loss(ctx.labels) + (1.0 - ctx.mix_lam) * loss(ctx.labels[ctx.mix_perm])


# DeiT: facebookresearch/deit main.py --distillation-type hard|soft, --distillation-alpha 0.5,
# --distillation-tau 1.0; the paper's recipe distils with 'hard'.
@register("deit", paper="Touvron, Cord, Douze, Massa, Sablayrolles, Jegou. Training data-efficient image "
                        "transformers & distillation through attention (ICML 2021)",
          ce_weight=0.0, defaults=defaults(1.0, student="logits_cls,logits_dist", mode="hard", alpha=0.5, tau=1.0),
          loss="deit", vit_student=True)
def _deit(h, temperature, data):
    mode = str(h["mode"])
    if mode not in DEIT_MODES:
        raise ValueError(f"unknown config.distill.deit.mode {mode!r}; choose one of: {', '.join(DEIT_MODES)}")
    alpha = check_weight("distill.deit.alpha", h["alpha"])
    if alpha > 1:
        raise ValueError(f"config.distill.deit.alpha must be in [0, 1], got {alpha}")
    tau = float(h["tau"])
    if tau <= 0:
        raise ValueError(f"config.distill.deit.tau must be > 0, got {tau}")
    fn = functools.partial(_deit_fn, mode=mode, alpha=alpha, tau=tau,
                           label_smoothing=float(data.get("label_smoothing", 0.0)))
    return [term("deit", fn, h)]
