"""The kinds of stage a run is made of, one registry entry each (`KINDS`).

A stage trains one model to completion (kdjax.train.Stage runs the loop). What differs between
kinds is declared here, not branched on in the loop:

    teacher          the teacher, from labels
    student_init     two-stage methods' first stage: the subset of distillation terms named in
                     config.student_init.terms (e.g. FitNet's hint training)
    student          the student distilled from the teacher (config.distill)
    student_scratch  the same student from labels only: the paired baseline
    prune            the distilled student pruned (config.prune), fine-tuned with its objective
    qat              quantisation-aware training of the distilled student (config.quant)

A new kind of stage is a new `StageKind` in `KINDS` (its position is its order in ROLES and its
initialisation seed), with hooks for what it changes in the model or the optimizer.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import numpy as np

from kdjax import data as kdata
from kdjax import distill
from kdjax import models
from kdjax import optim
from kdjax import prune
from kdjax import quantize


def _no_setup(stage) -> None:
    del stage


def _no_report(stage, variables) -> dict:
    del stage, variables
    return {}


@dataclasses.dataclass(frozen=True)
class StageKind:
    """What makes one kind of stage what it is.

    model: the config block that describes the trained model ('teacher' or 'student').
    epochs: the config block whose `epochs` the stage trains for.
    objective: 'labels' (cross-entropy only), 'distill' (config.distill's terms) or 'init' (the
        student_init subset); see `objective`.
    fine_tunes: the stage fine-tunes a trained student; its block's `learning_rate_scale`
        multiplies the student's.
    starts_from: the stage of this run whose selected state initialises this one, if it ran.
    mean_teacher: config.teacher.source='ema' makes the student's moving average its teacher.
    seed_of: the kind whose initialisation seed it uses (a paired baseline starts where the
        distilled student starts); None: its own.
    setup(stage): changes the stage's model or optimizer once the plain ones exist.
    preflight(stage): abstract checks before anything trains (one-line ValueErrors).
    report(stage, variables): extra result fields of the selected model.
    """

    model: str
    epochs: str
    objective: str
    fine_tunes: bool = False
    starts_from: str | None = None
    mean_teacher: bool = False
    seed_of: str | None = None
    setup: Callable[[Any], None] = _no_setup
    preflight: Callable[[Any], None] = _no_setup
    report: Callable[[Any, dict], dict] = _no_report


# -- pruning (stage 'prune') --------------------------------------------------------------------


def _channel_surgery(stage):
    """(field overrides, variables, the source's parameter count) of the smaller model that
    prune.channel_prune cuts from the model the stage starts from; the stage's model becomes it.
    None before that model exists (the pre-flight, when the student is trained in this run)."""
    from kdjax import runs

    if stage.init_from is not None:
        source = jax.device_get(stage.variables_of(stage.init_from))
    elif stage.transfer:
        source = runs.read_stage_variables(stage.transfer[0], stage.transfer[1])[0]
    else:
        return None
    p = stage.config.prune
    overrides, variables = prune.channel_prune(stage.model, source, sparsity=p.sparsity, criterion=p.criterion,
                                               include=p.include, exclude=p.exclude)
    stage.model = stage.model.clone(**overrides)
    stage.model_kwargs.update({k: list(v) for k, v in overrides.items()})
    return overrides, variables, models.num_params(source["params"])


def _masked_pruning(stage, tx):
    """`tx` wrapped by kdjax.prune.masked as config.prune says."""
    p = stage.config.prune
    abstract = models.param_shapes(stage.model, (1,) + stage.ds.image_shape)["params"]
    channels = stage.ds.image_shape[-1]
    skip = [path for path, leaf in optim.flat_paths(abstract).items()
            if re.match(models.CLASSIFIER, path) or (leaf.ndim == 4 and leaf.shape[-2] == channels)]
    student = prune.select(abstract, p.include, p.exclude, skip=skip)
    if not any(jax.tree.leaves(student)):
        raise ValueError(f"prune.include={p.include!r} / exclude={p.exclude!r} select no kernel of "
                         f"{stage.model_name}; its kernels: {', '.join(sorted(optim.flat_paths(abstract)))[:300]}")
    prune.check(abstract, student, p.method, p.sparsity, p.scope, p.n, p.m)
    stage.prunable = student
    to_step = lambda epochs: int(round(epochs * stage.spe))  # noqa: E731
    which = lambda params: {"student": student, "distiller": jax.tree.map(lambda _: False, params["distiller"])}  # noqa: E731
    return prune.masked(tx, which, method=p.method, sparsity=p.sparsity,
                        scope=p.scope, n=p.n, m=p.m, begin_step=to_step(p.begin_epoch),
                        end_step=to_step(max(p.end_epoch, p.begin_epoch)), update_every=p.update_every)


def _setup_prune(stage) -> None:
    p = stage.config.prune
    if p.method == "channel":
        stage.surgery = _channel_surgery(stage)
    else:
        stage.tx = _masked_pruning(stage, stage.tx)
    if p.method == "magnitude":  # gradual pruning: only checkpoints at the target sparsity may be selected
        stage.select_from_epoch = int(np.ceil(max(p.begin_epoch, p.end_epoch)))


def _report_prune(stage, variables) -> dict:
    if stage.surgery:  # the channels that survived, per layer
        return {"channel_widths": {k: list(v) for k, v in stage.surgery[0].items()},
                "unpruned_num_params": stage.surgery[2]}
    kernels = {path: np.asarray(leaf) for (path, leaf), w in zip(  # what the masks left: exact zeros
        optim.flat_paths(variables["params"]).items(), jax.tree.leaves(stage.prunable)) if w}
    return {"sparsity": {path: round(float(np.mean(k == 0)), 4) for path, k in kernels.items()},
            "nonzero_params": int(sum(np.count_nonzero(x) for x in jax.tree.leaves(variables["params"])))}


# -- quantisation-aware training (stage 'qat') --------------------------------------------------


def _setup_qat(stage) -> None:
    """A fake-quantised forward pass with straight-through gradients (kdjax.quantize)."""
    q = stage.config.quant
    stage.model = quantize.qat_model(stage.model, q.mode, q.exclude)


def _preflight_qat(stage) -> None:
    q = stage.config.quant
    quantize.check(stage.float_model, stage.ds.image_shape, q.mode, q.exclude)


KINDS: dict[str, StageKind] = {
    "teacher": StageKind(model="teacher", epochs="teacher", objective="labels"),
    "student_init": StageKind(model="student", epochs="student_init", objective="init"),
    "student": StageKind(model="student", epochs="student", objective="distill", starts_from="student_init",
                         mean_teacher=True),
    "student_scratch": StageKind(model="student", epochs="student", objective="labels", seed_of="student"),
    "prune": StageKind(model="student", epochs="prune", objective="distill", fine_tunes=True, starts_from="student",
                       setup=_setup_prune, report=_report_prune),
    "qat": StageKind(model="student", epochs="quant", objective="distill", fine_tunes=True, starts_from="student",
                     setup=_setup_qat, preflight=_preflight_qat),
}
ROLES = tuple(KINDS)
FINE_TUNES = {role: kind.epochs for role, kind in KINDS.items() if kind.fine_tunes}  # role -> its config block


def init_seed(role: str, seed: int) -> int:
    """The seed of a stage's fresh initialisation: the run's seed plus 1000 x its kind's position."""
    return seed + ROLES.index(KINDS[role].seed_of or role) * 1000


def objective(role: str, config, train, planned: list[str]) -> tuple[distill.Term, ...]:
    """The terms a stage of kind `role` trains with: labels only, the distillation terms, or
    (student_init) the subset of distillation terms named in config.student_init.terms, without
    the CE term. `train`: the training split; `planned`: the run's stages.

    Two-stage terms (`distill.Term`): in student_init a term's `init_fn`, `init_weight` and
    `init_frozen` replace its `fn`, `weight` and `frozen`; later stages drop `init_only` terms. A
    term with either must be named in student_init.terms of a run with that stage (one line
    otherwise)."""
    smoothing = config.loss.label_smoothing
    kind = KINDS[role].objective
    if kind == "labels":
        return distill.build_terms({"method": "ce", "ce_weight": 1.0}, label_smoothing=smoothing)
    num_steps = int(config[KINDS[role].epochs].epochs) * kdata.steps_per_epoch(len(train.labels), config.batch_size)
    terms = distill.build_terms(config.distill.to_dict(), label_smoothing=smoothing,
                                num_data=len(train.labels), dataset_labels=train.labels, num_steps=num_steps)
    wanted = [n.strip() for n in config.student_init.terms.split(",") if n.strip()]
    if "student_init" not in planned:
        wanted = []
    for t in terms:
        if (t.init_only or t.init_fn is not None) and t.name not in wanted:
            what = ("is trained only in stage 'student_init' (the student stage then has the other terms, "
                    "e.g. CE alone, as the reference)" if t.init_only else
                    "needs its adapters pre-trained in stage 'student_init'")
            raise ValueError(
                f"distillation term {t.name!r} {what}: add student_init to config.stages (before student) with "
                f"config.student_init.terms={t.name} and student_init.epochs > 0 (experiments configs: "
                f":init_epochs=30)")
    if kind == "distill":  # pruning and QAT recover with the student's distillation objective
        return tuple(t for t in terms if not t.init_only)
    names = [t.name for t in terms]
    missing = [n for n in wanted if n not in names]
    if missing or not wanted:
        raise ValueError(
            f"config.student_init.terms={config.student_init.terms!r}: name terms of the student's "
            f"objective; it has: {', '.join(names)}"
        )
    return tuple(dataclasses.replace(t, fn=t.init_fn or t.fn, frozen=t.init_frozen, init_fn=None,
                                     weight=t.weight if t.init_weight is None else t.init_weight)
                 for t in terms if t.name in wanted)


def frozen_parts(terms) -> tuple[bool, tuple[str, ...]]:
    """(whether the student is fixed, the adapter modules fixed) in a stage with these terms: the
    student when every term freezes it ('student' in `Term.frozen`), an adapter when any does."""
    terms = tuple(terms)
    student = bool(terms) and all("student" in t.frozen for t in terms)
    adapters = tuple(sorted({n for t in terms for n in t.frozen if n != "student"}))
    return student, adapters
