"""The method layer: a distillation config -> named, weighted loss terms.

A student's objective is a weighted sum of named terms (torchdistill's idea)::

    total = sum_i  weight_i * ramp_i(epoch) * term_i(student features, teacher features)

A *method* is a ready-made list of terms with the weights the reference code uses. Adding one
needs one loss function in `kdjax.losses` and one entry in `METHODS` below; nothing else changes.

Config (``config.distill``, built by `get_config`)::

    method        'kd'; several joined with '+' combine their terms ('kd+at'); 'ce' = labels only
    temperature   softening temperature shared by the logit methods (kd, dkd, ...)
    ce_weight     weight of the hard-label cross-entropy; None -> the method's reference weight
    <method>      one sub-dict per method with its hyper-parameters, e.g. distill.kd.weight
    terms         extra custom terms: name -> dict(loss=<kdjax.losses function name>, weight=...,
                  student=<feature name or tuple>, teacher=<...>, warmup_epochs=0, kwargs={...})

Weight naming. RepDistiller writes ``gamma*CE + alpha*KD + beta*feature``, mdistiller writes
``ce_weight*CE + kd_weight*KD``; here every term carries its own ``weight`` and the CE weight is
``distill.ce_weight``, so "alpha" never has to be interpreted.

Trainable adapters (regressors, embeddings, ...) are Linen modules created inside a term's
function; `Distiller` owns them, and the trainer optimises them together with the student.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from kdjax import losses


@dataclasses.dataclass(frozen=True)
class Context:
    """Per-batch inputs that a term may need besides the features."""

    labels: jax.Array  # (B,) int
    train: bool = True
    mix_perm: jax.Array | None = None  # mixup/cutmix partner of each example
    mix_lam: jax.Array | None = None  # weight of the example itself
    indices: jax.Array | None = None  # global data-set index of each example (CRD)
    rng: jax.Array | None = None  # for terms that sample (CRD negatives)


@dataclasses.dataclass(frozen=True)
class Term:
    """One named, weighted term of the objective.

    fn(student, teacher, ctx) -> scalar, where `student`/`teacher` are the feature arrays named by
    `student`/`teacher` (a single array for one name, a list for several, None for no names).
    `weight` is multiplied by a linear ramp min(1, epoch / warmup_epochs) when warmup_epochs > 0.
    """

    name: str
    fn: Callable[..., jax.Array]
    weight: float
    student: tuple[str, ...] = ("logits",)
    teacher: tuple[str, ...] = ()
    warmup_epochs: float = 0.0

    def weight_at(self, epoch: jax.Array) -> jax.Array:
        if self.warmup_epochs <= 0:
            return jnp.asarray(self.weight, jnp.float32)
        return self.weight * jnp.minimum(1.0, epoch / self.warmup_epochs)


def _pick(features: Mapping[str, jax.Array], names: tuple[str, ...]):
    if not names:
        return None
    if len(names) == 1:
        return features[names[0]]
    return [features[n] for n in names]


class Distiller(nn.Module):
    """Evaluates every term; owns the terms' trainable adapters as sub-modules."""

    terms: tuple[Term, ...]

    @nn.compact
    def __call__(self, student_features, teacher_features, ctx: Context) -> dict[str, jax.Array]:
        return {
            t.name: t.fn(_pick(student_features, t.student), _pick(teacher_features, t.teacher), ctx)
            for t in self.terms
        }


# ----------------------------------------------------------------------------------------------
# Term functions. Each adapts one `kdjax.losses` function to (student, teacher, ctx).


def _ce_term(student_logits, _, ctx: Context, *, label_smoothing: float = 0.0):
    ce = functools.partial(losses.cross_entropy, student_logits, label_smoothing=label_smoothing)
    if ctx.mix_perm is None:
        return ce(ctx.labels)
    return ctx.mix_lam * ce(ctx.labels) + (1.0 - ctx.mix_lam) * ce(ctx.labels[ctx.mix_perm])


def _loss_term(loss_fn, student, teacher, _ctx, **kwargs):
    """A term that is just a `kdjax.losses` function of (student, teacher)."""
    return loss_fn(student, teacher, **kwargs)


def _as_names(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


# ----------------------------------------------------------------------------------------------
# Ready-made methods.


@dataclasses.dataclass(frozen=True)
class Method:
    """A ready-made method: its default hyper-parameters and how they become terms.

    `build(h, temperature)` returns the method's terms (without the hard-label CE term, which the
    trainer adds with weight `ce_weight`). `h` is the method's sub-dict of the config.
    """

    paper: str
    ce_weight: float
    defaults: Mapping[str, Any]
    build: Callable[[Mapping[str, Any], float], list[Term]]


def _kd_terms(h, temperature):
    fn = functools.partial(_loss_term, losses.kd, temperature=temperature)
    return [Term("kd", fn, h["weight"], ("logits",), ("logits",), h.get("warmup_epochs", 0.0))]


METHODS: dict[str, Method] = {
    # Hinton et al. 2015. Reference weights: RepDistiller (-r 0.1 -a 0.9), T=4.
    "kd": Method(
        paper="Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network (2015)",
        ce_weight=0.1,
        defaults={"weight": 0.9, "warmup_epochs": 0.0},
        build=_kd_terms,
    ),
    # Labels only: the teacher / from-scratch objective.
    "ce": Method(paper="(no distillation)", ce_weight=1.0, defaults={}, build=lambda h, t: []),
}


def get_config(method: str = "kd") -> ml_collections.ConfigDict:
    """The `config.distill` block: the chosen method plus every method's default sub-dict."""
    cfg = ml_collections.ConfigDict()
    cfg.method = method
    cfg.temperature = 4.0
    cfg.ce_weight = ml_collections.config_dict.placeholder(float)
    for name, m in METHODS.items():
        if m.defaults:
            cfg[name] = dict(m.defaults)
    cfg.terms = ml_collections.ConfigDict()
    return cfg


def method_names(method: str) -> list[str]:
    names = [n.strip() for n in method.split("+") if n.strip()]
    for n in names:
        if n not in METHODS:
            raise ValueError(
                f"unknown distillation method {n!r}; choose one of: {', '.join(sorted(METHODS))} "
                "(combine several with '+', e.g. 'kd+at')"
            )
    if not names:
        raise ValueError("distill.method is empty; choose one of: " + ", ".join(sorted(METHODS)))
    return names


def build_terms(distill: Mapping[str, Any], *, label_smoothing: float = 0.0) -> tuple[Term, ...]:
    """Turns the `config.distill` block (as a plain dict) into the tuple of terms to optimise."""
    temperature = float(distill.get("temperature", 4.0))
    if temperature <= 0:
        raise ValueError(f"distill.temperature must be > 0, got {temperature}")
    names = method_names(distill.get("method", "kd"))
    ce_weight = distill.get("ce_weight")
    if ce_weight is None:
        ce_weight = max(METHODS[n].ce_weight for n in names)
    terms: list[Term] = []
    if ce_weight:
        ce = functools.partial(_ce_term, label_smoothing=label_smoothing)
        terms.append(Term("ce", ce, float(ce_weight), ("logits",), ()))
    for n in names:
        h = {**METHODS[n].defaults, **dict(distill.get(n) or {})}
        terms.extend(METHODS[n].build(h, temperature))
    for name, spec in dict(distill.get("terms") or {}).items():
        spec = dict(spec)
        loss_name = spec.get("loss", name)
        loss_fn = getattr(losses, loss_name, None)
        if loss_name not in losses.__all__ or loss_fn is None:
            raise ValueError(
                f"distill.terms.{name}: unknown loss {loss_name!r}; choose one of: "
                + ", ".join(sorted(losses.__all__))
            )
        fn = functools.partial(_loss_term, loss_fn, **dict(spec.get("kwargs") or {}))
        terms.append(
            Term(
                name,
                fn,
                float(spec.get("weight", 1.0)),
                _as_names(spec.get("student", "logits")),
                _as_names(spec.get("teacher", "logits")),
                float(spec.get("warmup_epochs", 0.0)),
            )
        )
    seen = set()
    for t in terms:
        if t.name in seen:
            raise ValueError(f"two distillation terms are both named {t.name!r}; rename one")
        seen.add(t.name)
    return tuple(terms)


def needs_teacher(terms: Sequence[Term]) -> bool:
    return any(t.teacher for t in terms)


def check_features(terms: Sequence[Term], student_names, teacher_names) -> None:
    """Raises a one-line ValueError when a term reads a feature a model does not expose."""
    for t in terms:
        for who, wanted, have in (("student", t.student, student_names), ("teacher", t.teacher, teacher_names)):
            for n in wanted:
                if n not in have:
                    raise ValueError(
                        f"term {t.name!r} reads {who} feature {n!r}, which the {who} model does not "
                        f"have; it has: {', '.join(sorted(have))}"
                    )
