"""The language-model divergences as image-classification methods: reverse_kl, generalized_jsd,
skew_kl, skew_reverse_kl, taid, ab_divergence, topk_kd (registered in this order, after 'ce': the
registry's order is a contract, so methods added later are appended at its end).

Each is one `kdjax.losses.sequence` function on the student's and the teacher's logits; TAID's
interpolation t is the Distiller's own state (collection 'taid', checkpointed with the run and
advanced once per training step by `losses.taid_update`), as CTKD's step count is.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax import losses
from kdjax.distill.core import AXIS, Context
from kdjax.distill.ensemble import _teacher_logits
from kdjax.distill.registry import defaults, logit_term, own_temperature, register, term

TAID_COLLECTION = "taid"  # TAIDSchedule's t, prev_loss, momentum and step count


def _unit(where: str, value, *, closed_high: bool = True) -> float:
    value = float(value)
    if not (0.0 <= value <= 1.0 if closed_high else 0.0 <= value < 1.0):
        raise ValueError(f"{where} must be in [0, 1{']' if closed_high else ')'}, got {value}")
    return value


# Reverse KL (MiniLLM, Gu et al. ICLR 2024; token-level as jongwooko/distillm's reverse_kl). KD's
# recipe for the image pairs (CE 0.1, 0.9, the shared temperature with kd's T^2 factor).
@register("reverse_kl", paper="Gu, Dong, Wei, Huang. MiniLLM: Knowledge Distillation of Large Language Models "
                              "(ICLR 2024)",
          ce_weight=0.1, defaults=defaults(0.9, temperature=None), loss="reverse_kl", temperature=True)
def _reverse_kl(h, temperature, data):
    fn = functools.partial(logit_term, losses.reverse_kl, temperature=own_temperature(h, temperature))
    return [term("reverse_kl", fn, h)]


# GKD (Agarwal et al. ICLR 2024): TRL's GKDConfig defaults beta 0.5, temperature 1 (no T^2).
# TRL's GKD trains on the divergence alone; for the image pairs the CE 0.1 / 0.9 split of kd.
@register("generalized_jsd", paper="Agarwal, Vieillard, Zhou, Stanczyk, Ramos Garea, Geist, Bachem. On-Policy "
                                   "Distillation of Language Models: Learning from Self-Generated Mistakes (ICLR 2024)",
          ce_weight=0.1, defaults=defaults(0.9, beta=0.5, temperature=1.0), loss="generalized_jsd", temperature=True)
def _generalized_jsd(h, temperature, data):
    fn = functools.partial(logit_term, losses.generalized_jsd, beta=_unit("distill.generalized_jsd.beta", h["beta"]),
                           temperature=own_temperature(h, temperature))
    return [term("generalized_jsd", fn, h)]


# DistiLLM (Ko et al. ICML 2024): skew alpha 0.1 (its --skew-alpha default), no temperature.
@register("skew_kl", paper="Ko, Kim, Chen, Yun. DistiLLM: Towards Streamlined Distillation for Large Language "
                           "Models (ICML 2024)",
          ce_weight=0.1, defaults=defaults(0.9, alpha=0.1), loss="skew_kl")
def _skew_kl(h, temperature, data):
    fn = functools.partial(logit_term, losses.skew_kl, alpha=_unit("distill.skew_kl.alpha", h["alpha"]))
    return [term("skew_kl", fn, h)]


@register("skew_reverse_kl", paper="Ko, Kim, Chen, Yun. DistiLLM: Towards Streamlined Distillation for Large "
                                   "Language Models (ICML 2024)",
          ce_weight=0.1, defaults=defaults(0.9, alpha=0.1), loss="skew_reverse_kl")
def _skew_reverse_kl(h, temperature, data):
    fn = functools.partial(logit_term, losses.skew_reverse_kl,
                           alpha=_unit("distill.skew_reverse_kl.alpha", h["alpha"]))
    return [term("skew_reverse_kl", fn, h)]


class TAIDSchedule(nn.Module):
    """TAID's loss with its interpolation t as state: the loss at the current t, then (in training)
    `losses.taid_update` with this step's loss averaged over the data-parallel devices, so every
    device keeps the same t. The state (t, prev_loss, momentum, step) lives in collection 'taid',
    which the trainer checkpoints and restores with the distiller, so a resumed run continues the
    schedule. `num_steps` is the stage's number of training steps (the reference's
    estimated_stepping_batches)."""

    num_steps: int | None
    t_start: float = 0.4
    t_end: float = 1.0
    alpha: float = 5e-4
    beta: float = 0.99
    adaptive: bool = True

    @nn.compact
    def __call__(self, student, teacher, ctx: Context):
        init = losses.taid_init(self.t_start)
        state = {k: self.variable(TAID_COLLECTION, k, lambda v=v: v) for k, v in init.items()}
        step = self.variable(TAID_COLLECTION, "step", lambda: jnp.zeros((), jnp.float32))
        loss = losses.taid(student, teacher, state["t"].value)
        if ctx.train and self.is_mutable_collection(TAID_COLLECTION) and not self.is_initializing():
            if self.num_steps is None:
                raise ValueError("taid needs the schedule's length: pass build_terms(..., num_steps=N) (the trainer "
                                 "passes the stage's training steps)")
            new = losses.taid_update({k: v.value for k, v in state.items()}, jax.lax.pmean(loss, AXIS),
                                     step.value, self.num_steps, t_start=self.t_start, t_end=self.t_end,
                                     alpha=self.alpha, beta=self.beta, adaptive=self.adaptive)
            for k, v in new.items():
                state[k].value = v
            step.value = step.value + 1.0
        return loss


def _taid_fn(student, teacher, ctx, **kw):
    teacher = _teacher_logits(student, teacher, ctx, 1.0)
    return TAIDSchedule(**kw, name="taid_schedule")(student, teacher, ctx)


# TAID (Shing et al. ICLR 2025): SakanaAI/TAID scripts/*/taid.sh (--taid_t_start 0.4 --taid_alpha
# 5e-4 --taid_beta 0.99; t_end 1, adaptive); its training loss is the TAID term alone.
@register("taid", paper="Shing, Misaki, Bao, Yokoi, Akiba. TAID: Temporally Adaptive Interpolated Distillation for "
                        "Efficient Knowledge Transfer in Language Models (ICLR 2025)",
          ce_weight=0.1, defaults=defaults(0.9, t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99, adaptive=True),
          loss="taid")
def _taid(h, temperature, data):
    kw = {"t_start": _unit("distill.taid.t_start", h["t_start"], closed_high=False),
          "t_end": _unit("distill.taid.t_end", h["t_end"]),
          "alpha": _unit("distill.taid.alpha", h["alpha"]), "beta": _unit("distill.taid.beta", h["beta"])}
    if not kw["t_start"] < kw["t_end"]:
        raise ValueError(f"distill.taid.t_start={kw['t_start']} must be < distill.taid.t_end={kw['t_end']}")
    if not isinstance(h["adaptive"], bool):
        raise ValueError(f"distill.taid.adaptive must be True or False, got {h['adaptive']!r}")
    num_steps = data.get("num_steps")
    fn = functools.partial(_taid_fn, **kw, adaptive=h["adaptive"],
                           num_steps=None if num_steps is None else int(num_steps))
    return [term("taid", fn, h)]


# ABKD (Wang et al. ICML 2025): ghwang-s/abkd README's CIFAR-100 command (train_ab.sh: alpha + beta
# 1.1, alpha 0.8 -> beta 0.3; distillation weight b = 32 for resnet56 -> resnet20); the shared
# temperature; CE weight 1 (its train script's CE weight was not read here: RepDistiller's -r 1).
@register("ab_divergence", paper="Wang, Yang, Wang, Wang, Xu, Huang. ABKD: Pursuing a Proper Allocation of the "
                                 "Probability Mass in Knowledge Distillation via alpha-beta-Divergence (ICML 2025)",
          ce_weight=1.0, defaults=defaults(32.0, alpha=0.8, beta=0.3, temperature=None), loss="ab_divergence",
          temperature=True)
def _ab_divergence(h, temperature, data):
    alpha, beta = float(h["alpha"]), float(h["beta"])
    if not (math.isfinite(alpha) and math.isfinite(beta)):
        raise ValueError(f"distill.ab_divergence.alpha and .beta must be finite numbers, got {alpha} and {beta}")
    fn = functools.partial(logit_term, losses.ab_divergence, alpha=alpha, beta=beta,
                           temperature=own_temperature(h, temperature))
    return [term("ab_divergence", fn, h)]


def _topk_fn(student, teacher, ctx, *, k, remainder, temperature):
    teacher = _teacher_logits(student, teacher, ctx, temperature)
    if k > student.shape[-1]:
        raise ValueError(f"distill.topk_kd.k={k} exceeds the {student.shape[-1]} classes of the logits")
    # 'bucket' keeps the teacher's log-probabilities (the rest mass is known); 'zero' its logits
    values = jax.nn.log_softmax(teacher, axis=-1) if remainder == "bucket" else teacher
    values, ids = jax.lax.top_k(values, k)
    return losses.topk_kd(student, values, ids, temperature, remainder=remainder)


# KD from the teacher's top-k logits (DistillKit's sparse KL, T^2-scaled as its KLDLoss): kd's
# recipe (CE 0.1, 0.9, the shared temperature), the top 5 classes, the rest mass taken as zero.
@register("topk_kd", paper="(top-k teacher logits: arcee-ai/DistillKit sparse_kl_div; no single paper)",
          ce_weight=0.1, defaults=defaults(0.9, k=5, remainder="zero", temperature=None), loss="topk_kd",
          temperature=True)
def _topk_kd(h, temperature, data):
    k = h["k"]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"distill.topk_kd.k must be an integer >= 1, got {k!r}")
    if h["remainder"] not in ("zero", "bucket"):
        raise ValueError(f"distill.topk_kd.remainder must be 'zero' or 'bucket', got {h['remainder']!r}")
    fn = functools.partial(_topk_fn, k=k, remainder=h["remainder"], temperature=own_temperature(h, temperature))
    return [term("topk_kd", fn, h)]
