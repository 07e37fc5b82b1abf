"""The training loop, top to bottom: init -> (restore) -> step -> eval -> checkpoint, per stage.

A run has up to three stages, each one model trained to completion (`config.stages`):

    teacher          the teacher from labels (or loaded from `config.teacher.checkpoint`)
    student          the student distilled from the teacher (`config.distill`)
    student_scratch  the same student from labels only: the baseline

Every stage checkpoints into ``<workdir>/<stage>/checkpoints`` and writes
``<workdir>/<stage>/result.json`` when finished; rerunning the same command skips finished stages
and resumes an unfinished one from its latest checkpoint. ``<workdir>/summary.json`` has one entry
per finished stage. This module is the only one that reads the config object as a whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from kdjax import checkpoint as kckpt
from kdjax import data as kdata
from kdjax import distill
from kdjax import models
from kdjax import optim
from kdjax import step as kstep

ROLES = ("teacher", "student", "student_scratch")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ----------------------------------------------------------------------------------------------
# Small helpers


def _is_main() -> bool:
    return jax.process_index() == 0


def _write_json(path: str, obj: Any) -> None:
    if not _is_main():
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def _read_json(path: str, default=None):
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def _stages(config) -> list[str]:
    stages = [s.strip() for s in str(config.stages).split(",") if s.strip()]
    for s in stages:
        if s not in ROLES:
            raise ValueError(f"unknown stage {s!r} in config.stages; choose from: {', '.join(ROLES)}")
    if "student" in stages and "teacher" not in stages and not config.teacher.checkpoint:
        raise ValueError("stage 'student' needs a teacher: add 'teacher' to config.stages or set config.teacher.checkpoint")
    return stages


def validate(config) -> None:
    """One-line errors for settings that cannot work, before anything is loaded or written."""
    if config.batch_size <= 0:
        raise ValueError(f"config.batch_size must be a positive integer, got {config.batch_size}")
    n = config.num_devices or jax.device_count()
    if config.batch_size % n:
        raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the {n} devices")
    if config.parallel not in kstep.DataParallel.MODES:
        raise ValueError(f"unknown config.parallel {config.parallel!r}; choose one of: jit, pmap")
    if config.dtype not in _DTYPES:
        raise ValueError(f"unknown config.dtype {config.dtype!r}; choose one of: {', '.join(_DTYPES)}")
    for role in ("teacher", "student"):
        models.get_model(config[role].model, num_classes=2)  # raises on an unknown name
        if config[role].epochs <= 0:
            raise ValueError(f"config.{role}.epochs must be > 0, got {config[role].epochs}")
    if config.dataset.name not in kdata.DATASETS:
        raise ValueError(f"unknown data set {config.dataset.name!r}; choose one of: {', '.join(kdata.DATASETS)}")
    optim.make_optimizer(config.optimizer.name, 0.1)  # raises on an unknown optimizer
    distill.build_terms(config.distill.to_dict())
    _stages(config)


# ----------------------------------------------------------------------------------------------
# Evaluation


def evaluate(eval_fn, par: kstep.DataParallel, variables, split: kdata.Split, batch_size: int) -> dict:
    """Accuracy and mean cross-entropy of `variables` on a whole split (all processes)."""
    totals = {"correct": 0.0, "count": 0.0, "loss_sum": 0.0}
    for images, labels, mask in kdata.eval_batches(
        split, batch_size, process_index=jax.process_index(), process_count=jax.process_count()
    ):
        out = par.unreplicate(eval_fn(variables, par.shard({"image": images, "label": labels, "mask": mask})))
        for k in totals:
            totals[k] += float(out[k])
    return {"accuracy": totals["correct"] / totals["count"], "loss": totals["loss_sum"] / totals["count"]}


def inference_throughput(model, variables, image_shape, mean, std, batch: int = 256, seconds: float = 1.0) -> float:
    """Images per second of the jitted eval-mode forward pass on one device.

    After one warm-up call, repeats the forward pass for at least `seconds` (and 3 calls) and
    divides the images processed by the time taken.
    """
    fwd = jax.jit(lambda v, x: models.apply_model(model, v, kdata.normalize(x, mean, std), train=False)[0])
    x = jax.device_put(jnp.zeros((batch,) + tuple(image_shape), jnp.uint8))
    variables = jax.device_put(variables)
    fwd(variables, x).block_until_ready()
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        fwd(variables, x).block_until_ready()
        calls += 1
    return batch * calls / (time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------
# One stage


class Stage:
    """Trains one model (teacher, student or baseline) to completion, resuming if it can."""

    def __init__(self, role, config, dataset: kdata.Dataset, par: kstep.DataParallel, workdir: str,
                 teacher=None, teacher_vars=None):
        self.role, self.config, self.ds, self.par = role, config, dataset, par
        self.dir = os.path.join(workdir, role)
        self.metrics_path = os.path.join(workdir, "metrics.jsonl")
        model_cfg = config.teacher if role == "teacher" else config.student
        dtype = _DTYPES[config.dtype]
        self.model = models.get_model(
            model_cfg.model, num_classes=dataset.num_classes, dtype=dtype, bn_axis_name=kstep.AXIS,
            **dict(model_cfg.get("kwargs") or {}),
        )
        self.eval_model = self.model
        self.epochs = int(model_cfg.epochs)
        self.lr = model_cfg.learning_rate if model_cfg.learning_rate is not None else config.optimizer.learning_rate
        distill_cfg = config.distill.to_dict() if role == "student" else {"method": "ce", "ce_weight": 1.0}
        self.terms = distill.build_terms(distill_cfg, label_smoothing=config.loss.label_smoothing)
        self.teacher, self.teacher_vars = (teacher, teacher_vars) if distill.needs_teacher(self.terms) else (None, None)
        self.batch_size = config.batch_size
        self.spe = kdata.steps_per_epoch(len(dataset.train.labels), config.batch_size)
        self.total_steps = self.epochs * self.spe
        self.step_cfg = kstep.StepConfig(
            mean=tuple(dataset.mean), std=tuple(dataset.std), steps_per_epoch=self.spe,
            crop_padding=config.augment.crop_padding, flip=config.augment.flip,
            mixup_alpha=config.augment.mixup_alpha, cutmix_alpha=config.augment.cutmix_alpha,
            l1=config.loss.l1, l2=config.loss.l2, dtype=dtype,
        )

    # -- init / restore -------------------------------------------------------------------------
    def _init(self):
        c = self.config
        seed = c.seed + ROLES.index(self.role) * 1000
        key_model, key_distiller = jax.random.split(jax.random.PRNGKey(seed))
        x = jnp.zeros((2,) + self.ds.image_shape, jnp.float32)
        variables = self.model.init(key_model, x, train=False)
        s_params = variables.pop("params")
        _, s_feats, _ = models.apply_model(self.model, {"params": s_params, **variables}, x, train=False)
        t_feats = {}
        if self.teacher is not None:
            _, t_feats, _ = models.apply_model(self.teacher, self.teacher_vars, x, train=False)
        distill.check_features(self.terms, s_feats, t_feats)
        self.distiller = distill.Distiller(self.terms)
        ctx = distill.Context(labels=jnp.zeros((2,), jnp.int32), train=False, indices=jnp.zeros((2,), jnp.int32),
                              rng=key_distiller)
        d_vars = dict(self.distiller.init(key_distiller, s_feats, t_feats, ctx))
        d_params = d_vars.pop("params", {})
        self.schedule = optim.make_schedule(
            c.optimizer.schedule, base_lr=self.lr, total_steps=self.total_steps, steps_per_epoch=self.spe,
            warmup_epochs=c.optimizer.warmup_epochs, decay_epochs=tuple(c.optimizer.decay_epochs),
            decay_factor=c.optimizer.decay_factor, step_epochs=c.optimizer.step_epochs,
        )
        self.tx = optim.make_optimizer(
            c.optimizer.name, self.schedule, momentum=c.optimizer.momentum, nesterov=c.optimizer.nesterov,
            weight_decay=c.optimizer.weight_decay, grad_clip_norm=c.optimizer.grad_clip_norm,
        )
        params = {"student": s_params, "distiller": d_params}
        return kstep.TrainState(
            step=jnp.zeros((), jnp.int32), params=params,
            model_state={"student": dict(variables), "distiller": d_vars},
            opt_state=self.tx.init(params), rng=jax.random.PRNGKey(seed + 1),
        )

    def variables_of(self, state) -> dict:
        """The trained model's Flax variables (no distiller adapters) from a host TrainState."""
        return {"params": state.params["student"], **state.model_state["student"]}

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> tuple[dict, dict]:
        """Trains (or resumes) to the end; returns (result dict, selected variables for later stages)."""
        c = self.config
        ckpts = kckpt.StageCheckpoints(os.path.join(self.dir, "checkpoints"), keep=c.checkpoint.keep)
        state = self._init()
        meta = {"history": [], "best_step": None, "best_score": None}
        latest = ckpts.latest_step()
        if latest is not None:
            state, meta = ckpts.restore(latest, jax.device_get(state))
            logging.info("resuming stage %r from step %d (epoch %.2f of %d) in %s",
                         self.role, latest, latest / self.spe, self.epochs, ckpts.directory)
        else:
            logging.info("stage %r: training %s for %d epochs (%d steps of batch %d)",
                         self.role, self.config.teacher.model if self.role == "teacher" else self.config.student.model,
                         self.epochs, self.total_steps, self.batch_size)

        train_step = self.par.wrap(
            kstep.make_train_step(self.model, self.distiller, self.teacher, self.tx, self.schedule, self.step_cfg),
            donate_first=True,
        )
        eval_step = self.par.wrap(kstep.make_eval_step(self.eval_model, self.step_cfg))
        teacher_vars = self.par.replicate(self.teacher_vars if self.teacher is not None else {})
        state = self.par.replicate(state)
        train = self.ds.train
        step = int(self.par.unreplicate(state.step))
        t0 = time.time()
        last_ckpt_time = time.time()
        while step < self.total_steps:
            epoch, i = divmod(step, self.spe)
            idx = kdata.batch_indices(
                len(train.labels), self.batch_size, seed=c.seed, epoch=epoch, step_in_epoch=i,
                process_index=jax.process_index(), process_count=jax.process_count(),
            )
            batch = {"image": train.images[idx], "label": train.labels[idx], "index": idx.astype(np.int32)}
            state, metrics = train_step(state, teacher_vars, self.par.shard(batch))
            step += 1
            if step % c.log_every_steps == 0 or step == self.total_steps:
                self._log(step, {k: float(v) for k, v in self.par.unreplicate(metrics).items()})
            end_of_epoch = step % self.spe == 0
            if end_of_epoch:
                meta = self._end_of_epoch(step, state, eval_step, meta)
            periodic = (c.checkpoint.every_steps and step % c.checkpoint.every_steps == 0) or (
                c.checkpoint.every_minutes and time.time() - last_ckpt_time > 60 * c.checkpoint.every_minutes
            )
            if end_of_epoch or periodic:
                score = meta["history"][-1]["score"] if end_of_epoch else None
                ckpts.save(step, self.par.unreplicate(state), meta, score=score)
                last_ckpt_time = time.time()
        ckpts.wait()
        train_seconds = time.time() - t0

        best_state, _ = ckpts.restore(meta["best_step"], self.par.unreplicate(state))
        ckpts.close()
        best_vars = self.variables_of(best_state)
        hist = meta["history"]
        best = max(hist, key=lambda h: h["score"])
        result = {
            "model": c.teacher.model if self.role == "teacher" else c.student.model,
            "num_params": models.num_params(best_vars["params"]),
            "test_accuracy": hist[-1]["test_accuracy"],
            "best_test_accuracy": max(h["test_accuracy"] for h in hist),
            "selected_epoch": best["epoch"],
            "selected_test_accuracy": best["test_accuracy"],
            "selected_by": "val_accuracy" if self.ds.val is not None else "last_epoch",
            "epochs": self.epochs,
            "steps": self.total_steps,
            "train_seconds_this_session": round(train_seconds, 2),
            "images_per_sec": inference_throughput(self.eval_model, best_vars, self.ds.image_shape,
                                                   self.ds.mean, self.ds.std, batch=c.throughput_batch),
        }
        if self.ds.val is not None:
            result["val_accuracy"] = hist[-1]["val_accuracy"]
        if self.role == "student":
            result["distill"] = {t.name: t.weight for t in self.terms}
        return result, best_vars

    def _end_of_epoch(self, step, state, eval_step, meta) -> dict:
        variables = {"params": state.params["student"], **state.model_state["student"]}
        epoch = step // self.spe
        test = evaluate(eval_step, self.par, variables, self.ds.test, self.config.eval_batch_size)
        row = {"epoch": epoch, "step": step, "test_accuracy": test["accuracy"], "test_loss": test["loss"]}
        if self.ds.val is not None:
            val = evaluate(eval_step, self.par, variables, self.ds.val, self.config.eval_batch_size)
            row.update(val_accuracy=val["accuracy"], val_loss=val["loss"])
        # Checkpoint selection never looks at the test set: the best validation accuracy when a
        # validation split exists, otherwise simply the latest epoch.
        row["score"] = row["val_accuracy"] if self.ds.val is not None else float(epoch)
        history = meta["history"] + [row]
        best_step, best_score = meta["best_step"], meta["best_score"]
        # '>=': on ties the later epoch is selected, as orbax's BestN (a stable sort) keeps it.
        if best_score is None or row["score"] >= best_score:
            best_step, best_score = step, row["score"]
        self._log(step, {k: v for k, v in row.items() if k not in ("epoch", "step")}, kind="eval")
        return {"history": history, "best_step": best_step, "best_score": best_score}

    def _log(self, step: int, values: dict, kind: str = "train") -> None:
        epoch = step / self.spe
        text = " ".join(f"{k}={v:.4g}" for k, v in sorted(values.items()))
        logging.info("[%s] %s step %d epoch %.2f: %s", self.role, kind, step, epoch, text)
        if _is_main():
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps({"role": self.role, "kind": kind, "step": step, "epoch": epoch, **values}) + "\n")


# ----------------------------------------------------------------------------------------------
# The whole run


def _prepare_workdir(config, workdir: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    resolved = json.loads(config.to_json_best_effort(sort_keys=True))
    saved = _read_json(path)
    if saved is not None and saved != resolved:
        changed = sorted(k for k in set(saved) | set(resolved) if saved.get(k) != resolved.get(k))
        raise ValueError(
            f"workdir {workdir} holds a run with a different config (differs in: {', '.join(changed)}); "
            "rerun with the same config to resume, or choose a new --workdir"
        )
    _write_json(path, resolved)


def _load_teacher(config, dataset, par, workdir) -> tuple[Any, dict, dict]:
    """Loads the teacher of a previous run (`config.teacher.checkpoint` = that run's workdir)."""
    src = os.path.abspath(config.teacher.checkpoint)
    stage = Stage("teacher", config, dataset, par, workdir)
    state = stage._init()
    ckpts = kckpt.StageCheckpoints(os.path.join(src, "teacher", "checkpoints"))
    result = _read_json(os.path.join(src, "teacher", "result.json"))
    latest = ckpts.latest_step()
    if latest is None:
        raise ValueError(f"config.teacher.checkpoint: no teacher checkpoint under {src}/teacher/checkpoints")
    step = ckpts.restore_meta(latest).get("best_step") or latest
    state, _ = ckpts.restore(step, jax.device_get(state))
    ckpts.close()
    logging.info("teacher: reusing %s step %d (not retraining)", src, step)
    variables = stage.variables_of(state)
    if result is None:
        eval_step = par.wrap(kstep.make_eval_step(stage.model, stage.step_cfg))
        test = evaluate(eval_step, par, par.replicate(variables), dataset.test, config.eval_batch_size)
        result = {"model": config.teacher.model, "test_accuracy": test["accuracy"],
                  "num_params": models.num_params(variables["params"])}
    result = dict(result, reused_from=src)
    return stage.model, variables, result


def _mock_data(num_examples: int):
    """`tfds.testing.mock_data` (random examples, no files) when asked for, else a no-op."""
    if not num_examples:
        return contextlib.nullcontext()
    import tensorflow_datasets as tfds

    return tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs every stage of `config` in `workdir`; returns the summary dict."""
    validate(config)
    _prepare_workdir(config, workdir)
    ds_cfg = config.dataset
    with _mock_data(ds_cfg.mock_examples):
        dataset = kdata.load(
            ds_cfg.name, data_dir=ds_cfg.data_dir, manual_dir=ds_cfg.manual_dir, val_size=ds_cfg.val_size,
            seed=config.seed, download=ds_cfg.download,
        )
    logging.info("data %s: %d train / %s val / %d test, %s, %d classes", dataset.name, len(dataset.train.labels),
                 len(dataset.val.labels) if dataset.val is not None else 0, len(dataset.test.labels),
                 dataset.image_shape, dataset.num_classes)
    par = kstep.DataParallel(config.parallel, num_devices=config.num_devices)
    summary_path = os.path.join(workdir, "summary.json")
    summary = _read_json(summary_path, {})
    teacher = teacher_vars = None
    for role in _stages(config):
        result_path = os.path.join(workdir, role, "result.json")
        if role == "teacher" and config.teacher.checkpoint:
            teacher, teacher_vars, result = _load_teacher(config, dataset, par, workdir)
        else:
            stage = Stage(role, config, dataset, par, workdir, teacher=teacher, teacher_vars=teacher_vars)
            result = _read_json(result_path)
            if result is not None:
                logging.info("stage %r already finished (%s); skipping", role, result_path)
                if role == "teacher":
                    teacher, teacher_vars = stage.model, _restore_selected(stage)
            else:
                result, variables = stage.run()
                os.makedirs(os.path.dirname(result_path), exist_ok=True)
                _write_json(result_path, result)
                if role == "teacher":
                    teacher, teacher_vars = stage.model, variables
        summary[role] = result
        _write_json(summary_path, summary)
    logging.info("summary written to %s", summary_path)
    return summary


def _restore_selected(stage: Stage) -> dict:
    """The selected (best) variables of a finished stage, from its checkpoints."""
    ckpts = kckpt.StageCheckpoints(os.path.join(stage.dir, "checkpoints"))
    latest = ckpts.latest_step()
    step = ckpts.restore_meta(latest)["best_step"]
    state, _ = ckpts.restore(step, jax.device_get(stage._init()))
    ckpts.close()
    return stage.variables_of(state)


def format_table(summary: dict) -> str:
    """The comparison table printed at the end of a run."""
    rows = [("role", "model", "test acc (last)", "test acc (best)", "params", "inference img/s")]
    for role in ROLES:
        if role not in summary:
            continue
        r = summary[role]
        rows.append((
            role, str(r.get("model", "?")), f"{r['test_accuracy']:.4f}",
            f"{r['best_test_accuracy']:.4f}" if "best_test_accuracy" in r else "-",
            f"{r['num_params']:,}", f"{r['images_per_sec']:,.0f}" if "images_per_sec" in r else "-",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
