"""The core of the method layer: `Term` (one named, weighted term of the objective), `Context` (the
per-batch inputs a term may need), feature names and patterns, the strong augmented view's names,
the global batch of the batch-level terms, and `Distiller`, the Linen module that evaluates the
terms and owns their adapters."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

AXIS = "data"  # the data-parallel axis name (kdjax.step uses the same)
CRD_COLLECTION = "crd_memory"
CTKD_COLLECTION = "ctkd"  # CTKDTemperature's step count (its lambda curriculum's clock)


@dataclasses.dataclass(frozen=True)
class Context:
    """Per-batch inputs that a term may need besides the features."""

    labels: jax.Array  # (B,) int
    train: bool = True  # True: inside the data-parallel step (axis AXIS); adapters in train mode
    mix_perm: jax.Array | None = None  # mixup/cutmix partner of each example
    mix_lam: jax.Array | None = None  # weight of the example itself
    indices: jax.Array | None = None  # global data-set index of each example (CRD)
    rng: jax.Array | None = None  # for terms that sample (CRD negatives)
    # The learned distillation temperature (CTKD), set by the Distiller from its temperature term
    # before the other terms run; None: every term uses its configured temperature.
    temperature: jax.Array | None = None
    # Ensemble weights of the teachers along the teacher axis of the teacher's logits (normalised
    # to sum 1); None: equal weights. The Distiller sets it from its `teacher_weights`.
    teacher_weights: tuple[float, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Term:
    """One named, weighted term of the objective.

    fn(student, teacher, ctx) -> scalar, where `student`/`teacher` are the feature arrays named by
    `student`/`teacher` (a single array for one name, a list for several, None for no names;
    patterns such as 'stage*' are resolved against the model's features first).
    `weight` is multiplied by a linear ramp min(1, epoch / warmup_epochs) when warmup_epochs > 0.
    `paired`: the i-th student feature goes with the i-th teacher feature (counts must match).
    `provides_temperature`: fn(None, None, ctx) returns the learned temperature (CTKD) instead of
    a loss; the Distiller evaluates it first, hands it to the other terms as ctx.temperature and
    reports it (gradient stopped) as this term's value, which enters the total with weight 0.
    `fn` may return a dict of named parts instead of a scalar (mlkd: its instance, class and batch
    levels): the term's value is their sum, and the Distiller also returns each part, gradient
    stopped, as '<term>/<part>' (logged as 'loss/<term>/<part>'; not in the total).
    `global_batch`: a batch-level term (it relates the examples of a batch to each other); inside
    the data-parallel step (ctx.train) it is evaluated on the all-gathered global batch, on every
    device (see the module docstring for why the gradients come out right).

    Two-stage methods (the trainer's `student_init` stage trains the terms named in
    ``config.student_init.terms`` first, then the student stage starts from its student and
    adapters): `init_fn` is the term's objective in that stage instead of `fn` (FT's paraphraser
    reconstruction), with weight `init_weight` (None: `weight`); `init_only` drops the term from
    every later stage (FSP and AB: their student stage trains on labels only, as RepDistiller); a
    term with either must be named in ``student_init.terms``. `frozen` / `init_frozen`: what the optimizer keeps fixed in the student
    stage / in the student_init stage: names of adapter modules (top-level names in the Distiller's
    parameters, e.g. 'ft_paraphraser'), or 'student' for the student model (its parameters and
    BatchNorm statistics; FT's paraphraser pre-training). Fixed means no update at all, so weight
    decay and momentum do not move them either.

    Logit standardisation (``distill.logit_standardize``, `build_terms`): `standardized` says that
    `fn` reads per-sample z-scored logits already (lskd, or any term the modifier has been applied
    to), so the modifier leaves it alone; `standardized_fn` is the term's own variant under the
    modifier (mlkd: the instance level only, as its reference), used instead of wrapping `fn`.
    """

    name: str
    fn: Callable[..., jax.Array]
    weight: float
    student: tuple[str, ...] = ("logits",)
    teacher: tuple[str, ...] = ()
    warmup_epochs: float = 0.0
    paired: bool = False
    provides_temperature: bool = False
    global_batch: bool = False
    init_fn: Callable[..., jax.Array] | None = None
    init_weight: float | None = None
    init_only: bool = False
    frozen: tuple[str, ...] = ()
    init_frozen: tuple[str, ...] = ()
    standardized: bool = False
    standardized_fn: Callable[..., jax.Array] | None = None

    def weight_at(self, epoch: jax.Array) -> jax.Array:
        if self.warmup_epochs <= 0:
            return jnp.asarray(self.weight, jnp.float32)
        return self.weight * jnp.minimum(1.0, epoch / self.warmup_epochs)


# ----------------------------------------------------------------------------------------------
# Feature names and patterns.

_ALL = re.compile(r"^([A-Za-z_/]*[A-Za-z_])\*$")  # 'stage*'
_INDEX = re.compile(r"^([A-Za-z_/]*[A-Za-z_])\[(-?\d+)\]$")  # 'stage[-1]'


def _as_names(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(n.strip() for n in value.split(",") if n.strip())
    return tuple(n for v in value for n in _as_names(v))


def _numbered(stem: str, available) -> list[str]:
    found = []
    for n in available:
        rest = n[len(stem):]
        if n.startswith(stem) and rest.isdigit():
            found.append((int(rest), n))
    return [n for _, n in sorted(found)]


def resolve_features(names: Sequence[str], available) -> tuple[str, ...]:
    """Expands 'stem*' / 'stem[i]' patterns against the available feature names.

    Raises a one-line ValueError naming the available features when a name or pattern matches
    nothing."""
    available = list(available)
    out: list[str] = []
    for n in names:
        if m := _ALL.match(n):
            found = _numbered(m.group(1), available)
        elif m := _INDEX.match(n):
            numbered = _numbered(m.group(1), available)
            i = int(m.group(2))
            found = [numbered[i]] if -len(numbered) <= i < len(numbered) else []
        else:
            found = [n] if n in available else []
        if not found:
            raise ValueError(f"feature {n!r} matches none of: {', '.join(sorted(available))}")
        out.extend(found)
    return tuple(out)


def _pick(features: Mapping[str, jax.Array], names: tuple[str, ...]):
    if not names:
        return None
    names = resolve_features(names, features)
    if len(names) == 1:
        return features[names[0]]
    return [features[n] for n in names]


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


# Two augmented views (config.augment.views='weak,strong'): the step runs a model on both and
# hands the terms every feature twice, the weak view's under its own name and the strong view's
# under STRONG + name ('strong/logits', 'strong/stage2', 'strong/stage*' ...). A term reading no
# 'strong/' feature sees exactly what it sees without views; the strong view is computed only when
# some term reads it, and only for the model(s) whose strong features are read.
STRONG = "strong/"
VIEWS = ("", "weak,strong")  # config.augment.views: one view (off), or the weak and the strong one


def with_strong_view(features: Mapping[str, Any], strong: Mapping[str, Any]) -> dict:
    """The features of the weak view plus those of the strong view, renamed STRONG + name."""
    return {**features, **{STRONG + k: v for k, v in strong.items()}}


def reads_strong_view(terms: Sequence["Term"]) -> tuple[bool, bool]:
    """Whether any term reads a strong-view feature of (the student, the teacher)."""
    return (any(n.startswith(STRONG) for t in terms for n in t.student),
            any(n.startswith(STRONG) for t in terms for n in t.teacher))


def _pairs(term: str, student, teacher) -> list[tuple[jax.Array, jax.Array]]:
    s, t = _as_list(student), _as_list(teacher)
    if len(s) != len(t):
        raise ValueError(
            f"term {term!r} pairs student and teacher features one to one, got {len(s)} student "
            f"and {len(t)} teacher features; set distill.{term}.student / .teacher"
        )
    return list(zip(s, t))


def global_batch(tree, ctx: Context):
    """This device's share of a batch-first pytree -> the global batch (all-gathered over `AXIS`)
    inside the data-parallel step (``ctx.train``); unchanged outside it."""
    if not ctx.train:
        return tree
    return jax.tree.map(lambda x: jax.lax.all_gather(x, AXIS, tiled=True), tree)


def _global_context(ctx: Context) -> Context:
    """The Context of the global batch: labels, indices and the mix partners all-gathered (a mix
    partner's index shifted by its device's offset)."""
    if not ctx.train:
        return ctx
    perm = ctx.mix_perm
    if perm is not None:
        perm = perm + jax.lax.axis_index(AXIS) * ctx.labels.shape[0]
    labels, indices, perm = global_batch((ctx.labels, ctx.indices, perm), ctx)
    return dataclasses.replace(ctx, labels=labels, indices=indices, mix_perm=perm)


class Distiller(nn.Module):
    """Evaluates every term; owns the terms' trainable adapters as sub-modules.

    `teacher_weights`: an ensemble's per-teacher weights, in the order of the teacher axis of the
    teacher's logits (None: equal); handed to the terms as ``ctx.teacher_weights``. Terms with
    ``global_batch`` see the all-gathered global batch inside the data-parallel step."""

    terms: tuple[Term, ...]
    teacher_weights: tuple[float, ...] | None = None

    @nn.compact
    def __call__(self, student_features, teacher_features, ctx: Context) -> dict[str, jax.Array]:
        if self.teacher_weights is not None and ctx.teacher_weights is None:
            ctx = dataclasses.replace(ctx, teacher_weights=tuple(self.teacher_weights))
        values = {}
        for t in self.terms:
            if t.provides_temperature:
                temperature = t.fn(None, None, ctx)
                ctx = dataclasses.replace(ctx, temperature=temperature)
                values[t.name] = jax.lax.stop_gradient(temperature)
        global_ctx = None
        for t in self.terms:
            if t.provides_temperature:
                continue
            student, teacher = _pick(student_features, t.student), _pick(teacher_features, t.teacher)
            if t.global_batch and ctx.train:
                if global_ctx is None:
                    global_ctx = _global_context(ctx)
                values[t.name] = t.fn(global_batch(student, ctx), global_batch(teacher, ctx), global_ctx)
            else:
                values[t.name] = t.fn(student, teacher, ctx)
        out, parts = {}, {}
        for t in self.terms:
            value = values[t.name]
            if isinstance(value, Mapping):  # a term of several parts: its value is their sum
                parts.update({f"{t.name}/{k}": jax.lax.stop_gradient(v) for k, v in value.items()})
                value = sum(value.values())
            out[t.name] = value
        return {**out, **parts}
