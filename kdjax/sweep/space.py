"""The sweep config, its search space and the validated sweep (no Optuna, nothing written).

`defaults()` is the sweep config's schema; `parse(sweep_config)` validates one into a `Sweep` (the
base experiment config with the fixed overrides, the searched `Param`s, sampler and pruner
settings), and `Sweep.configs` gives the experiment config of a trial and of its shared teacher.
`build_config` is what a generated best_config.py calls.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from typing import Any

import ml_collections
from absl import logging

from kdjax import config as kconfig
from kdjax import paths, runs

SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("none", "median", "hyperband")
KINDS = ("float", "int", "categorical")
TEACHER_SHARING = ("auto", "base")
# Fields that only the stages after the teacher read: a trial changing nothing else keeps the
# teacher. Everything else (optimizer.*, dataset.*, seed, batch_size, augment.*, teacher.*, dtype,
# loss.*, init.*, train.*, nan_policy and any field kdjax adds later) counts as teacher-relevant.
STUDENT_ONLY = ("student", "student_init", "distill", "prune", "quant", "stages")
_SPEC_KEYS = {"float": {"kind", "low", "high", "log", "step"}, "int": {"kind", "low", "high", "log", "step"},
              "categorical": {"kind", "choices"}}
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # relative base paths


def defaults() -> ml_collections.ConfigDict:
    """The sweep config with its defaults; `overrides` and `search_space` are plain dicts keyed by
    dotted config paths (the ConfigDict is made with convert_dict=False so they stay dicts)."""
    c = ml_collections.ConfigDict(convert_dict=False)
    c.study = ""  # the study's name; also the default sweep folder runs/sweeps/<study>
    c.base = ""  # the experiment: a config file 'path[:arg]' or an experiment ConfigDict
    c.overrides = {}  # fixed overrides {'dataset.val_size': 0.2, ...}
    c.search_space = {}  # {'a.b': {'kind': 'float'|'int'|'categorical', 'low', 'high', 'log', 'step', 'choices'}}
    c.objective = "student"  # the stage whose best-epoch validation accuracy is maximised
    c.n_trials = 20  # trials in the study, over all workers (grid: capped at the grid's size)
    c.sampler = ml_collections.ConfigDict()
    c.sampler.name = "tpe"  # grid, random, tpe
    c.sampler.seed = 0  # trial n samples with seed (seed, n): one worker gives the same sweep twice
    c.sampler.n_startup_trials = 10  # tpe: random trials before the model takes over
    c.sampler.multivariate = False  # tpe: model the parameters jointly
    c.pruner = ml_collections.ConfigDict()
    c.pruner.name = "median"  # none, median, hyperband (reported: the objective stage's val accuracy per epoch)
    c.pruner.n_startup_trials = 5  # median: trials that are never pruned
    c.pruner.n_warmup_steps = 0  # median: epochs of a trial that are never pruned
    c.pruner.min_resource = 1  # hyperband: epochs of the smallest bracket
    c.pruner.reduction_factor = 3  # hyperband
    # 'auto': one teacher per distinct set of teacher-relevant values, shared by all trials that
    # have it ('teacher-<hash>'); a trial that changes e.g. optimizer.learning_rate trains its own.
    # 'base': one teacher from the base config for every trial; searched fields reach only the
    # later stages (e.g. optimizer.learning_rate then tunes the student's rate alone).
    c.teacher_sharing = "auto"
    c.enqueue = ()  # parameter dicts of trials to run first, e.g. ({'distill.temperature': 4.0},)
    c.max_retries = 3  # an interrupted trial is retried (resumed) at most this many times
    c.stale_after_minutes = 10.0  # a RUNNING trial of another machine with no heartbeat for this long is dead
    c.max_failures_in_a_row = 3  # stop the worker when this many trials in a row fail with an error
    c.plots = True  # the PNGs, drawn when a worker ends (a few seconds)
    return c


# ----------------------------------------------------------------------------------------------
# Config plumbing


def load_config_file(ref: str) -> ml_collections.ConfigDict:
    """`get_config([arg])` of the base config file 'path[:arg]' (relative paths: from the current
    folder, else from the kdjax repository root); one-line ValueErrors."""
    return kconfig.load_config_file(ref, what="base config file", root=_REPO)


def copy_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    out = config.copy_and_resolve_references()
    out.unlock()
    return out


def _node(config, field: str, what: str):
    """(parent ConfigDict, last key) of the existing leaf `field`, or a one-line ValueError."""
    node = config
    *path, last = field.split(".")
    for part in path:
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ValueError(f"{what} names a field that does not exist in the base config: {field}")
        node = node[part]
    if not isinstance(node, ml_collections.ConfigDict) or last not in node:
        raise ValueError(f"{what} names a field that does not exist in the base config: {field}")
    if isinstance(node[last], ml_collections.ConfigDict) and len(node[last]):
        raise ValueError(f"{what} names a group of fields, not a field: {field} (it holds {', '.join(sorted(node[last]))})")
    return node, last


def apply(config: ml_collections.ConfigDict, values: dict, what: str = "override") -> ml_collections.ConfigDict:
    """A copy of `config` with {'a.b': value} set; unknown fields and ill-typed values are one-line
    ValueErrors."""
    out = copy_config(config)
    for field, value in values.items():
        node, last = _node(out, field, what)
        try:
            node[last] = value
        except (TypeError, ValueError) as e:
            old = node[last]
            raise ValueError(f"{what} {field}={value!r} does not fit the field "
                             f"({type(old).__name__ if old is not None else 'unset'}: {e})") from None
    return out


def config_json(config) -> dict:
    return json.loads(config.to_json_best_effort(sort_keys=True))


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def roundtrip(obj):
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def student_only(field: str) -> bool:
    """True for fields that only the stages after the teacher read (see STUDENT_ONLY)."""
    return field.split(".")[0] in STUDENT_ONLY


def teacher_identity(config) -> dict:
    """What determines the teacher stage's result: the run identity without student-only fields."""
    return {k: v for k, v in runs.run_identity(config).items() if not student_only(k)}


# ----------------------------------------------------------------------------------------------
# The validated sweep


@dataclasses.dataclass(frozen=True)
class Param:
    """One searched field."""

    field: str
    kind: str
    low: Any = None
    high: Any = None
    log: bool = False
    step: Any = None
    choices: tuple = ()

    @classmethod
    def parse(cls, field: str, spec) -> Param:
        if not isinstance(spec, (dict, ml_collections.ConfigDict)):
            raise ValueError(f"search space entry {field}: give a dict such as {{'kind': 'float', 'low': 1.0, "
                             f"'high': 8.0}}, got {spec!r}")
        spec = dict(spec)
        kind = spec.get("kind")
        if kind not in KINDS:
            raise ValueError(f"search space entry {field}: unknown kind {kind!r}; choose one of: {', '.join(KINDS)}")
        unknown = sorted(set(spec) - _SPEC_KEYS[kind])
        if unknown:
            raise ValueError(f"search space entry {field}: unknown key {unknown[0]!r} for kind {kind!r}; "
                             f"allowed: {', '.join(sorted(_SPEC_KEYS[kind]))}")
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, (list, tuple)) or not choices:
                raise ValueError(f"search space entry {field}: categorical needs a non-empty list of choices, got {choices!r}")
            bad = [c for c in choices if c is not None and not isinstance(c, (bool, int, float, str))]
            if bad:
                raise ValueError(f"search space entry {field}: choices must be None, bool, int, float or str, got {bad[0]!r}")
            if len(set(map(repr, choices))) < len(choices):
                raise ValueError(f"search space entry {field}: choices repeat a value: {list(choices)}")
            return cls(field, kind, choices=tuple(choices))
        low, high, log, step = spec.get("low"), spec.get("high"), bool(spec.get("log", False)), spec.get("step")
        number = (int,) if kind == "int" else (int, float)
        for name, v in (("low", low), ("high", high)):
            if isinstance(v, bool) or not isinstance(v, number) or (kind == "float" and not math.isfinite(v)):
                raise ValueError(f"search space entry {field}: {kind} needs a finite {'integer' if kind == 'int' else 'number'} "
                                 f"{name}, got {v!r}")
        if low >= high:
            raise ValueError(f"search space entry {field}: low must be < high, got low={low} >= high={high}")
        if log and low <= 0:
            raise ValueError(f"search space entry {field}: a log scale needs low > 0, got low={low}")
        if step is not None:
            if log:
                raise ValueError(f"search space entry {field}: step and log cannot be combined")
            if isinstance(step, bool) or not isinstance(step, number) or step <= 0:
                raise ValueError(f"search space entry {field}: step must be a positive {kind}, got {step!r}")
        if kind == "int" and log and low < 1:
            raise ValueError(f"search space entry {field}: an int log scale needs low >= 1, got low={low}")
        return cls(field, kind, low=low if kind == "int" else float(low), high=high if kind == "int" else float(high),
                   log=log, step=step)

    def suggest(self, trial):
        if self.kind == "categorical":
            return trial.suggest_categorical(self.field, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.field, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.field, self.low, self.high, step=self.step, log=self.log)

    def corners(self) -> list:
        """The values checked before the sweep starts: the ends of a range, or every choice."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]

    def grid_values(self) -> list | None:
        """The finite set of values of this parameter, or None (a float range without a step)."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int":
            return list(range(self.low, self.high + 1, self.step or 1))
        if self.step is None:
            return None
        n = int(math.floor((self.high - self.low) / self.step + 1e-9))
        return [round(self.low + i * self.step, 12) for i in range(n + 1)]

    def describe(self) -> dict:
        if self.kind == "categorical":
            return {"kind": self.kind, "choices": list(self.choices)}
        out = {"kind": self.kind, "low": self.low, "high": self.high, "log": self.log}
        if self.step is not None:
            out["step"] = self.step
        return out


@dataclasses.dataclass
class Sweep:
    """A validated sweep: everything `run` needs, computed without writing anything."""

    study: str
    base_ref: str | None  # 'path[:arg]' of the base config file, or None (a ConfigDict was given)
    base: ml_collections.ConfigDict  # base config + fixed overrides
    overrides: dict
    params: list[Param]
    objective: str
    stages: list[str]  # the base's stages
    n_trials: int
    sampler: dict
    pruner: dict
    teacher_sharing: str
    share_teacher: bool  # False when no trial trains a teacher (none in stages, checkpoint given, ...)
    enqueue: list[dict]
    max_retries: int
    stale_after_s: float
    max_failures_in_a_row: int
    plots: bool = True

    def setup(self) -> dict:
        """What identifies the sweep in sweep.json (everything but n_trials)."""
        return {"study": self.study, "base": self.base_ref or "<ConfigDict>",
                "base_identity": runs.run_identity(self.base), "search_space": {p.field: p.describe() for p in self.params},
                "objective": self.objective, "sampler": self.sampler, "pruner": self.pruner,
                "teacher_sharing": self.teacher_sharing, "enqueue": self.enqueue}

    def trial_stages(self) -> str:
        """The stages a trial runs: the base's, up to and including the objective stage."""
        return ",".join(self.stages[: self.stages.index(self.objective) + 1])

    def configs(self, params: dict, workdir: str) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict | None, str | None]:
        """(the trial's config, its teacher run's config or None, that teacher run's folder or None).

        The trial's config is the base + fixed overrides + `params`, with teacher.checkpoint set to
        the shared teacher run when the teacher is shared, and the base's stages."""
        config = apply(self.base, params, "search space entry")
        if not self.share_teacher:
            return config, None, None
        teacher_params = {k: v for k, v in params.items() if not student_only(k)} if self.teacher_sharing == "auto" else {}
        teacher = apply(self.base, teacher_params, "search space entry")
        teacher.stages = "teacher"
        teacher_dir = paths.absolute(os.path.join(workdir, f"teacher-{digest(teacher_identity(teacher))}"))
        config.teacher.checkpoint = teacher_dir
        config.teacher.weights = None  # a teacher fine-tuned from weights: the shared teacher run started from them
        return config, teacher, teacher_dir


def _block(c, name: str) -> dict:
    """The sub-dict `name` (sampler, pruner) of a sweep config, with defaults for missing keys."""
    given = dict(c.get(name) or {})
    unknown = sorted(set(given) - set(defaults()[name]))
    if unknown:
        raise ValueError(f"unknown field config.{name}.{unknown[0]}; the fields are: {', '.join(sorted(defaults()[name]))}")
    return {k: given.get(k, v) for k, v in defaults()[name].items()}


def objective_epochs(config, stage: str) -> int:
    block = {"teacher": "teacher", "student_scratch": "student", "prune": "prune", "qat": "quant"}.get(stage, stage)
    return int(config[block].epochs)


def parse(sweep_config) -> Sweep:
    """Validates a sweep config; every mistake is a one-line ValueError and nothing is written."""
    c = sweep_config
    unknown = sorted(set(c) - set(defaults()))
    if unknown:
        raise ValueError(f"unknown sweep config field {unknown[0]!r}; the fields are: {', '.join(sorted(defaults()))}")
    get = lambda name: c.get(name, defaults()[name])  # noqa: E731
    study = str(get("study") or "")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", study):
        raise ValueError(f"config.study={study!r}: give the study a name of letters, digits, '_', '.' or '-' "
                         "(it also names the sweep folder)")
    base_value = get("base")
    if isinstance(base_value, ml_collections.ConfigDict):
        base_ref, base = None, copy_config(base_value)
    elif isinstance(base_value, str) and base_value:
        base_ref, base = base_value, load_config_file(base_value)
        if not isinstance(base, ml_collections.ConfigDict):
            raise ValueError(f"base config file {base_value}: get_config() returned a {type(base).__name__}, not a ConfigDict")
    else:
        raise ValueError("config.base: give the experiment config, a file 'path[:arg]' (e.g. "
                         "'experiments/configs/digits.py') or a ConfigDict")
    overrides = dict(get("overrides") or {})
    space = dict(get("search_space") or {})
    if not space:
        raise ValueError("the search space is empty: give config.search_space at least one field, e.g. "
                         "{'distill.temperature': {'kind': 'float', 'low': 1.0, 'high': 8.0}}")
    both = sorted(set(space) & set(overrides))
    if both:
        raise ValueError(f"{both[0]} is both a fixed override and searched: keep one of the two")
    base = apply(base, overrides, "sweep override")
    params = []
    for field, spec in space.items():
        _node(base, field, "search space entry")
        if any(field == f or field.startswith(f + ".") for f in runs.RUNTIME_FIELDS):
            raise ValueError(f"search space entry {field}: a runtime field, which does not change a run's result")
        params.append(Param.parse(field, spec))

    try:
        kconfig.validate(base)
        stages = kconfig.planned_stages(base)
    except ValueError as e:
        raise ValueError(f"the base config with the sweep's overrides is invalid: {e}") from None
    objective = str(get("objective"))
    if objective not in stages:
        raise ValueError(f"objective stage {objective!r} is not run by the base config (its stages: {', '.join(stages)})")
    if not (base.dataset.get("val_size") or base.dataset.get("folds")):
        raise ValueError("the sweep needs a validation split to select trials on (the test set never drives a "
                         "search): set dataset.val_size > 0 in the sweep's overrides, e.g. 0.2")
    for p in params:
        for value in p.corners():
            try:
                kconfig.validate(apply(base, {p.field: value}, "search space entry"))
            except ValueError as e:
                raise ValueError(f"search space entry {p.field}={value!r} cannot run: {e}") from None

    sampler, pruner = _block(c, "sampler"), _block(c, "pruner")
    if sampler["name"] not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler['name']!r}; choose one of: {', '.join(SAMPLERS)}")
    pruner["name"] = str(pruner["name"] or "none").lower()
    if pruner["name"] not in PRUNERS:
        raise ValueError(f"unknown pruner {pruner['name']!r}; choose one of: {', '.join(PRUNERS)}")
    n_trials = get("n_trials")
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise ValueError(f"config.n_trials must be a positive integer, got {n_trials!r}")
    if sampler["name"] == "grid":
        sizes = {}
        for p in params:
            values = p.grid_values()
            if values is None:
                raise ValueError(f"the grid sampler needs a finite set of values: give {p.field} a step, or make it "
                                 "categorical")
            sizes[p.field] = len(values)
        size = math.prod(sizes.values())
        if n_trials > size:
            logging.info("grid sampler: n_trials=%d capped at the grid's %d points", n_trials, size)
            n_trials = size
    sharing = get("teacher_sharing")
    if sharing not in TEACHER_SHARING:
        raise ValueError(f"unknown config.teacher_sharing {sharing!r}; choose one of: {', '.join(TEACHER_SHARING)}")
    # With k-fold cross-validation each fold needs the teacher of its own fold, which one
    # teacher.checkpoint cannot name: each trial then trains its teachers in its own run.
    # An imported teacher (teacher.weights, epochs 0) has no run to share: every trial loads it itself.
    share = ("teacher" in stages and objective != "teacher" and not base.teacher.checkpoint
             and base.teacher.source == "trained" and not base.dataset.get("folds") and not kconfig.imported_teacher(base))
    enqueue = [dict(e) for e in (get("enqueue") or ())]
    fields = {p.field for p in params}
    for e in enqueue:
        extra = sorted(set(e) - fields)
        if extra:
            raise ValueError(f"config.enqueue names {extra[0]}, which is not searched")
    for name in ("max_retries", "max_failures_in_a_row"):
        if int(get(name)) < 0:
            raise ValueError(f"config.{name} must be >= 0, got {get(name)}")
    return Sweep(study=study, base_ref=base_ref, base=base, overrides=overrides, params=params, objective=objective,
                stages=stages, n_trials=n_trials, sampler=sampler, pruner=pruner, teacher_sharing=sharing,
                share_teacher=share, enqueue=enqueue, max_retries=int(get("max_retries")),
                stale_after_s=60.0 * float(get("stale_after_minutes")),
                max_failures_in_a_row=int(get("max_failures_in_a_row")), plots=bool(get("plots")))



def build_config(base, overrides: dict, check_against: str | None = None) -> ml_collections.ConfigDict:
    """The config of a best_config.py: the base (a file 'path[:arg]' or a plain dict) with
    `overrides`. With `check_against` (the trial's config.json), a result whose run identity
    differs from the trial's (stages aside: the trial may have run fewer) is refused in one line,
    e.g. when the base config file was edited since; fields present on one side only (added to or
    removed from kdjax since) are not compared, as when a run resumes."""
    config = load_config_file(base) if isinstance(base, str) else ml_collections.ConfigDict(base)
    config = apply(config, overrides)
    saved = runs.read_json(check_against) if check_against else None
    if saved is not None:
        old, new = runs.run_identity(saved), runs.run_identity(config)
        changed = sorted(k for k in set(old) & set(new) if k != "stages" and old[k] != new[k])
        if changed:
            raise ValueError(f"this config no longer matches the sweep's trial {check_against} (differs in: "
                             f"{', '.join(changed[:5])}): {base if isinstance(base, str) else 'the base config'} "
                             "has changed since the sweep")
    return config
