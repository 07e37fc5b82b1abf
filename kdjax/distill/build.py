"""Config -> terms: the `config.distill` block (`get_config`), its validation and `build_terms`, and
the checks the trainer runs on the terms (`check_features`, `check_views`).

The method families are imported here in the order of `METHODS` (each module registers its methods
as it is imported); 'ce' (labels only) comes last."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np

from kdjax import losses
from kdjax.distill import logit, feature, relation, contrastive, adversarial  # noqa: I001 (METHODS order)
from kdjax.distill.core import STRONG, VIEWS, Term, _as_names, resolve_features
from kdjax.distill.ctkd import CTKD_DEFAULTS, ctkd_term, learned_temperature
from kdjax.distill.logit import standardized
from kdjax.distill.registry import METHODS, ce_term, check_weight, logit_term, loss_term, register


# The families register their methods on import; METHODS keeps this order (configs, run
# identities and tables list methods in it).
_FAMILIES = (logit, feature, relation, contrastive, adversarial)


# Labels only: the teacher / from-scratch objective. Registered after the first five families.
@register("ce", paper="(no distillation)", ce_weight=1.0, defaults={})
def _ce(h, temperature, data):
    return []


# Families added since: the registry's order is a contract (tests/test_identity.py pins it), so
# their methods are appended after 'ce'.
from kdjax.distill import transformer, sequence, gram, projector  # noqa: E402,I001

_FAMILIES = _FAMILIES + (transformer, sequence, gram, projector)


def check_views(terms: Sequence["Term"], views) -> bool:
    """``config.augment.views`` -> whether the strong view is on; one-line ValueErrors for an
    unknown value, for terms that read the strong view without it, and for views no term reads."""
    views = ",".join(v.strip() for v in str(views or "").split(",") if v.strip())
    if views not in VIEWS:
        raise ValueError(f"unknown config.augment.views {views!r}; choose '' (one view) or 'weak,strong'")
    readers = [t.name for t in terms if any(n.startswith(STRONG) for n in t.student + t.teacher)]
    if readers and not views:
        methods = [n for n in readers if n in METHODS]  # (a method's extra terms: named after it)
        who = f"distill.method={methods[0]}" if methods else f"term {readers[0]!r}"
        raise ValueError(f"{who} needs two augmented views: set --config.augment.views=weak,strong")
    if views and not readers:
        raise ValueError("config.augment.views=weak,strong: no distillation term reads the strong view (features "
                         f"'{STRONG}<name>'); use a method that does ("
                         + ", ".join(n for n, m in METHODS.items() if m.views) + ") or set augment.views=''")
    return bool(views)



def get_config(method: str = "kd") -> ml_collections.ConfigDict:
    """The `config.distill` block: the chosen method plus every method's default sub-dict."""
    cfg = ml_collections.ConfigDict()
    cfg.method = method
    cfg.temperature = 4.0
    cfg.ce_weight = ml_collections.config_dict.placeholder(float)
    # Frozen teacher outputs computed once and reused every epoch: 'auto' (when the teacher's input
    # is the same every epoch, i.e. no augmentation, and they fit in memory), 'on' (refused with one
    # line when invalid), 'off'. See kdjax.train.Stage._teacher_cache. On a streamed data set only
    # 'on' stores them (per epoch-crop, below; 'auto' runs the teacher in the step there).
    cfg.cache_teacher = "auto"
    # Streamed data sets (random-resized crops): the cache is a store of the teacher's logits under
    # every epoch's crops, computed before the stage (kdjax.data.store, FKD; logits-only methods).
    # cache_top_k keeps each crop's k largest logits, the other classes sharing the remaining
    # probability mass equally (FKD's marginal smoothing); None: all classes, the teacher's exact
    # logits (the run the teacher in the step gives). FKD's ImageNet soft labels keep 5 or 10.
    cfg.cache_top_k = ml_collections.config_dict.placeholder(int)
    # With the store ('on', streamed): a folder of stores shared between runs (keyed by the teacher's
    # variables, the files, the crop seed, batch, k, ...), e.g. for several students of one teacher;
    # '' = the stage's own <workdir>/<stage>/soft_labels.
    cfg.cache_dir = ""
    # Modifiers of the logit methods (not methods; they change the chosen methods' terms):
    # logit_standardize: z-score the student's and the teacher's logits per sample before every
    #   term that reads both (kd, dkd, dist, wttm, nkd, mse_logits, fm, custom terms), as the
    #   reference's --logit-stand (Sun et al. CVPR 2024); lskd is kd with it always on. The
    #   reference pairs it with T 2 and 9x the KD weight(s): set those yourself.
    # ctkd.enabled: learn the temperature of the temperature-based methods (Method.temperature: kd,
    #   dkd, dist, lskd, nkd, sdd, fm) with CTKD's curriculum (Li et al. AAAI 2023); see CTKD_DEFAULTS.
    cfg.logit_standardize = False
    cfg.ctkd = dict(CTKD_DEFAULTS)
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


def _global_batch_losses() -> frozenset[str]:
    """The kdjax.losses functions of the global-batch methods (`Method.loss` where
    `Method.global_batch`): they relate the examples of a batch to each other, so custom terms with
    one of them see the global batch under data parallelism too (Term.global_batch)."""
    return frozenset(m.loss for m in METHODS.values() if m.global_batch and m.loss)


GLOBAL_BATCH_LOSSES = _global_batch_losses()  # those of the built-in methods

_TERM_KEYS = ("loss", "weight", "student", "teacher", "warmup_epochs", "kwargs")


def _check_keys(where: str, given, allowed) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def build_terms(distill: Mapping[str, Any], *, label_smoothing: float = 0.0,
                num_data: int | None = None, dataset_labels=None, num_steps: int | None = None) -> tuple[Term, ...]:
    """Turns the `config.distill` block (as a plain dict) into the tuple of terms to optimise.

    `num_data` (training-set size) and `dataset_labels` ((num_data,) training labels) are only
    used by CRD (memory rows; negatives from other classes); distill.crd.num_data overrides
    `num_data`. `num_steps` (the stage's training steps) is the length of TAID's schedule."""
    temperature = float(distill.get("temperature", 4.0))
    if temperature <= 0:
        raise ValueError(f"distill.temperature must be > 0, got {temperature}")
    names = method_names(distill.get("method", "kd"))
    ce_weight = distill.get("ce_weight")
    if ce_weight is None:
        ce_weight = max(METHODS[n].ce_weight for n in names)
    ce_weight = check_weight("distill.ce_weight", ce_weight)
    standardize = distill.get("logit_standardize", False)
    if not isinstance(standardize, (bool, np.bool_)):
        raise ValueError(f"distill.logit_standardize must be True or False, got {standardize!r}")
    data = {"num_data": num_data, "dataset_labels": dataset_labels, "label_smoothing": label_smoothing,
            "logit_standardize": bool(standardize), "num_steps": num_steps}
    ctkd = dict(distill.get("ctkd") or {})
    _check_keys("distill.ctkd", ctkd, CTKD_DEFAULTS)
    ctkd = {**CTKD_DEFAULTS, **ctkd}
    if ctkd["enabled"] and not any(METHODS[n].temperature for n in names):
        raise ValueError(
            f"distill.ctkd.enabled: CTKD learns a distillation temperature, but {'+'.join(names)} has "
            "none; combine it with one of: " + ", ".join(n for n, m in METHODS.items() if m.temperature))
    terms: list[Term] = []
    if ce_weight:
        ce = functools.partial(ce_term, label_smoothing=label_smoothing)
        terms.append(Term("ce", ce, ce_weight, ("logits",), ()))
    if ctkd["enabled"]:
        terms.append(ctkd_term(ctkd, num_data))
    for n in names:
        given = dict(distill.get(n) or {})
        _check_keys(f"distill.{n}", given, METHODS[n].defaults)
        h = {**METHODS[n].defaults, **given}
        if "weight" in h:
            check_weight(f"distill.{n}.weight", h["weight"])
            check_weight(f"distill.{n}.warmup_epochs", h["warmup_epochs"])
        method = METHODS[n]
        built = method.build(h, temperature, data)
        if method.global_batch:  # its own term (named after it) relates the examples of a batch to each other
            built = [dataclasses.replace(t, global_batch=True) if t.name == n else t for t in built]
        if ctkd["enabled"] and method.temperature:
            built = [_with_learned_temperature(t) for t in built]
        terms.extend(built)
    global_losses = _global_batch_losses()
    for name, spec in dict(distill.get("terms") or {}).items():
        spec = dict(spec)
        _check_keys(f"distill.terms.{name}", spec, _TERM_KEYS)
        loss_name = spec.get("loss", name)
        loss_fn = getattr(losses, loss_name, None)
        if loss_name not in losses.__all__ or loss_fn is None:
            raise ValueError(
                f"distill.terms.{name}: unknown loss {loss_name!r}; choose one of: "
                + ", ".join(sorted(losses.__all__))
            )
        student, teacher = _as_names(spec.get("student", "logits")), _as_names(spec.get("teacher", "logits"))
        wrap = logit_term if student == teacher == ("logits",) else loss_term
        fn = functools.partial(wrap, loss_fn, **dict(spec.get("kwargs") or {}))
        terms.append(
            Term(
                name,
                fn,
                check_weight(f"distill.terms.{name}.weight", spec.get("weight", 1.0)),
                student,
                teacher,
                check_weight(f"distill.terms.{name}.warmup_epochs", spec.get("warmup_epochs", 0.0)),
                global_batch=loss_name in global_losses,
            )
        )
    if standardize:  # one place for every logit term (lskd's own is already on)
        terms = [_logit_standardized(t) for t in terms]
    seen = set()
    for t in terms:
        if t.name in seen:
            raise ValueError(f"two distillation terms are both named {t.name!r}; rename one")
        seen.add(t.name)
    return tuple(terms)


def _with_learned_temperature(t: Term) -> Term:
    """CTKD: the term (and its own standardised variant) reads the learned temperature."""
    variant = None if t.standardized_fn is None else learned_temperature(t.standardized_fn)
    return dataclasses.replace(t, fn=learned_temperature(t.fn), standardized_fn=variant)


def _logit_standardized(t: Term) -> Term:
    """The logit-standardisation modifier applied to one term: its own variant when it has one (mlkd:
    as its reference, the instance level only), else its fn on z-scored logits when it reads the
    student's and the teacher's logits and does not z-score them already (lskd); others unchanged."""
    if t.standardized:
        return t
    if t.standardized_fn is not None:
        return dataclasses.replace(t, fn=t.standardized_fn, standardized=True)
    if t.student == ("logits",) and t.teacher == ("logits",):
        return dataclasses.replace(t, fn=standardized(t.fn), standardized=True)
    return t


def needs_teacher(terms: Sequence[Term]) -> bool:
    return any(t.teacher for t in terms)


def init_terms(method: str) -> list[str]:
    """Names of the terms of `method` (with its default settings) that need the `student_init`
    stage: two-stage methods whose term is trained only there (FSP, AB) or whose adapters are
    pre-trained there (FT's paraphraser). Configs use it to add that stage."""
    terms = build_terms({"method": method, "ce_weight": 0.0})
    return [t.name for t in terms if t.init_only or t.init_fn is not None]


def check_features(terms: Sequence[Term], student_names, teacher_names) -> None:
    """Raises a one-line ValueError when a term reads a feature a model does not expose, or when a
    paired term's student and teacher features do not pair up one to one. A model that has a
    feature has it in the strong view too (STRONG + name)."""
    for t in terms:
        found = {}
        for who, wanted, have in (("student", t.student, student_names), ("teacher", t.teacher, teacher_names)):
            shown = [n for n in have if not n.startswith(STRONG)]
            have = shown + [STRONG + n for n in shown]
            for n in wanted:
                try:
                    resolve_features((n,), have)
                except ValueError:
                    raise ValueError(
                        f"term {t.name!r} reads {who} feature {n!r}, which the {who} model does not "
                        f"have; it has: {', '.join(sorted(shown))}"
                    ) from None
            found[who] = resolve_features(wanted, have) if wanted else ()
        if t.paired and len(found["student"]) != len(found["teacher"]):
            raise ValueError(
                f"term {t.name!r} pairs student features ({', '.join(found['student'])}) with teacher "
                f"features ({', '.join(found['teacher'])}) one to one; set distill.{t.name}.student / "
                f".teacher to lists of equal length"
            )

