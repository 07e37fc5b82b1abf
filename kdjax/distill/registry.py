"""The method registry: `METHODS` (method key -> `Method`), the `register` decorator that fills it,
and the toolkit a method's builder uses (`defaults`, `term`, `own_temperature` and the term
functions that adapt a `kdjax.losses` function to ``(student, teacher, ctx)``).

A method is registered beside its own code, in its family's module (`kdjax.distill.logit`,
``.feature``, ``.relation``, ``.contrastive``, ``.adversarial``)::

    @register("nkd", paper="...", ce_weight=1.0, defaults=defaults(1.0, gamma=3.5, temperature=3.0),
              loss="nkd", temperature=True)
    def _nkd(h, temperature, data):
        return [term("nkd", functools.partial(_nkd_fn, gamma=float(h["gamma"]), ...), h)]

`METHODS` keeps the order of registration: the families in the order `kdjax.distill.build`
imports them, each module top to bottom. docs/adding-a-method.md walks through a new one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping

from kdjax import losses
from kdjax.distill.core import Context, Term, _as_names, _pairs
from kdjax.distill.ensemble import _teacher_logits


@dataclasses.dataclass(frozen=True)
class Method:
    """A ready-made method: its default hyper-parameters, how they become terms, and the facts about
    it that configs, the trainer and the tests read (instead of keeping their own lists).

    `build(h, temperature, data)` returns the method's terms (without the hard-label CE term, which
    the trainer adds with weight `ce_weight`). `h` is the method's sub-dict of the config merged
    over `defaults` (its keys are the only ones allowed); `temperature` the shared temperature;
    `data` = {'num_data': int | None, 'dataset_labels': array | None} from the trainer, and
    'logit_standardize' (bool: whether ``distill.logit_standardize`` is on; mlkd's 'auto' lists)
    and 'num_steps' (int | None: the stage's training steps; TAID's schedule).

    The facts (all False / None unless the method says otherwise):

    `temperature`: the method's terms soften with a temperature (their fn takes a ``temperature=``
    keyword), which CTKD (``distill.ctkd.enabled``) replaces by its learned one.
    `views`: its terms read the strong augmented view ('strong/logits', ...), so it needs
    ``config.augment.views='weak,strong'``.
    `global_batch`: its own term (the one named after the method) relates the examples of a batch
    to each other, so inside the data-parallel step it sees the all-gathered global batch
    (`Term.global_batch`; `build_terms` sets it).
    `feature_maps`: it reads (B, H, W, C) feature maps of both models (stages, pre-ReLU maps, the
    class map), so it needs a convolutional student (the digits configs switch to cnn_tiny).
    `same_widths`: its paired student and teacher maps must have the same channel count.
    `loss`: the name of the `kdjax.losses` function its term computes (None: none).
    `vit_student`: it reads a distilled ViT's two heads (``logits_cls``, ``logits_dist``: DeiT), so
    it needs such a student (the digits configs switch to a small distilled ViT).
    """

    paper: str
    ce_weight: float
    defaults: Mapping[str, Any]
    build: Callable[[Mapping[str, Any], float, Mapping[str, Any]], list[Term]]
    temperature: bool = False
    views: bool = False
    global_batch: bool = False
    feature_maps: bool = False
    same_widths: bool = False
    loss: str | None = None
    vit_student: bool = False


METHODS: dict[str, Method] = {}


def register(name: str, *, paper: str, ce_weight: float, defaults: Mapping[str, Any], loss: str | None = None,
             temperature: bool = False, views: bool = False, global_batch: bool = False,
             feature_maps: bool = False, same_widths: bool = False, vit_student: bool = False):
    """Decorator: registers `build` as method `name` (``distill.method=name``) with these `Method`
    fields; returns `build` unchanged."""

    def add(build):
        if name in METHODS:
            raise ValueError(f"distillation method {name!r} is registered twice")
        METHODS[name] = Method(paper=paper, ce_weight=ce_weight, defaults=dict(defaults), build=build,
                               temperature=temperature, views=views, global_batch=global_batch,
                               feature_maps=feature_maps, same_widths=same_widths, loss=loss,
                               vit_student=vit_student)
        return build

    return add


def defaults(weight, student="logits", teacher="logits", warmup_epochs=0.0, **extra):
    """A method's default sub-dict: every method has weight, warmup_epochs, student and teacher
    (feature names), then its own hyper-parameters."""
    return {"weight": weight, "warmup_epochs": warmup_epochs, "student": student,
            "teacher": teacher, **extra}


def term(name: str, fn, h, **fields) -> Term:
    """The `Term` of `fn` with the weight, features and warm-up of the method's sub-dict `h`;
    `fields`: any other `Term` fields (paired=True, init_only=True, ...)."""
    return Term(name, fn, float(h["weight"]), _as_names(h["student"]), _as_names(h["teacher"]),
                float(h["warmup_epochs"]), **fields)


def own_temperature(h, temperature: float) -> float:
    """The method's own temperature (``h['temperature']``), or the shared one when that is None."""
    return float(temperature if h.get("temperature") is None else h["temperature"])


def check_weight(where: str, value) -> float:
    value = float(value)
    if value < 0 or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number >= 0, got {value}")
    return value


def as_floats(value) -> list[float]:
    """'4,3,5' or (4, 3, 5) -> [4.0, 3.0, 5.0]."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return [float(x) for x in items if str(x).strip()]


# ----------------------------------------------------------------------------------------------
# Term functions. Each adapts one `kdjax.losses` function to (student, teacher, ctx).


def ce_term(student_logits, _, ctx: Context, *, label_smoothing: float = 0.0):
    """The hard-label cross-entropy (mixup/cutmix: the mixed labels' weighted sum)."""
    ce = functools.partial(losses.cross_entropy, student_logits, label_smoothing=label_smoothing)
    if ctx.mix_perm is None:
        return ce(ctx.labels)
    return ctx.mix_lam * ce(ctx.labels) + (1.0 - ctx.mix_lam) * ce(ctx.labels[ctx.mix_perm])


def loss_term(loss_fn, student, teacher, _ctx, **kwargs):
    """A term that is just a `kdjax.losses` function of (student, teacher)."""
    return loss_fn(student, teacher, **kwargs)


def logit_term(loss_fn, student, teacher, ctx, **kwargs):
    """A `kdjax.losses` function of (student logits, teacher logits); an ensemble's teachers are
    combined at the loss's `temperature` keyword (T = 1 without one), see `ensemble_logits`."""
    teacher = _teacher_logits(student, teacher, ctx, kwargs.get("temperature", 1.0))
    return loss_fn(student, teacher, **kwargs)


def pairs_term(name, loss_fn, student, teacher, _ctx, **kwargs):
    """Sum of `loss_fn` over paired student/teacher features (RepDistiller sums the groups)."""
    return sum(loss_fn(s, t, **kwargs) for s, t in _pairs(name, student, teacher))
