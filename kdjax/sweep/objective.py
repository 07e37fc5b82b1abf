"""The Optuna objective: one kdjax run per trial (its shared teacher trained once, under a lock),
reporting the objective stage's running best validation accuracy each epoch to the pruner."""

from __future__ import annotations

import os

from absl import logging

from kdjax import paths, runs, train
from kdjax.sweep import space, workers


def _ensure_teacher(config, teacher_dir: str, locks: str) -> None:
    """Trains the shared teacher run once (other workers wait for it, then reuse it)."""
    done = lambda: paths.exists(os.path.join(teacher_dir, "teacher", "result.json"))  # noqa: E731
    if done():
        return
    with workers.lock(os.path.join(locks, os.path.basename(teacher_dir.rstrip("/")) + ".lock")):
        if done():
            return
        logging.info("training the teacher %s (shared by every trial with its teacher-relevant fields)", teacher_dir)
        train.run(config, teacher_dir)


def _check_folder(config, run_dir: str) -> None:
    """A trial folder holding another config would be a bug (or another study in this folder)."""
    saved = runs.read_json(os.path.join(run_dir, "config.json"))
    if saved is None:
        return
    old, new = runs.run_identity(saved), runs.run_identity(config)
    changed = sorted(k for k in set(old) & set(new) if old[k] != new[k])
    if changed:
        raise ValueError(f"trial folder {run_dir} holds a run of another config (differs in: {', '.join(changed[:5])}); "
                         "it is not overwritten: this sweep folder belongs to another study or storage, choose a new --workdir")


class Objective:
    """Optuna objective: one kdjax run per trial. Entered with the sweep lock held; releases it
    once the trial has its parameters and worker (so trial creation is serialised)."""

    def __init__(self, p: space.Sweep, workdir: str, lock, heartbeat_s: float):
        self.p, self.workdir, self.lock, self.heartbeat_s = p, workdir, lock, heartbeat_s
        self.interrupted: BaseException | None = None

    def __call__(self, trial) -> float:
        import optuna

        try:
            params = {q.field: q.suggest(trial) for q in self.p.params}
            frozen = trial.study._storage.get_trial(trial._trial_id)
            number = workers.root_number(frozen)
            run_dir = os.path.join(self.workdir, "trials", str(number))
            config, teacher_config, teacher_dir = self.p.configs(params, self.workdir)
            trial.set_user_attr(workers.WORKER, workers.this_worker())
            trial.set_user_attr("run_dir", paths.relpath(run_dir, self.workdir))
            if teacher_dir:
                trial.set_user_attr("teacher_dir", paths.relpath(teacher_dir, self.workdir))
        finally:
            self.lock.release()
        what = f"retry of trial {number}, resuming {run_dir}" if number != trial.number else run_dir
        logging.info("trial %d (%s): %s", trial.number, what, ", ".join(f"{k}={v!r}" for k, v in params.items()))

        # Reported each epoch: the best validation accuracy so far, i.e. what the objective would be
        # if the stage ended now (the objective is the selected, best-validation epoch's). With
        # k-fold cross-validation (dataset.folds) the stage runs once per fold: fold f's epoch e is
        # step f * epochs + e, and the running best restarts with each fold. A retry inherits the
        # interrupted trial's reports, so the running best (and the fold count) continue from them.
        epochs = space.objective_epochs(config, self.p.objective)
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
            with workers.Heartbeat(self.workdir, trial.number, self.heartbeat_s):
                if teacher_config is not None:
                    _ensure_teacher(teacher_config, teacher_dir, os.path.join(self.workdir, "locks"))
                run_config = space.copy_config(config)
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

