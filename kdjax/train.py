"""The training loop, top to bottom: init -> (restore) -> step -> eval -> checkpoint, per stage.

A run has up to three stages, each one model trained to completion (`config.stages`):

    teacher          the teacher from labels (or loaded from `config.teacher.checkpoint`, or
                     `config.teacher.weights` with teacher.epochs=0: imported weights as they are)
    student          the student distilled from the teacher (`config.distill`)
    student_scratch  the same student from labels only: the baseline

and optional ones: `student_init` (two-stage methods' first stage), `prune` (`config.prune`) and
`qat` (`config.quant`), the last two fine-tuning with the student's distillation objective.

Every stage checkpoints into ``<workdir>/<stage>/checkpoints`` and writes
``<workdir>/<stage>/result.json`` when finished; rerunning the same command skips finished stages
and resumes an unfinished one from its latest checkpoint. ``<workdir>/summary.json`` has one entry
per finished stage. This module is the only one that reads the config object as a whole.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from kdjax import checkpoint as kckpt
from kdjax import config as kconfig
from kdjax import data as kdata
from kdjax import distill, inference, logs, models, optim, paths, runs, runtime, stages
from kdjax import step as kstep

ROLES, FINE_TUNES = stages.ROLES, stages.FINE_TUNES  # the kinds of stage: kdjax.stages.KINDS
_DTYPES = {name: getattr(jnp, name) for name in kconfig.DTYPES}  # config.dtype -> jnp.float32, jnp.bfloat16


class NonFiniteError(RuntimeError):
    """A loss term, gradient or optimizer update became NaN/Inf (config.nan_policy='stop')."""


class Preempted(Exception):
    """SIGTERM/SIGINT arrived: a checkpoint was saved and the run stopped; rerun to resume."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.exit_code = 128 + int(signum)  # as a shell reports a job killed by that signal


PREFETCH = 2  # streamed data sets: batches put on the devices ahead of the step
_SIGNALLED: list[int] = []
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # preemption (TPU VMs, Colab, SLURM) and Ctrl-C


def _on_signal(signum, _frame) -> None:
    _SIGNALLED.append(signum)


class _Control:
    """When to save a periodic checkpoint and whether to stop for a signal, decided the same way on
    every process.

    On one process both are read every step (no device sync). On several, the processes exchange
    their flags every `poll_every` steps and at the end of every epoch (one small all-gather, never
    per step): the run stops if any process got a signal, and process 0's clock alone decides a
    time-based checkpoint, so skewed clocks cannot make processes disagree on a collective save.
    """

    def __init__(self, every_steps: int, every_minutes: float, poll_every: int = 10):
        self.every_steps, self.every_seconds, self.poll_every = every_steps, 60.0 * every_minutes, poll_every
        self.last_save = time.time()

    def saved(self) -> None:
        self.last_save = time.time()

    def poll(self, step: int, end_of_epoch: bool) -> tuple[bool, signal.Signals | None]:
        """(periodic checkpoint due, the stop signal received or None) after `step` steps."""
        periodic = bool(self.every_steps) and step % self.every_steps == 0
        clock_due = bool(self.every_seconds) and time.time() - self.last_save > self.every_seconds
        signum = _SIGNALLED[0] if _SIGNALLED else 0
        if jax.process_count() > 1:
            if not (end_of_epoch or step % self.poll_every == 0):
                return periodic, None
            from jax.experimental import multihost_utils

            flags = np.asarray(multihost_utils.process_allgather(np.array([signum, clock_due], np.int32)))
            signum = int(flags[:, 0].max())
            clock_due = bool(flags[0, 1])
        return periodic or clock_due, (signal.Signals(signum) if signum else None)




# ----------------------------------------------------------------------------------------------
# Small helpers


# ----------------------------------------------------------------------------------------------
# Evaluation


def _patience_exhausted(meta: dict, patience: int) -> bool:
    """Early stopping: `patience` > 0 epochs have passed since the validation score last strictly
    improved. Decided from the checkpointed history alone, so a resumed run stops where it would have."""
    history = meta["history"]
    if patience <= 0 or not history:
        return False
    scores = [h["score"] for h in history]
    return len(scores) - 1 - scores.index(max(scores)) >= patience


# ----------------------------------------------------------------------------------------------
# One stage


class Stage:
    """Trains one model (teacher, student or baseline) to completion, resuming if it can.

    `teachers`/`teacher_vars`: tuples of Linen models and their variables (several = an
    ensemble). `init_from`: a finished stage's host TrainState whose parameters (student and
    adapters) initialise this one (two-stage methods such as FitNet's hint training, and the
    fine-tuning stages 'prune' and 'qat', which start from the distilled student).

    Channel pruning (prune.method='channel') makes the stage's model smaller than the configured
    one: its fields (e.g. 'hidden' or 'widths') are written to ``<stage>/model.json``, which
    `load_trained_model` reads.
    """

    def __init__(self, role, config, dataset: kdata.Dataset, par: kstep.DataParallel, workdir: str,
                 teachers=(), teacher_vars=(), init_from=None, on_epoch=None):
        self.role, self.config, self.ds, self.par = role, config, dataset, par
        self.on_epoch, self.init_from = on_epoch, init_from
        self.dir, self.workdir = os.path.join(workdir, role), workdir
        self.kind = kind = stages.KINDS[role]
        model_cfg = config[kind.model]
        dtype = _DTYPES[config.dtype]
        self.model_name = model_cfg.model
        self.model_kwargs = dict(model_cfg.get("kwargs") or {})
        if model_cfg.get("dropout"):  # a rate for the models that have dropout (MLP, SmallCNN, WRN)
            self.model_kwargs["dropout"] = float(model_cfg.dropout)
        self.model = models.get_model(model_cfg.model, num_classes=dataset.num_classes, dtype=dtype,
                                      bn_axis_name=kstep.AXIS, **self.model_kwargs)
        self.epochs = int(config[kind.epochs].epochs)
        self.lr = optim.resolve_learning_rate(
            config.optimizer.name, config.optimizer.learning_rate,
            model_cfg.learning_rate_scale * (config[kind.epochs].learning_rate_scale if kind.fine_tunes else 1.0),
            config.optimizer.tuned_learning_rates)
        self.terms = stages.objective(role, config, dataset.train, kconfig.planned_stages(config))
        ema = kind.mean_teacher and config.teacher.source == "ema"
        teacher_weights = self._set_teachers(teachers, teacher_vars, ema)
        self.batch_size = config.batch_size
        self.spe = kdata.steps_per_epoch(len(dataset.train.labels), config.batch_size)
        if self.spe == 0:
            raise ValueError(f"config.batch_size={config.batch_size} exceeds the {len(dataset.train.labels)} "
                             "training examples: lower it")
        self.total_steps = self.epochs * self.spe
        self.step_cfg = kstep.StepConfig(
            mean=tuple(dataset.mean), std=tuple(dataset.std), steps_per_epoch=self.spe,
            # streamed data sets: crop and flip on the loader workers (kdjax.data.stream), not in the step
            crop_padding=0 if dataset.streamed else config.augment.crop_padding,
            flip=config.augment.flip and not dataset.streamed,
            mixup_alpha=config.augment.mixup_alpha, cutmix_alpha=config.augment.cutmix_alpha,
            l1=config.loss.l1, l2=config.loss.l2, dtype=dtype,
            ema_decay=config.teacher.ema_decay if ema else 0.0, dot=config.optimizer.name == "dot",
        )
        self.distiller = distill.Distiller(self.terms, teacher_weights=teacher_weights)
        self.schedule, self.tx = self._optimizer()
        init = config.get("init")
        from_run = [r.strip() for r in str(init.stages).split(",")] if init is not None and init.from_run else []
        self.transfer = (init.from_run, init.role, init.reinit) if role in from_run else None
        self.weights = model_cfg.get("weights") or None  # torchvision / timm weights the stage starts from
        self.surgery = None  # channel pruning: (smaller model fields, its variables, unpruned parameter count)
        self.select_from_epoch = 0  # checkpoints of earlier epochs are never selected (gradual pruning)
        self.float_model = self.model
        self.loader_workers = loader_workers(config)
        self.eval_threads = max(1, self.loader_workers)
        self.loader = None  # the streamed data set's TrainLoader while the loop runs
        kind.setup(self)  # what the kind changes in the model or the optimizer (kdjax.stages)

    def _set_teachers(self, teachers, teacher_vars, ema: bool) -> tuple[float, ...] | None:
        """The teachers this stage's terms read (none for a labels-only stage or a Mean Teacher),
        in ensemble order: teacher.feature_source's teacher first (its features are the ones
        read); returns the ensemble weights in the same order (kdjax.distill.ensemble_order)."""
        self.teachers, self.teacher_vars = tuple(teachers), tuple(teacher_vars)
        if ema or not distill.needs_teacher(self.terms):
            self.teachers, self.teacher_vars = (), ()
        c = self.config.teacher
        order, weights = distill.ensemble_order(len(self.teachers), self.terms, c.get("ensemble_weights", ""),
                                                c.get("feature_source"))
        self.teachers = tuple(self.teachers[i] for i in order)
        self.teacher_vars = tuple(self.teacher_vars[i] for i in order)
        return weights

    def _optimizer(self):
        """(learning-rate schedule, optax transformation): config.optimizer with its frozen
        parameters and head rate, and no update at all for the parts the stage's terms keep fixed
        (FT: the student while its paraphraser is pre-trained, the paraphraser afterwards), so
        weight decay and momentum cannot move them."""
        o = self.config.optimizer
        schedule = optim.make_schedule(
            o.schedule, base_lr=self.lr, total_steps=self.total_steps, steps_per_epoch=self.spe,
            warmup_epochs=o.warmup_epochs, decay_epochs=tuple(o.decay_epochs), decay_factor=o.decay_factor,
            step_epochs=o.step_epochs,
        )
        make = lambda schedule: optim.make_optimizer(  # noqa: E731
            o.name, schedule, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay,
            grad_clip_norm=o.grad_clip_norm, decay_all=o.decay_all, b1=o.b1, b2=o.b2, eps=o.eps,
            rmsprop_decay=o.rmsprop_decay, adadelta_rho=o.adadelta_rho, dot_delta=o.get("dot_delta", 0.075),
        )
        tx = make(schedule)
        # optimizer.freeze (every stage) and the trained role's own <role>.freeze
        self.freeze = "|".join(f"(?:{r})" for r in (o.get("freeze", ""), self.config[self.kind.model].get("freeze", ""))
                               if r)
        head_scale = float(o.get("head_learning_rate_scale", 1.0))
        if self.freeze or head_scale != 1.0:  # frozen parameters, a head with its own rate
            head_tx = make(lambda count: head_scale * schedule(count))
            tx = optim.partition({"body": tx, "head": head_tx, "frozen": optax.set_to_zero()},
                                 [("frozen", self.freeze), ("head", o.head if head_scale != 1.0 else "")],
                                 default="body")
        self.student_frozen, frozen_adapters = stages.frozen_parts(self.terms)
        fixed = (["student/"] if self.student_frozen else []) + [f"distiller/{re.escape(n)}/" for n in frozen_adapters]
        if fixed:
            tx = optim.partition({"train": tx, "fixed": optax.set_to_zero()},
                                 [("fixed", "^(" + "|".join(fixed) + ")")], default="train", within="")
        return schedule, tx

    # -- init / restore -------------------------------------------------------------------------
    def _init(self, transfer: bool = False):
        """The fresh TrainState of this stage (one jit-compiled init; see kstep.init_state); with
        `transfer`, the model's variables come from config.init.from_run (transfer learning)."""
        state = kstep.init_state(
            self.model, self.distiller, self.teachers, self.teacher_vars, self.tx, self.ds.image_shape,
            stages.init_seed(self.role, self.config.seed),
            ema=self.step_cfg.ema_decay > 0,
            init_from=None if self.surgery else self.init_from)
        if self.surgery:  # the channel-pruned student's surviving weights
            variables = dict(jax.tree.map(jnp.asarray, self.surgery[1]))
            params = dict(state.params, student=variables.pop("params"))
            return state.replace(params=params, model_state=dict(state.model_state, student=variables))
        if transfer and self.weights:
            return self._from_weights(state)
        if not (transfer and self.transfer):
            return state
        run_dir, role, reinit = self.transfer
        source, *_ = runs.read_stage_variables(run_dir, role)
        fresh = jax.device_get(self.variables_of(state))
        variables = runs.transfer_variables(fresh, source, reinit, where=f"the {role} of {run_dir}")
        logging.info("[%s] initialised from the %s of %s (re-initialised: %s)", self.role, role, run_dir,
                     reinit or "nothing")
        params = dict(state.params, student=variables.pop("params"))
        return state.replace(params=params, model_state=dict(state.model_state, student=variables))

    def _from_weights(self, state):
        """`state` with the model's variables from the torchvision / timm weights of config.<model>.weights
        (kdjax.models.pretrained), matched by path; the classifier (pretrained.HEADS_REGEX) stays freshly
        initialised when the data set's class count is not the weights'."""
        from kdjax.models import pretrained

        model_cfg = self.config[self.kind.model]
        arch = pretrained.arch_of(self.weights, model_cfg.get("weights_arch") or None)
        imported, source = pretrained.load(self.weights, arch.name)
        reinit = pretrained.HEADS_REGEX if imported.num_classes != self.ds.num_classes else ""
        fresh = jax.device_get(self.variables_of(state))
        variables = runs.transfer_variables(fresh, jax.device_get(source), reinit, where=f"{self.weights}")
        logging.info("[%s] initialised from %s weights %s (%s)%s", self.role, arch.name, self.weights,
                     arch.preprocess.describe(),
                     f"; new head for {self.ds.num_classes} classes (the weights' has {imported.num_classes})" if reinit else "")
        params = dict(state.params, student=variables.pop("params"))
        return state.replace(params=params, model_state=dict(state.model_state, student=variables))

    def frozen_stats(self, state) -> Any:
        """Which of the student's non-parameter variables stay fixed: the BatchNorm statistics of
        layers whose scale is frozen (config.optimizer.freeze, config.<role>.freeze), all of them when the stage's terms fix the
        student (`frozen_parts`: FT's paraphraser pre-training); None when nothing is frozen."""
        if self.student_frozen:
            return jax.tree.map(lambda _: True, state.model_state["student"])
        if not self.freeze:
            return None
        pattern = re.compile(self.freeze)
        paths = optim.param_paths(state.model_state["student"])  # e.g. 'batch_stats/bn1_0/mean'
        return jax.tree.map(lambda p: bool(pattern.search(p.split("/", 1)[1].rsplit("/", 1)[0] + "/scale")), paths)

    def preflight(self, teacher_models) -> None:
        """Traces this stage's init abstractly (jax.eval_shape, no compute): raises a one-line
        ValueError for a feature a model lacks or shapes a method cannot reconcile."""
        teachers = tuple(teacher_models) if distill.needs_teacher(self.terms) else ()
        order, _ = distill.ensemble_order(len(teachers), self.terms, self.config.teacher.get("ensemble_weights", ""),
                                          self.config.teacher.get("feature_source"))
        teachers = tuple(teachers[i] for i in order)
        shape = (1,) + self.ds.image_shape
        t_vars = tuple(models.param_shapes(m, shape) for m in teachers)
        s_vars, _ = jax.eval_shape(lambda tv: kstep.init_variables(
            self.model, self.distiller, teachers, tv, self.ds.image_shape, jax.random.PRNGKey(0),
            ema=self.step_cfg.ema_decay > 0), t_vars)
        self.kind.preflight(self)
        if self.transfer and not self.surgery:  # the earlier run exists and its model fits this one
            run_dir, role, reinit = self.transfer
            runs.transfer_variables(s_vars, runs.read_stage_variables(run_dir, role)[0], reinit,
                               where=f"the {role} of {run_dir}")

    @staticmethod
    def variables_of(state) -> dict:
        """The trained model's Flax variables (no distiller adapters) from a host TrainState."""
        return {"params": state.params["student"], **state.model_state["student"]}

    def restore_selected(self):
        """The selected (best) host TrainState of this stage once it has finished."""
        ckpts = kckpt.StageCheckpoints(os.path.join(self.dir, "checkpoints"))
        step = ckpts.restore_meta(ckpts.latest_step())["best_step"]
        state, _ = ckpts.restore(step, jax.device_get(self._init()))
        ckpts.close()
        return state

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> tuple[dict, Any]:
        """Trains (or resumes) to the end; returns (result dict, the selected host TrainState).

        Whatever happens, checkpoints being written are finished before this returns or raises.
        """
        if self.surgery and runs.is_main():  # the architecture load_trained_model rebuilds
            paths.makedirs(self.dir)
            runs.write_json(os.path.join(self.dir, "model.json"), {"model": self.model_name, "kwargs": self.model_kwargs})
        ckpts = kckpt.StageCheckpoints(os.path.join(self.dir, "checkpoints"), keep=self.config.checkpoint.keep)
        self.logger = None
        try:
            return self._train(ckpts)
        finally:
            if self.loader is not None:  # ends its worker processes, whatever happened
                self.loader.close()
                self.loader = None
            ckpts.close()
            if self.logger is not None:
                self.logger.close()

    def _resume(self, ckpts: kckpt.StageCheckpoints):
        """(host TrainState, meta, latest step or None): the latest checkpoint, else a fresh state."""
        meta = {"history": [], "best_step": None, "best_score": None}
        latest = ckpts.latest_step()
        state = self._init(transfer=latest is None)
        runs.agree("latest checkpoints", -1 if latest is None else latest, ckpts.directory)
        if latest is not None:
            state, meta = ckpts.restore(latest, jax.device_get(state))
            ckpts.check_selected(meta, self.role)  # before training on: the end would fail the same way
            logging.info("resuming stage %r from step %d (epoch %.2f of %d) in %s",
                         self.role, latest, latest / self.spe, self.epochs, ckpts.directory)
        else:
            logging.info("stage %r: training %s for %d epochs (%d steps of batch %d), terms: %s",
                         self.role, self.model_name, self.epochs, self.total_steps, self.batch_size,
                         ", ".join(f"{t.weight:g}*{t.name}" for t in self.terms))
        return state, meta, latest

    def _train(self, ckpts: kckpt.StageCheckpoints) -> tuple[dict, Any]:
        c = self.config
        state, meta, latest = self._resume(ckpts)
        lc = c.get("log", {})
        self.logger = logs.StageLog(
            self.workdir, self.role, total_steps=self.total_steps, steps_per_epoch=self.spe, batch_size=self.batch_size,
            start_step=latest or 0, progress=lc.get("progress", True), progress_seconds=lc.get("progress_seconds", 30.0),
            tensorboard=lc.get("tensorboard", True), wandb=lc.get("wandb", False), config=runs.run_identity(c))

        cache_start = time.time()
        cache = self._teacher_cache(latest or 0)  # frozen teacher outputs computed once, or None
        cache_seconds = time.time() - cache_start
        teachers = () if cache is not None else self.teachers
        train_step = self.par.wrap(
            kstep.make_train_step(self.model, self.distiller, teachers, self.tx, self.schedule, self.step_cfg,
                                  frozen_stats=self.frozen_stats(state)),
            donate_first=True,
        )
        eval_step = self.par.wrap(kstep.make_eval_step(self.model, self.step_cfg))
        teacher_vars = self.par.replicate(self.teacher_vars if cache is None else ())
        state = self.par.replicate(state)
        step = int(self.par.unreplicate(state.step))
        t0 = time.time()
        control = _Control(c.checkpoint.every_steps, c.checkpoint.every_minutes)
        pending = []  # (step, metrics) not yet checked for NaN/Inf: checked lazily, no per-step sync
        skipped = meta.get("skipped_steps", 0)
        patience = int(c.get("train", {}).get("early_stop_patience", 0) or 0)
        stopped = _patience_exhausted(meta, patience)  # decided once per epoch, not per step
        next_batch = self._batches(step, cache)
        while step < self.total_steps and not stopped:
            state, metrics = train_step(state, teacher_vars, next_batch(step))
            step += 1
            pending.append((step, metrics))
            end_of_epoch = step % self.spe == 0
            periodic, preempted = control.poll(step, end_of_epoch)
            log = step % c.log_every_steps == 0 or step == self.total_steps
            if log:
                self._log(step, {k: float(v) for k, v in self.par.unreplicate(metrics).items()})
            if end_of_epoch or periodic or preempted or log:
                skipped += self._check_finite(pending, ckpts)
                pending = []
                meta["skipped_steps"] = skipped
            if end_of_epoch:
                meta = dict(self._end_of_epoch(step, state, eval_step, meta), skipped_steps=skipped)
                stopped = _patience_exhausted(meta, patience)
            if end_of_epoch or periodic or preempted:  # keeps the latest N and meta's best_step
                ckpts.save(step, self.par.unreplicate(state), meta)
                control.saved()
            if end_of_epoch and self.on_epoch is not None:  # e.g. a sweep's pruner (it may raise)
                self.on_epoch(self.role, meta["history"][-1])
            if preempted:
                raise Preempted(f"stage {self.role!r} stopped by {preempted.name} at step {step}; checkpoint "
                                f"saved in {ckpts.directory}; rerun the same command to resume", preempted)
        ckpts.wait()
        train_seconds = time.time() - t0
        if step < self.total_steps:
            logging.info("[%s] early stop after epoch %d: no better validation accuracy for %d epochs",
                         self.role, step // self.spe, patience)
        timing = {"train_seconds_this_session": round(train_seconds, 2),
                  "teacher_cache_seconds_this_session": round(cache_seconds, 2) if cache is not None else None}
        return self._result(ckpts, self.par.unreplicate(state), meta, step, timing)

    def _batches(self, start: int, cache):
        """fn(step) -> the sharded global batch of `step`, for steps start, start + 1, ... in order.

        In memory: `kdata.train_batch`. Streamed: the `kdata.stream.TrainLoader` from `start` (closed
        by `run`), PREFETCH batches ahead already put on the devices (the step's dispatch is
        asynchronous, so the host decodes and transfers them while the devices compute)."""
        c = self.config
        if not self.ds.streamed:
            return lambda step: self.par.shard(kdata.train_batch(self.ds.train, self.batch_size, seed=c.seed,
                                                                 step=step, steps_per_epoch=self.spe, cache=cache))
        ahead = collections.deque()

        def joined(step):  # the soft-label store's teacher logits, by position (kdjax.data.store)
            batch = next(self.loader)
            if cache is not None:
                batch["teacher"] = cache.teacher(step, batch["index"], batch.pop("crop"))
            return batch

        def next_batch(step):
            if self.loader is None:  # on the first step only: a finished or early-stopped stage starts no workers
                self.loader = kdata.stream.TrainLoader(
                    self.ds.train, self.batch_size, seed=c.seed, start_step=start, total_steps=self.total_steps,
                    steps_per_epoch=self.spe, flip=c.augment.flip, workers=self.loader_workers,
                    process_index=jax.process_index(), process_count=jax.process_count(), crops=cache is not None)
            while len(ahead) < PREFETCH and step + len(ahead) < self.total_steps:
                ahead.append(self.par.shard(joined(step + len(ahead))))
            return ahead.popleft()

        return next_batch

    def _result(self, ckpts, state, meta: dict, step: int, timing: dict) -> tuple[dict, Any]:
        """(result dict, selected host TrainState) once the loop has ended at `step`; writes
        predictions.npz and closes the stage's log."""
        best_state, _ = ckpts.restore(meta["best_step"], state)
        best_vars = self.variables_of(best_state)
        hist = meta["history"]
        best = next(h for h in hist if h["step"] == meta["best_step"])  # the restored one (ties: the later)
        result = {
            "model": self.model_name,
            "num_params": models.num_params(best_vars["params"]),
            "test_accuracy": hist[-1]["test_accuracy"],
            "best_test_accuracy": max(h["test_accuracy"] for h in hist if h["epoch"] >= self.select_from_epoch),
            "selected_epoch": best["epoch"],
            "selected_test_accuracy": best["test_accuracy"],
            "selected_by": "val_accuracy" if self.ds.val is not None else "last_epoch",
            "epochs": self.epochs,
            "steps": self.total_steps,
            **timing,
            "images_per_sec": inference.inference_throughput(self.model, best_vars, self.ds.image_shape,
                                                             self.ds.mean, self.ds.std, batch=self.config.throughput_batch),
            "terms": {t.name: t.weight for t in self.terms},
        }
        if self.weights:  # the torchvision / timm weights the stage started from, and their preprocessing
            from kdjax.models import pretrained
            arch = pretrained.arch_of(self.weights, self.config[self.kind.model].get("weights_arch") or None)
            result.update(weights=paths.absolute(self.weights), weights_arch=arch.name,
                          weights_preprocess=arch.preprocess.describe(),
                          input_normalization=self.config.dataset.get("normalize", ""))
        heads = inference.head_accuracies(self.model, best_vars, self.ds.test, self.ds.mean, self.ds.std,
                                          self.config.eval_batch_size, threads=self.eval_threads)
        if heads:  # a distilled ViT: each head alone and both (the selected model)
            result.update(heads)
        if self.ds.val is not None:
            result["val_accuracy"] = hist[-1]["val_accuracy"]
            result["selected_val_accuracy"] = best["val_accuracy"]
        if step < self.total_steps:
            result["stopped_early_at_epoch"] = step // self.spe
        self._write_predictions(best_vars)
        logging.info("[%s] done: test accuracy %.4f (last epoch), %.4f (selected epoch %d)%s", self.role,
                     result["test_accuracy"], result["selected_test_accuracy"], result["selected_epoch"],
                     f", {result['stopped_early_at_epoch']} epochs (early stop)" if "stopped_early_at_epoch" in result else "")
        self.logger.close(result)
        self.logger = None
        result.update(self.kind.report(self, best_vars))
        if meta.get("skipped_steps"):
            result["skipped_nonfinite_steps"] = meta["skipped_steps"]
        return result, best_state

    def _write_predictions(self, variables) -> None:
        """``<stage>/predictions.npz``: the selected model's test-set logits and the labels, from
        which every figure of the evaluation report can be recomputed."""
        if self.ds.streamed:
            logits = inference.predict_split_logits(self.model, variables, self.ds.test, self.ds.mean, self.ds.std,
                                                    self.config.eval_batch_size, threads=self.eval_threads)
        else:
            logits = inference.predict_logits(self.model, variables, self.ds.test.images, self.ds.mean, self.ds.std,
                                              self.config.eval_batch_size)
        if runs.is_main():
            paths.save_npz(os.path.join(self.dir, "predictions.npz"), logits=logits,
                           labels=np.asarray(self.ds.test.labels))

    def _teacher_cache(self, start: int):
        """The frozen teacher's outputs for every training example (config.distill.cache_teacher),
        or None: the teacher then runs in the step. See kdjax.data.teacher_cache; on streamed data
        the soft-label store of every epoch's crops (kdjax.data.store), its pieces from step
        `start` on computed here (each process its own part of the batches)."""
        c = self.config
        if self.ds.streamed:
            return self._soft_label_store(start)
        return kdata.teacher_cache(
            c.distill.cache_teacher, self.teachers, self.teacher_vars, self.terms, self.ds.train.images,
            mean=self.step_cfg.mean, std=self.step_cfg.std, dtype=self.step_cfg.dtype, obstacle=kconfig.cache_obstacle(c),
            path=os.path.join(self.dir, "teacher_cache.npz"), chunk=c.eval_batch_size, write=runs.is_main(),
            label=f"[{self.role}]")

    def _soft_label_store(self, start: int):
        c = self.config
        common = dict(global_batch=self.batch_size, steps_per_epoch=self.spe, seed=c.seed, flip=c.augment.flip,
                      process_index=jax.process_index(), process_count=jax.process_count(), label=f"[{self.role}]")
        store = kdata.store.open_store(
            c.distill.cache_teacher, self.teachers, self.teacher_vars, self.terms, self.ds.train,
            top_k=c.distill.get("cache_top_k"), num_classes=self.ds.num_classes, total_steps=self.total_steps,
            dtype=self.step_cfg.dtype, obstacle=kconfig.cache_obstacle(c),
            root=c.distill.get("cache_dir") or os.path.join(self.dir, "soft_labels"), **common)
        if store is not None:
            kdata.store.build(store, self.teachers, self.teacher_vars, self.ds.train, workers=self.loader_workers,
                              mean=self.step_cfg.mean, std=self.step_cfg.std, dtype=self.step_cfg.dtype,
                              start_step=start, **common)
        return store

    def _check_finite(self, pending, ckpts) -> int:
        """Stops the run at the first non-finite step (nan_policy 'stop'), or counts them ('skip').

        The step itself already left the state unchanged (see kdjax.step), so the latest
        checkpoint, and anything saved later, holds only finite values.
        """
        bad = [(s, m) for s, m in pending if float(self.par.unreplicate(m["nonfinite"])) > 0]
        if not bad:
            return 0
        step, metrics = bad[0]
        values = {k: float(v) for k, v in self.par.unreplicate(metrics).items()}
        terms = [k for k, v in values.items() if k.startswith("loss/") and not np.isfinite(v)]
        what = ", ".join(f"{k}={values[k]}" for k in terms) or (
            f"gradient (grad_norm={values['grad_norm']})" if not np.isfinite(values["grad_norm"])
            else f"optimizer update (update_norm={values['update_norm']})")
        if self.config.nan_policy == "skip":
            logging.warning("[%s] skipped %d non-finite step(s); first at step %d: %s", self.role, len(bad), step, what)
            return len(bad)
        ckpts.wait()
        raise NonFiniteError(
            f"non-finite {what} at step {step} (epoch {step / self.spe:.2f}) of stage {self.role!r}; stopped. "
            f"The last good checkpoint (step {ckpts.latest_step()}) is kept in {ckpts.directory}; "
            "set --config.nan_policy=skip to skip such steps instead"
        )

    def _end_of_epoch(self, step, state, eval_step, meta) -> dict:
        variables = {"params": state.params["student"], **state.model_state["student"]}
        epoch = step // self.spe
        test = inference.evaluate_split(eval_step, self.par, variables, self.ds.test, self.config.eval_batch_size,
                                        threads=self.eval_threads)
        row = {"epoch": epoch, "step": step, "test_accuracy": test["accuracy"], "test_loss": test["loss"]}
        if self.ds.val is not None:
            val = inference.evaluate_split(eval_step, self.par, variables, self.ds.val, self.config.eval_batch_size,
                                           threads=self.eval_threads)
            row.update(val_accuracy=val["accuracy"], val_loss=val["loss"])
        # Checkpoint selection never looks at the test set: the best validation accuracy when a
        # validation split exists, otherwise simply the latest epoch.
        row["score"] = row["val_accuracy"] if self.ds.val is not None else float(epoch)
        if epoch < self.select_from_epoch:  # not yet at the target sparsity: never selected
            row["score"] = -1.0
        history = meta["history"] + [row]
        best_step, best_score = meta["best_step"], meta["best_score"]
        # '>=': on ties the later epoch is selected (kdjax.checkpoint keeps exactly this step).
        if best_score is None or row["score"] >= best_score:
            best_step, best_score = step, row["score"]
        self._log(step, {k: v for k, v in row.items() if k not in ("epoch", "step")}, kind="eval")
        return {"history": history, "best_step": best_step, "best_score": best_score}

    def _log(self, step: int, values: dict, kind: str = "train") -> None:
        self.logger.log(step, values, kind)


# ----------------------------------------------------------------------------------------------
# The whole run


def load_dataset(ds_cfg, seed: int) -> kdata.Dataset:
    """The data set a run trains on, from its `config.dataset` block (a ConfigDict or the dict of a
    saved config.json): name, location, validation split, class subset and few-shot size, and the
    normalisation its models' inputs get (config.dataset.normalize, resolved: '' reads as 'data')."""
    get = ds_cfg.get
    with _mock_data(get("mock_examples", 0)):
        dataset = kdata.load(get("name"), data_dir=get("data_dir"), manual_dir=get("manual_dir"),
                          val_size=get("val_size", 0.0), seed=seed, download=get("download", True),
                          classes=kconfig.parse_classes(get("classes", "")), train_per_class=get("train_per_class"),
                          folds=get("folds", 0) or 0, fold=get("fold", 0) or 0, image_size=get("image_size"))
    return kdata.with_normalization(dataset, get("normalize", "") or "data")


def _mock_data(num_examples: int):
    """`tfds.testing.mock_data` (random examples, no files) when asked for, else a no-op."""
    if not num_examples:
        return contextlib.nullcontext()
    import tensorflow_datasets as tfds

    return tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE)


def run(config: ml_collections.ConfigDict, workdir: str, overwrite: bool = False, on_epoch=None) -> dict:
    """Runs every stage of `config` in `workdir`; returns the summary dict.

    On SIGTERM (what TPU VMs and Colab send before they stop a machine) or SIGINT (Ctrl-C, a
    notebook's interrupt) the current stage saves a checkpoint and `Preempted` is raised; rerunning
    the same command resumes. `on_epoch(role, row)` is called after every epoch's evaluation and
    checkpoint with that epoch's row of the history (epoch, accuracies, score); an exception it
    raises (e.g. a sweep pruning the trial) propagates, the checkpoint already saved.
    """
    _SIGNALLED.clear()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, _on_signal) for sig in STOP_SIGNALS} if in_main_thread else {}
    try:
        if config.dataset.get("folds"):
            return _run_folds(config, workdir, overwrite, on_epoch)
        return _run(config, workdir, overwrite, on_epoch)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


CV_FIELDS = ("test_accuracy", "best_test_accuracy", "selected_test_accuracy", "selected_val_accuracy")


def _run_folds(config, workdir: str, overwrite: bool, on_epoch) -> dict:
    """k-fold cross-validation (config.dataset.folds = k): the whole run once per fold in
    ``<workdir>/fold<i>`` (fold i as the validation split), then ``<workdir>/cv.json`` with every
    stage's figures per fold and their mean and sample std. Returns the summary of means (with
    ``<field>_std`` entries) in the shape of a single run's."""
    k = int(config.dataset.folds)
    if k < 2:
        raise ValueError(f"config.dataset.folds={k}: cross-validation needs at least 2 folds (0 turns it off)")
    if config.dataset.val_size:
        raise ValueError(f"config.dataset.folds={k} makes the validation split itself; set "
                         f"config.dataset.val_size to 0 (got {config.dataset.val_size})")
    summaries = []
    for fold in range(k):
        fold_config = config.copy_and_resolve_references()
        with fold_config.unlocked():
            fold_config.dataset.fold = fold
        logging.info("cross-validation: fold %d of %d", fold + 1, k)
        summaries.append(_run(fold_config, os.path.join(workdir, f"fold{fold}"), overwrite, on_epoch))
    out = {}
    for role in ROLES:
        rows = [s[role] for s in summaries if role in s]
        if len(rows) != k:
            continue
        entry = {"model": rows[0].get("model"), "num_params": rows[0].get("num_params"), "folds": k}
        for field in CV_FIELDS + ("images_per_sec",):
            values = [r[field] for r in rows if field in r]
            if len(values) == k:
                entry[field] = float(np.mean(values))
                entry[f"{field}_std"] = float(np.std(values, ddof=1))
                entry[f"{field}_per_fold"] = values
        out[role] = entry
    runs.write_json(os.path.join(workdir, "cv.json"), out)
    return out


def _run(config: ml_collections.ConfigDict, workdir: str, overwrite: bool, on_epoch=None) -> dict:
    kconfig.validate(config)
    config = config.copy_and_resolve_references()
    with config.unlocked():  # '' -> the name every stage and config.json use (the weights' or 'data')
        config.dataset.normalize = kconfig.resolve_normalization(config)
    paths.check_workdir(workdir)
    runtime.enable_compilation_cache(config.get("compile_cache_dir"))
    dataset = load_dataset(config.dataset, config.seed)
    logging.info("data %s: %d train / %s val / %d test, %s, %d classes", dataset.name, len(dataset.train.labels),
                 len(dataset.val.labels) if dataset.val is not None else 0, len(dataset.test.labels),
                 dataset.image_shape, dataset.num_classes)
    par = kstep.DataParallel(config.parallel, num_devices=config.num_devices)
    logging.info("%s data-parallel over %d devices (%s, %d processes)", config.parallel, par.num_devices,
                 par.devices[0].device_kind, jax.process_count())
    dtype = _DTYPES[config.dtype]
    reused = {}  # summary entries of the models loaded from earlier runs
    teachers, teacher_vars = [], []
    for run_dir in filter(None, (p.strip() for p in config.teacher.ensemble.split(","))):
        model, variables, result = runs.load_trained_model(run_dir, "teacher", dataset, dtype)
        teachers.append(model)
        teacher_vars.append(variables)
        reused.setdefault("ensemble", {})[paths.absolute(run_dir)] = result
    if config.teacher.checkpoint:  # reuse an earlier run's model as the teacher: no teacher stage
        model, variables, reused["teacher"] = runs.load_trained_model(
            config.teacher.checkpoint, config.teacher.checkpoint_role, dataset, dtype)
        teachers.insert(0, model)
        teacher_vars.insert(0, variables)
    elif kconfig.imported_teacher(config):  # torchvision / timm weights used as they are: no teacher stage
        model, variables, reused["teacher"] = load_imported_teacher(config, dataset, dtype)
        teachers.insert(0, model)
        teacher_vars.insert(0, variables)
    loaded_teacher = bool(config.teacher.checkpoint) or kconfig.imported_teacher(config)
    # Pre-flight: trace every stage's models and terms (no compute) so that a missing feature or
    # shapes a method cannot reconcile fail now, not after hours of teacher training.
    planned = kconfig.planned_stages(config)
    teacher_models = list(teachers)
    if "teacher" in planned and not loaded_teacher:
        teacher_models.insert(0, Stage("teacher", config, dataset, par, workdir).model)
    for role in planned:
        if not (role == "teacher" and loaded_teacher):
            Stage(role, config, dataset, par, workdir).preflight(teacher_models)
    # Only now is the workdir touched: a config that cannot run leaves nothing behind.
    runs.prepare_workdir(config, workdir, overwrite)
    summary_path = os.path.join(workdir, "summary.json")
    summary = {**runs.read_json(summary_path, {}), **reused}

    selected = {}  # role -> selected host TrainState of a finished stage that a later one starts from
    for role in planned:
        if role == "teacher" and loaded_teacher:
            continue  # loaded above
        stage = Stage(role, config, dataset, par, workdir, teachers=teachers, teacher_vars=teacher_vars,
                      init_from=selected.get(stages.KINDS[role].starts_from),
                      on_epoch=on_epoch)
        result_path = os.path.join(stage.dir, "result.json")
        result = runs.read_json(result_path)
        runs.agree("answers to 'is this stage finished (result.json)?'", result is not None, stage.dir)
        if result is not None:
            logging.info("stage %r already finished (%s); skipping", role, result_path)
            needed = role == "teacher" or any(stages.KINDS[r].starts_from == role for r in planned)
            best = stage.restore_selected() if needed else None
        else:
            result, best = stage.run()
            runs.write_json(result_path, result)
        if role == "teacher":
            teachers.insert(0, stage.model)
            teacher_vars.insert(0, stage.variables_of(best))
        selected[role] = best
        summary[role] = result
        runs.write_json(summary_path, summary)
    logging.info("summary written to %s", summary_path)
    return summary


def loader_workers(config) -> int:  # config.dataset.loader_workers, None: the machine's
    return kdata.stream.default_workers() if config.dataset.get("loader_workers") is None else int(config.dataset.loader_workers)


def load_imported_teacher(config, dataset: kdata.Dataset, dtype) -> tuple[Any, dict, dict]:
    """config.teacher.weights as the teacher as it is (teacher.epochs=0): (model, variables, result:
    the file, arch, preprocessing and the test accuracy measured here, inputs normalised as every
    stage's). Its classifier must fit the data set's classes (one-line ValueError otherwise)."""
    from kdjax.models import pretrained

    c = config.teacher
    arch = pretrained.arch_of(c.weights, c.weights_arch or None)
    model, variables = pretrained.load(c.weights, arch.name, dtype=dtype, bn_axis_name=kstep.AXIS,
                                       **dict(c.get("kwargs") or {}))
    if model.num_classes != dataset.num_classes:
        raise ValueError(f"config.teacher.weights={c.weights} classifies {model.num_classes} classes and {dataset.name} "
                         f"has {dataset.num_classes}: a teacher used as it is (teacher.epochs=0) needs the same classes; "
                         "set teacher.epochs > 0 to fine-tune it with a new head")
    logits = inference.predict_split_logits(model, variables, dataset.test, dataset.mean, dataset.std,
                                            config.eval_batch_size, threads=max(1, loader_workers(config)))
    accuracy = float(np.mean(np.argmax(logits, -1) == np.asarray(dataset.test.labels)))
    logging.info("teacher: %s weights from %s, used as they are: test accuracy %.4f (their preprocessing: %s; the "
                 "run normalises with %r: %s / %s)", arch.name, c.weights, accuracy, arch.preprocess.describe(),
                 config.dataset.normalize, dataset.mean, dataset.std)
    result = {"model": c.model, "num_params": models.num_params(variables["params"]), "test_accuracy": accuracy,
              "weights": paths.absolute(c.weights), "weights_arch": arch.name,
              "weights_preprocess": arch.preprocess.describe(), "input_normalization": config.dataset.normalize}
    return model, variables, result


def format_table(summary: dict) -> str:
    """The comparison table printed at the end of a run."""
    rows = [("role", "model", "test acc (last)", "test acc (best)", "val acc (selected)", "params", "inference img/s")]
    for role in ROLES:
        if role not in summary:
            continue
        r = summary[role]
        pm = lambda key: (f"{r[key]:.4f}" + (f" +- {r[key + '_std']:.4f}" if key + "_std" in r else "")  # noqa: E731
                          if key in r else "-")
        rows.append((
            role, str(r.get("model", "?")), pm("test_accuracy"), pm("best_test_accuracy"), pm("selected_val_accuracy"),
            f"{r['num_params']:,}", f"{r['images_per_sec']:,.0f}" if "images_per_sec" in r else "-",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)

