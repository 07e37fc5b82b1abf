"""Hyper-parameter search over kdjax runs with Optuna (`python -m experiments.sweep`).

A *sweep config* is a Python file whose ``get_config()`` returns the ConfigDict of `defaults()`
filled in::

    c = sweep.defaults()
    c.study = "digits_kd"
    c.base = "experiments/configs/digits.py"          # 'path[:arg]', or an experiment ConfigDict
    c.overrides = {"dataset.val_size": 0.2}             # fixed 'a.b' -> value on top of the base
    c.search_space = {                                  # searched 'a.b' -> how
        "distill.temperature": {"kind": "float", "low": 1.0, "high": 8.0},
        "optimizer.learning_rate": {"kind": "float", "low": 1e-3, "high": 3e-2, "log": True},
        "optimizer.name": {"kind": "categorical", "choices": ("adam", "sgd")},
    }
    c.objective = "student"                             # that stage's best-epoch validation accuracy
    c.sampler.name, c.n_trials, c.pruner.name = "tpe", 20, "median"

Each trial is an ordinary kdjax run (`kdjax.train.run`) in ``<sweep>/trials/<number>``; its value
is ``summary[objective]["selected_val_accuracy"]``, the validation accuracy of the epoch the stage
selects as its checkpoint. The test set never drives the search (a validation split is required);
the best trial's test accuracy is read once, when the sweep has finished, and labelled as such.

Sweep folder (default ``runs/sweeps/<study>``)::

    sweep.json           the sweep's setup (a rerun with another setup is refused; n_trials may grow)
    journal.log          the Optuna study (JournalStorage, file backend), unless --storage=<RDB URL>
    teacher-<hash>/      a teacher run (stages=teacher) shared by every trial whose teacher-relevant
                         fields are equal; trials load it with teacher.checkpoint
    trials/<number>/     one kdjax run per trial (a retried trial resumes in its original's folder)
    trials.csv, best.json, best_config.py, history.png, importances.png, slice.png,
    parallel_coordinate.png, intermediate.png
    heartbeats/, locks/  liveness of running trials, and the locks that make workers agree

Workers: starting the same command N times (several shells or hosts sharing the folder and the
storage) gives N workers of one study; together they run `n_trials` trials. Trials are created
under a lock in the sweep folder (``fcntl.flock``: on a shared file system it must support it), so
the total is exact. A worker killed mid-trial leaves a RUNNING trial; the next worker that starts
a trial (or the rerun of the command) sees that its process is gone (same machine: pid; another
machine: no heartbeat for `stale_after_minutes`), marks it FAIL and queues a retry with the same
parameters, which resumes the original's run folder from its latest checkpoint. SIGTERM/SIGINT
stop a trial with a checkpoint (`kdjax.train.Preempted`); it is retried the same way.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import fcntl
import hashlib
import importlib.util
import io
import json
import math
import os
import re
import socket
import threading
import time
import warnings
from typing import Any

import ml_collections
from absl import logging

from kdjax import train

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
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WORKER = "kdjax_worker"  # user attr of a RUNNING trial: which process runs it


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


def _resolve_path(path: str) -> str:
    """A config file path as given (absolute, or relative to the current folder), else relative to
    the kdjax repository root."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    candidate = os.path.join(_REPO, path)
    return candidate if os.path.exists(candidate) else path


def load_config_file(ref: str) -> ml_collections.ConfigDict:
    """`get_config([arg])` of the config file 'path[:arg]'; one-line ValueErrors."""
    path, sep, arg = ref.partition(":")
    resolved = _resolve_path(path)
    if not os.path.isfile(resolved):
        raise ValueError(f"base config file {path} not found")
    try:
        spec = importlib.util.spec_from_file_location("_kdjax_sweep_base", resolved)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config(*([arg] if sep else []))
    except Exception as e:  # noqa: BLE001 - anything the user's config file raises
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise ValueError(f"base config file {path}: {type(e).__name__}" + (f": {lines[-1]}" if lines else "")) from None


def _copy(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
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
    out = _copy(config)
    for field, value in values.items():
        node, last = _node(out, field, what)
        try:
            node[last] = value
        except (TypeError, ValueError) as e:
            old = node[last]
            raise ValueError(f"{what} {field}={value!r} does not fit the field "
                             f"({type(old).__name__ if old is not None else 'unset'}: {e})") from None
    return out


def _json(config) -> dict:
    return json.loads(config.to_json_best_effort(sort_keys=True))


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def student_only(field: str) -> bool:
    """True for fields that only the stages after the teacher read (see STUDENT_ONLY)."""
    return field.split(".")[0] in STUDENT_ONLY


def teacher_identity(config) -> dict:
    """What determines the teacher stage's result: the run identity without student-only fields."""
    return {k: v for k, v in train.run_identity(config).items() if not student_only(k)}


# ----------------------------------------------------------------------------------------------
# The validated plan


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
class Plan:
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
                "base_identity": train.run_identity(self.base), "search_space": {p.field: p.describe() for p in self.params},
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
        teacher_dir = os.path.abspath(os.path.join(workdir, f"teacher-{_digest(teacher_identity(teacher))}"))
        config.teacher.checkpoint = teacher_dir
        return config, teacher, teacher_dir


def _block(c, name: str) -> dict:
    """The sub-dict `name` (sampler, pruner) of a sweep config, with defaults for missing keys."""
    given = dict(c.get(name) or {})
    unknown = sorted(set(given) - set(defaults()[name]))
    if unknown:
        raise ValueError(f"unknown field config.{name}.{unknown[0]}; the fields are: {', '.join(sorted(defaults()[name]))}")
    return {k: given.get(k, v) for k, v in defaults()[name].items()}


def _objective_epochs(config, stage: str) -> int:
    block = {"teacher": "teacher", "student_scratch": "student", "prune": "prune", "qat": "quant"}.get(stage, stage)
    return int(config[block].epochs)


def plan(sweep_config) -> Plan:
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
        base_ref, base = None, _copy(base_value)
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
        if any(field == f or field.startswith(f + ".") for f in train.RUNTIME_FIELDS):
            raise ValueError(f"search space entry {field}: a runtime field, which does not change a run's result")
        params.append(Param.parse(field, spec))

    try:
        train.validate(base)
        stages = train._stages(base)
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
                train.validate(apply(base, {p.field: value}, "search space entry"))
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
    share = ("teacher" in stages and objective != "teacher" and not base.teacher.checkpoint
             and base.teacher.source == "trained" and not base.dataset.get("folds"))
    enqueue = [dict(e) for e in (get("enqueue") or ())]
    fields = {p.field for p in params}
    for e in enqueue:
        extra = sorted(set(e) - fields)
        if extra:
            raise ValueError(f"config.enqueue names {extra[0]}, which is not searched")
    for name in ("max_retries", "max_failures_in_a_row"):
        if int(get(name)) < 0:
            raise ValueError(f"config.{name} must be >= 0, got {get(name)}")
    return Plan(study=study, base_ref=base_ref, base=base, overrides=overrides, params=params, objective=objective,
                stages=stages, n_trials=n_trials, sampler=sampler, pruner=pruner, teacher_sharing=sharing,
                share_teacher=share, enqueue=enqueue, max_retries=int(get("max_retries")),
                stale_after_s=60.0 * float(get("stale_after_minutes")),
                max_failures_in_a_row=int(get("max_failures_in_a_row")), plots=bool(get("plots")))


def default_workdir(study: str) -> str:
    return os.path.join("runs", "sweeps", study)


def check_storage(storage: str | None) -> None:
    if storage and "://" not in storage:
        raise ValueError(f"--storage={storage!r}: give an RDB URL such as sqlite:///sweep.db or "
                         "postgresql://user@host/db (the default is a journal file in the sweep folder)")


def check_workdir(p: Plan, workdir: str) -> None:
    """Refuses a sweep folder that holds another sweep (one line, before anything is written)."""
    saved = _read_json(os.path.join(workdir, "sweep.json"))
    if saved is None:
        return
    old, new = train.flatten_dict(saved.get("setup", {})), train.flatten_dict(_roundtrip(p.setup()))
    # As kdjax.train does for a run: a config field that kdjax added or removed since is not compared.
    changed = sorted(k for k in set(old) | set(new) if old.get(k, "<absent>") != new.get(k, "<absent>")
                     and not (k.startswith("base_identity.") and (k not in old or k not in new)))
    if changed:
        shown = ", ".join(changed[:5]) + (", ..." if len(changed) > 5 else "")
        raise ValueError(f"sweep folder {workdir} holds a sweep with another setup (differs in: {shown}); rerun with "
                         "the same sweep config to continue it (n_trials may change), or choose a new --workdir")


def _roundtrip(obj):
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _read_json(path: str, default=None):
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def _write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Workers: locks, liveness, retries


class _FileLock:
    """An exclusive flock on a file (released by the kernel if the process dies)."""

    def __init__(self, path: str):
        self.path, self._f = path, None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        f = open(self.path, "a+")
        fcntl.flock(f, fcntl.LOCK_EX)
        self._f = f

    def release(self) -> None:
        if self._f is not None:
            fcntl.flock(self._f, fcntl.LOCK_UN)
            self._f.close()
            self._f = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def _namespace() -> str:
    """Identifies the set of processes whose pids this process can check: machine + pid namespace."""
    parts = [socket.gethostname()]
    for path in ("/proc/sys/kernel/random/boot_id",):
        with contextlib.suppress(OSError):
            parts.append(open(path).read().strip())
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return "/".join(parts)


def _start_ticks(pid: int) -> str | None:
    """(state, start time) of a process from /proc, or None where /proc is missing."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return f"{fields[0]}:{fields[19]}"
    except (OSError, IndexError):
        return None


def _me() -> dict:
    stat = _start_ticks(os.getpid())
    return {"ns": _namespace(), "host": socket.gethostname(), "pid": os.getpid(),
            "start": stat.split(":")[1] if stat else None}


def _alive(worker: dict) -> bool:
    """Whether the process of `worker` (same machine and pid namespace) still runs."""
    pid = int(worker["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = _start_ticks(pid)
    if stat is None:
        return True
    state, start = stat.split(":")
    return state not in ("Z", "X") and (worker.get("start") is None or start == worker["start"])


class _Heartbeat:
    """Touches <sweep>/heartbeats/<trial number> every `interval` seconds while a trial runs."""

    def __init__(self, workdir: str, number: int, interval: float):
        self.path = os.path.join(workdir, "heartbeats", str(number))
        self.interval, self._stop = interval, threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self):
        while not self._stop.wait(self.interval):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def __enter__(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        open(self.path, "a").close()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(OSError):
            os.remove(self.path)


def _retried(trials) -> set[int]:
    """Numbers of the trials that a later trial retries."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}


def root_number(trial) -> int:
    """The number of the trial a retry chain started from (its run folder is trials/<that>)."""
    return int(trial.system_attrs.get("failed_trial", trial.number))


def _stale(p: Plan, workdir: str, trial) -> str | None:
    """Why the RUNNING `trial` is dead, or None if it may be alive. Called under the sweep lock."""
    worker = trial.user_attrs.get(_WORKER)
    if worker is None:  # trials get their worker under the sweep lock: its creator died in between
        return "its worker died before it started"
    if worker.get("ns") == _namespace():
        return None if _alive(worker) else f"its worker (pid {worker['pid']}) is gone"
    beat = os.path.join(workdir, "heartbeats", str(trial.number))
    try:
        age = time.time() - os.path.getmtime(beat)
    except OSError:
        age = float("inf")
    if age > p.stale_after_s:
        return f"no heartbeat from its worker ({worker.get('host')}, pid {worker.get('pid')}) for {age:.0f} s"
    return None


def _retry_interrupted(p: Plan, workdir: str, study) -> None:
    """Marks dead RUNNING trials FAIL and queues a retry (same parameters, same run folder) of
    every interrupted trial not yet retried. Called under the sweep lock."""
    import optuna

    storage = study._storage
    trials = study.get_trials(deepcopy=False)
    for t in trials:
        if t.state == optuna.trial.TrialState.RUNNING and (why := _stale(p, workdir, t)):
            logging.warning("trial %d was interrupted (%s): marking it failed and retrying it", t.number, why)
            storage.set_trial_user_attr(t._trial_id, "interrupted", why)
            storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    retried = _retried(trials)
    for t in trials:
        if t.state != optuna.trial.TrialState.FAIL or "interrupted" not in t.user_attrs or t.number in retried:
            continue
        history = list(t.system_attrs.get("retry_history", [])) + [t.number]
        if len(history) > p.max_retries:
            logging.warning("trial %d was interrupted %d times: not retried again", root_number(t), len(history))
            continue
        system = {k: v for k, v in t.system_attrs.items() if k not in ("failed_trial", "retry_history")}
        system.update(failed_trial=root_number(t), retry_history=history)
        study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.WAITING, params=t.params, distributions=t.distributions,
            system_attrs=system, intermediate_values=t.intermediate_values))
        logging.info("queued a retry of trial %d (resumes trials/%d)", t.number, root_number(t))


def _counted(trials) -> list:
    """The trials that count towards n_trials: all but those a retry replaces."""
    retried = _retried(trials)
    return [t for t in trials if t.number not in retried]


def progress(p: Plan, study) -> dict:
    """Trial counts by state (retried ones left out) and whether the sweep has finished."""
    import optuna

    counted = _counted(study.get_trials(deepcopy=False))
    states = {}
    for t in counted:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    unfinished = sum(t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING) for t in counted)
    return {"states": states, "counted": len(counted), "finished": len(counted) >= p.n_trials and not unfinished,
            "waiting": sum(t.state == optuna.trial.TrialState.WAITING for t in counted)}


# ----------------------------------------------------------------------------------------------
# Optuna objects


def make_sampler(p: Plan, number: int):
    import optuna

    s = p.sampler
    if s["name"] == "grid":  # the grid's order comes from the seed alone: the same in every worker
        grid = {q.field: q.grid_values() for q in p.params}
        return optuna.samplers.GridSampler(grid, seed=s["seed"])
    seed = (int(s["seed"]) * 1_000_003 + number) % 2**32  # trial n: the same draws in any worker
    if s["name"] == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # multivariate is 'experimental'
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=int(s["n_startup_trials"]),
                                          multivariate=bool(s["multivariate"]), constant_liar=True)


def make_pruner(p: Plan):
    import optuna

    q = p.pruner
    if q["name"] == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=int(q["n_startup_trials"]),
                                           n_warmup_steps=int(q["n_warmup_steps"]))
    if q["name"] == "hyperband":
        searched = any(f.endswith(".epochs") for f in (x.field for x in p.params))
        return optuna.pruners.HyperbandPruner(
            min_resource=int(q["min_resource"]), reduction_factor=int(q["reduction_factor"]),
            max_resource="auto" if searched else _objective_epochs(p.base, p.objective))
    return optuna.pruners.NopPruner()


def make_storage(storage: str | None, workdir: str):
    import optuna

    if storage:
        return optuna.storages.RDBStorage(storage)
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(os.path.join(workdir, "journal.log")))


# ----------------------------------------------------------------------------------------------
# One trial


def _ensure_teacher(config, teacher_dir: str, locks: str) -> None:
    """Trains the shared teacher run once (other workers wait for it, then reuse it)."""
    done = lambda: os.path.exists(os.path.join(teacher_dir, "teacher", "result.json"))  # noqa: E731
    if done():
        return
    with _FileLock(os.path.join(locks, os.path.basename(teacher_dir) + ".lock")):
        if done():
            return
        logging.info("training the teacher %s (shared by every trial with its teacher-relevant fields)", teacher_dir)
        train.run(config, teacher_dir)


def _check_folder(config, run_dir: str) -> None:
    """A trial folder holding another config would be a bug (or another study in this folder)."""
    saved = _read_json(os.path.join(run_dir, "config.json"))
    if saved is None:
        return
    old, new = train.run_identity(saved), train.run_identity(config)
    changed = sorted(k for k in set(old) & set(new) if old[k] != new[k])
    if changed:
        raise ValueError(f"trial folder {run_dir} holds a run of another config (differs in: {', '.join(changed[:5])}); "
                         "it is not overwritten: this sweep folder belongs to another study or storage, choose a new --workdir")


class _Objective:
    """Optuna objective: one kdjax run per trial. Entered with the sweep lock held; releases it
    once the trial has its parameters and worker (so trial creation is serialised)."""

    def __init__(self, p: Plan, workdir: str, lock: _FileLock, heartbeat_s: float):
        self.p, self.workdir, self.lock, self.heartbeat_s = p, workdir, lock, heartbeat_s
        self.interrupted: BaseException | None = None

    def __call__(self, trial) -> float:
        import optuna

        try:
            params = {q.field: q.suggest(trial) for q in self.p.params}
            frozen = trial.study._storage.get_trial(trial._trial_id)
            number = root_number(frozen)
            run_dir = os.path.join(self.workdir, "trials", str(number))
            config, teacher_config, teacher_dir = self.p.configs(params, self.workdir)
            trial.set_user_attr(_WORKER, _me())
            trial.set_user_attr("run_dir", os.path.relpath(run_dir, self.workdir))
            if teacher_dir:
                trial.set_user_attr("teacher_dir", os.path.relpath(teacher_dir, self.workdir))
        finally:
            self.lock.release()
        what = f"retry of trial {number}, resuming {run_dir}" if number != trial.number else run_dir
        logging.info("trial %d (%s): %s", trial.number, what, ", ".join(f"{k}={v!r}" for k, v in params.items()))

        # Reported each epoch: the best validation accuracy so far, i.e. what the objective would be
        # if the stage ended now (the objective is the selected, best-validation epoch's). With
        # k-fold cross-validation (dataset.folds) the stage runs once per fold: fold f's epoch e is
        # step f * epochs + e, and the running best restarts with each fold. A retry inherits the
        # interrupted trial's reports, so the running best (and the fold count) continue from them.
        epochs = _objective_epochs(config, self.p.objective)
        seen = frozen.intermediate_values
        last = max(seen, default=0)
        fold = max(last - 1, 0) // epochs
        state = {"fold": fold, "epoch": last - fold * epochs,
                 "best": max((v for k, v in seen.items() if k > fold * epochs), default=float("-inf"))}

        def on_epoch(role, row):
            if role != self.p.objective or "val_accuracy" not in row:
                return
            epoch = int(row["epoch"])
            if epoch <= state["epoch"]:  # the next fold's run of the stage
                state.update(fold=state["fold"] + 1, best=float("-inf"))
            state["epoch"] = epoch
            state["best"] = max(state["best"], float(row["val_accuracy"]))
            trial.report(state["best"], state["fold"] * epochs + epoch)
            if trial.should_prune():
                where = f"epoch {epoch}" + (f" of fold {state['fold']}" if config.dataset.get("folds") else "")
                raise optuna.TrialPruned(f"pruned after {where} of stage {role!r} "
                                         f"(best val accuracy so far {state['best']:.4f})")

        try:
            with _Heartbeat(self.workdir, trial.number, self.heartbeat_s):
                if teacher_config is not None:
                    _ensure_teacher(teacher_config, teacher_dir, os.path.join(self.workdir, "locks"))
                run_config = _copy(config)
                run_config.stages = self.p.trial_stages()
                _check_folder(run_config, run_dir)
                summary = train.run(run_config, run_dir, on_epoch=on_epoch)
        except optuna.TrialPruned:
            raise
        except train.NonFiniteError as e:  # diverged: as hopeless as a pruned trial, and TPE learns from it
            trial.set_user_attr("note", f"diverged: {e}".splitlines()[0][:300])
            raise optuna.TrialPruned(f"diverged ({str(e).split(';')[0]})") from None
        except (train.Preempted, KeyboardInterrupt) as e:  # FAIL quietly, then `run` re-raises it
            trial.set_user_attr("interrupted", str(e) or type(e).__name__)
            self.interrupted = e
            return float("nan")
        except ValueError as e:
            if str(e).startswith("trial folder "):
                raise
            trial.set_user_attr("error", str(e))
            logging.warning("trial %d failed: %s", trial.number, e)
            return float("nan")  # FAIL, without a traceback
        return float(summary[self.p.objective]["selected_val_accuracy"])


# ----------------------------------------------------------------------------------------------
# The sweep


def run(sweep_config, workdir: str | None = None, storage: str | None = None, report_only: bool = False,
        heartbeat_s: float = 30.0) -> dict:
    """Runs this worker's share of the sweep (or, with `report_only`, only rewrites the outputs);
    returns the content of best.json. Bad input: one-line ValueError, nothing written."""
    import optuna

    p = plan(sweep_config)
    check_storage(storage)
    workdir = workdir or default_workdir(p.study)
    check_workdir(p, workdir)
    if report_only and not os.path.exists(os.path.join(workdir, "sweep.json")):
        raise ValueError(f"no sweep in {workdir} (no sweep.json) to report on")
    os.makedirs(workdir, exist_ok=True)
    lock = _FileLock(os.path.join(workdir, "locks", "sweep.lock"))
    with lock:
        saved = _read_json(os.path.join(workdir, "sweep.json"), {})
        if saved.get("n_trials") not in (None, p.n_trials) and not report_only:
            logging.info("n_trials: %s -> %d", saved.get("n_trials"), p.n_trials)
        if report_only:  # the sweep's own trial count decides whether it has finished
            p.n_trials = int(saved.get("n_trials", p.n_trials))
        else:
            _write_text(os.path.join(workdir, "sweep.json"), json.dumps(
                {"setup": _roundtrip(p.setup()), "n_trials": p.n_trials, "storage": storage or "journal.log"},
                indent=2, sort_keys=True))
        study = optuna.create_study(storage=make_storage(storage, workdir), study_name=p.study, direction="maximize",
                                    load_if_exists=True, sampler=make_sampler(p, 0), pruner=make_pruner(p))
        if p.enqueue and not study.get_trials(deepcopy=False):
            for params in p.enqueue:
                study.enqueue_trial(params)
    objective = _Objective(p, workdir, lock, heartbeat_s)
    failures = 0
    while not report_only:
        lock.acquire()
        try:
            _retry_interrupted(p, workdir, study)
            state = progress(p, study)
            if not state["waiting"] and state["counted"] >= p.n_trials:
                break
            study.sampler = make_sampler(p, len(study.get_trials(deepcopy=False)))
            study.optimize(objective, n_trials=1, gc_after_trial=False)
        finally:
            lock.release()
        if objective.interrupted is not None:  # SIGTERM/SIGINT: the trial is retried when the sweep reruns
            with lock:
                write_report(p, study, workdir, plots=False)
            raise objective.interrupted
        last = _last_of_mine(study)
        failures = failures + 1 if last is not None and "error" in last.user_attrs else 0
        with lock:
            write_report(p, study, workdir, plots=False)
        if p.max_failures_in_a_row and failures >= p.max_failures_in_a_row:
            raise ValueError(f"{failures} trials in a row failed; the last with: {last.user_attrs['error']} "
                             f"(see {os.path.join(workdir, 'trials.csv')})")
    with lock:
        return write_report(p, study, workdir, plots=p.plots, report_only=report_only)


def _last_of_mine(study):
    """The most recent finished trial run by this process."""
    me = _me()
    for t in reversed(study.get_trials(deepcopy=False)):
        w = t.user_attrs.get(_WORKER) or {}
        if w.get("pid") == me["pid"] and w.get("ns") == me["ns"] and t.state.is_finished():
            return t
    return None


# ----------------------------------------------------------------------------------------------
# Outputs


def _best_config_text(p: Plan, trial, workdir: str) -> str:
    params = dict(trial.params)
    _, _, teacher_dir = p.configs(params, workdir)
    overrides = dict(p.overrides)
    lines = ["OVERRIDES = {"]
    if p.overrides:
        lines.append("    # the sweep's fixed overrides")
        lines += [f"    {k!r}: {v!r}," for k, v in p.overrides.items()]
    lines.append(f"    # the best parameters (trial {trial.number})")
    lines += [f"    {k!r}: {v!r}," for k, v in params.items()]
    overrides.update(params)
    if teacher_dir:
        lines.append("    # the teacher this trial used, trained once by the sweep")
        lines.append(f"    'teacher.checkpoint': {teacher_dir!r},")
        overrides["teacher.checkpoint"] = teacher_dir
    lines.append("}")
    run_dir = os.path.join(workdir, trial.user_attrs.get("run_dir", f"trials/{root_number(trial)}"))
    trial_config = os.path.abspath(os.path.join(run_dir, "config.json"))
    doc = (f'"""Best trial of the sweep {p.study!r}: trial {trial.number}, {p.objective} validation accuracy {trial.value:.4f}\n'
           f"(the accuracy of its selected, best-validation epoch). Written by kdjax.sweep.\n\n"
           f"    python -m experiments.digits --config={os.path.join(workdir, 'best_config.py')}\n\n"
           f"reproduces the trial's {p.objective} stage exactly (any experiment entry point works: the config is\n"
           f"complete). The trial's run: {run_dir}\n"
           + ("" if p.trial_stages() == ",".join(p.stages) else
              f"It runs the base config's stages ({','.join(p.stages)}); the trial ran only {p.trial_stages()}\n"
              f"(later stages do not change earlier ones; --config.stages={p.trial_stages()} gives its exact config).\n")
           + "get_config() refuses to run if the result no longer matches the trial's config.json (e.g. the base\n"
           "config file was edited since); fields kdjax added or removed since are not compared.\n"
           + '"""\n\n')
    check = f"TRIAL_CONFIG = {trial_config!r}  # checked against, where it still exists\n\n\n"
    if p.base_ref is not None:
        body = (f"BASE = {p.base_ref!r}\n" + "\n".join(lines) + "\n" + check +
                "def get_config(arg=None):\n"
                "    from kdjax import sweep\n\n"
                "    return sweep.build_config(BASE, OVERRIDES, check_against=TRIAL_CONFIG)\n")
    else:
        full = _json(apply(p.base, {k: v for k, v in overrides.items() if k not in p.overrides}))
        body = ("import json\n\n"
                f"CONFIG = json.loads({json.dumps(json.dumps(full, sort_keys=True))})  # the base config was a ConfigDict\n"
                + "\n".join(lines) + "  # (already in CONFIG)\n" + check +
                "def get_config(arg=None):\n"
                "    from kdjax import sweep\n\n"
                "    return sweep.build_config(CONFIG, {}, check_against=TRIAL_CONFIG)\n")
    return doc + body


def build_config(base, overrides: dict, check_against: str | None = None) -> ml_collections.ConfigDict:
    """The config of a best_config.py: the base (a file 'path[:arg]' or a plain dict) with
    `overrides`. With `check_against` (the trial's config.json), a result whose run identity
    differs from the trial's (stages aside: the trial may have run fewer) is refused in one line,
    e.g. when the base config file was edited since; fields present on one side only (added to or
    removed from kdjax since) are not compared, as when a run resumes."""
    config = load_config_file(base) if isinstance(base, str) else ml_collections.ConfigDict(base)
    config = apply(config, overrides)
    saved = _read_json(check_against) if check_against else None
    if saved is not None:
        old, new = train.run_identity(saved), train.run_identity(config)
        changed = sorted(k for k in set(old) & set(new) if k != "stages" and old[k] != new[k])
        if changed:
            raise ValueError(f"this config no longer matches the sweep's trial {check_against} (differs in: "
                             f"{', '.join(changed[:5])}): {base if isinstance(base, str) else 'the base config'} "
                             "has changed since the sweep")
    return config


def _rows(p: Plan, study) -> list[dict]:
    retried = _retried(study.get_trials(deepcopy=False))
    rows = []
    for t in study.get_trials(deepcopy=False):
        duration = t.duration.total_seconds() if t.duration is not None else (
            (datetime.datetime.now() - t.datetime_start).total_seconds() if t.datetime_start else None)
        note = t.user_attrs.get("error") or t.user_attrs.get("note") or ""
        if "interrupted" in t.user_attrs:
            note = f"interrupted ({t.user_attrs['interrupted']})" + ("; retried" if t.number in retried else "")
        elif t.state.name == "PRUNED" and not note and t.intermediate_values:
            note = f"pruned after step {max(t.intermediate_values)}" if p.base.dataset.get("folds") else \
                f"pruned after epoch {max(t.intermediate_values)}"
        rows.append({"number": t.number, "state": t.state.name,
                     "value": "" if t.value is None or (isinstance(t.value, float) and math.isnan(t.value)) else t.value,
                     **{q.field: t.params.get(q.field, "") for q in p.params},
                     "run_dir": t.user_attrs.get("run_dir", ""), "teacher_dir": t.user_attrs.get("teacher_dir", ""),
                     "duration_s": round(duration, 1) if duration is not None else "",
                     "retry_of": t.system_attrs.get("failed_trial", ""), "note": note})
    return rows


def write_report(p: Plan, study, workdir: str, plots: bool, report_only: bool = False) -> dict:
    """trials.csv, best.json, best_config.py and (with `plots`, once the sweep has finished or
    with `report_only`) the PNGs. Called under the sweep lock; every file is replaced atomically.
    Returns the content of best.json."""
    rows = _rows(p, study)
    buf = io.StringIO()
    header = ["number", "state", "value", *[q.field for q in p.params], "run_dir", "teacher_dir", "duration_s",
              "retry_of", "note"]
    writer = csv.DictWriter(buf, fieldnames=header)
    writer.writeheader()
    writer.writerows(rows)
    _write_text(os.path.join(workdir, "trials.csv"), buf.getvalue())

    state = progress(p, study)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    best = {"study": p.study, "workdir": workdir, "objective": f"{p.objective}: selected_val_accuracy (the validation "
            "accuracy of the epoch the stage selects; mean over folds with dataset.folds; maximised)", "n_trials": p.n_trials, "trials": state["states"],
            "finished": state["finished"], "best_trial": None}
    if complete:
        t = max(complete, key=lambda t: (t.value, -t.number))  # ties: the earliest trial
        run_dir = os.path.join(workdir, t.user_attrs.get("run_dir", f"trials/{root_number(t)}"))
        summary = _read_json(os.path.join(run_dir, "summary.json"), {}).get(p.objective, {})
        best.update(best_trial=t.number, val_accuracy=t.value, params=t.params, run_dir=run_dir,
                    teacher_dir=os.path.join(workdir, t.user_attrs["teacher_dir"]) if "teacher_dir" in t.user_attrs else None,
                    selected_epoch=summary.get("selected_epoch"),
                    best_config=os.path.join(workdir, "best_config.py"),
                    command=f"python -m experiments.digits --config={os.path.join(workdir, 'best_config.py')}")
        if state["finished"]:
            best["test_accuracy_of_best_trial"] = summary.get("selected_test_accuracy")
            best["test_accuracy_note"] = ("TEST accuracy of the best trial's selected checkpoint, read once after the "
                                          "search ended; it played no part in choosing the trial")
        else:
            best["test_accuracy_of_best_trial"] = None
            best["test_accuracy_note"] = "reported once the sweep has finished"
        _write_text(os.path.join(workdir, "best_config.py"), _best_config_text(p, t, workdir))
    if state["finished"] and len(complete) >= 2 and len(p.params) >= 2:
        import optuna

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                best["param_importances"] = {k: round(v, 4) for k, v in optuna.importance.get_param_importances(
                    study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)).items()}
        except Exception as e:  # noqa: BLE001 - e.g. every complete trial has the same value
            logging.info("parameter importances not computed: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
    _write_text(os.path.join(workdir, "best.json"), json.dumps(best, indent=2, sort_keys=True, default=str) + "\n")
    if plots and (state["finished"] or report_only):
        best["plots"] = write_plots(p, study, workdir, len(complete))
    elif plots:
        logging.info("plots not drawn: trials of other workers are still running (the worker that ends the sweep "
                     "draws them; --report_only draws them any time)")
    return best


def write_plots(p: Plan, study, workdir: str, n_complete: int) -> list[str]:
    """The PNGs of optuna.visualization.matplotlib; a plot that cannot be drawn is a logged line."""
    import matplotlib

    if "matplotlib.pyplot" not in __import__("sys").modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    wanted = [("history.png", ovm.plot_optimization_history, None)]
    if n_complete < 2 or len(p.params) < 2:
        logging.info("importances.png not drawn: it needs >= 2 complete trials and >= 2 searched fields "
                     "(%d complete, %d searched)", n_complete, len(p.params))
    else:
        # fANOVA with a fixed seed: the same study gives the same importances
        wanted.append(("importances.png", ovm.plot_param_importances,
                       {"evaluator": optuna.importance.FanovaImportanceEvaluator(seed=0)}))
    wanted.append(("slice.png", ovm.plot_slice, None))
    if len(p.params) >= 2:
        wanted.append(("parallel_coordinate.png", ovm.plot_parallel_coordinate, None))
    if p.pruner["name"] != "none":
        wanted.append(("intermediate.png", ovm.plot_intermediate_values, None))
    written = []
    for name, fn, kwargs in wanted:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                previous = optuna.logging.get_verbosity()
                optuna.logging.set_verbosity(optuna.logging.ERROR)
                try:
                    axes = fn(study, **(kwargs or {}))
                finally:
                    optuna.logging.set_verbosity(previous)
            ax = axes.flat[0] if hasattr(axes, "flat") else axes
            fig = ax.figure
            if name in ("history.png", "slice.png"):
                ax.set_ylabel(f"{p.objective} val accuracy (selected epoch)")
            if name == "slice.png":
                fig.set_size_inches(1.5 + 4.0 * len(p.params), 4.8)
            tmp = os.path.join(workdir, f".{name}.tmp{os.getpid()}.png")
            fig.savefig(tmp, dpi=100, bbox_inches="tight")  # not tight_layout: it clashes with colour bars
            os.replace(tmp, os.path.join(workdir, name))
            plt.close(fig)
            written.append(name)
        except Exception as e:  # noqa: BLE001 - a plot must never fail the sweep
            logging.info("%s not drawn: %s", name, str(e).splitlines()[0] if str(e) else type(e).__name__)
    return written


def format_report(best: dict) -> str:
    """The lines printed at the end of a sweep command."""
    lines = [f"sweep {best['study']}: {best['n_trials']} trials, states "
             + ", ".join(f"{k.lower()} {v}" for k, v in sorted(best["trials"].items()))
             + ("" if best["finished"] else " (not finished: rerun the command, or other workers are still running)")]
    if best.get("best_trial") is None:
        lines.append("no complete trial yet")
    else:
        lines.append(f"best trial {best['best_trial']}: {best['objective'].split(':')[0]} val accuracy "
                     f"{best['val_accuracy']:.4f} (epoch {best.get('selected_epoch')})  "
                     + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items()))
        if best.get("test_accuracy_of_best_trial") is not None:
            lines.append(f"its TEST accuracy (read once, not used for selection): {best['test_accuracy_of_best_trial']:.4f}")
        if best.get("param_importances"):
            lines.append("parameter importances (fANOVA): " + ", ".join(
                f"{k} {v:.2f}" for k, v in sorted(best["param_importances"].items(), key=lambda kv: -kv[1])))
        lines.append(f"reproduce: {best['command']}")
    lines.append(f"outputs: {best['workdir']}/{{trials.csv,best.json,best_config.py}}"
                 + (f" and {', '.join(best['plots'])}" if best.get("plots") else ""))
    return "\n".join(lines)
