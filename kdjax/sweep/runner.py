"""A worker's share of a sweep: the sweep folder's checks, the Optuna study (storage, sampler,
pruner) and the loop that creates trials under the sweep lock until the study has `n_trials`."""

from __future__ import annotations

import json
import os
import warnings

from absl import logging

from kdjax import paths, runs
from kdjax.sweep import objective, report, space, workers


def default_workdir(study: str) -> str:
    return os.path.join("runs", "sweeps", study)


def check_storage(storage: str | None) -> None:
    if storage and "://" not in storage:
        raise ValueError(f"--storage={storage!r}: give an RDB URL such as sqlite:///sweep.db or "
                         "postgresql://user@host/db (the default is a journal file in the sweep folder)")


def check_workdir(p: space.Sweep, workdir: str) -> None:
    """Refuses a sweep folder that holds another sweep (one line, before anything is written)."""
    saved = runs.read_json(os.path.join(workdir, "sweep.json"))
    if saved is None:
        return
    old, new = runs.flatten_dict(saved.get("setup", {})), runs.flatten_dict(space.roundtrip(p.setup()))
    # As kdjax.train does for a run: a config field that kdjax added or removed since is not compared.
    changed = sorted(k for k in set(old) | set(new) if old.get(k, "<absent>") != new.get(k, "<absent>")
                     and not (k.startswith("base_identity.") and (k not in old or k not in new)))
    if changed:
        shown = ", ".join(changed[:5]) + (", ..." if len(changed) > 5 else "")
        raise ValueError(f"sweep folder {workdir} holds a sweep with another setup (differs in: {shown}); rerun with "
                         "the same sweep config to continue it (n_trials may change), or choose a new --workdir")


def make_sampler(p: space.Sweep, number: int):
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


def make_pruner(p: space.Sweep):
    import optuna

    q = p.pruner
    if q["name"] == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=int(q["n_startup_trials"]),
                                           n_warmup_steps=int(q["n_warmup_steps"]))
    if q["name"] == "hyperband":
        searched = any(f.endswith(".epochs") for f in (x.field for x in p.params))
        return optuna.pruners.HyperbandPruner(
            min_resource=int(q["min_resource"]), reduction_factor=int(q["reduction_factor"]),
            max_resource="auto" if searched else space.objective_epochs(p.base, p.objective))
    return optuna.pruners.NopPruner()


def make_storage(storage: str | None, workdir: str):
    import optuna

    if storage:
        return optuna.storages.RDBStorage(storage)
    if paths.is_remote(workdir):  # no appends in a bucket: one conditionally created object per append
        from kdjax.sweep import bucket

        return bucket.journal_storage(os.path.join(workdir, "journal"))
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(os.path.join(workdir, "journal.log")))


def run(sweep_config, workdir: str | None = None, storage: str | None = None, report_only: bool = False,
        heartbeat_s: float = 30.0) -> dict:
    """Runs this worker's share of the sweep (or, with `report_only`, only rewrites the outputs);
    returns the content of best.json. Bad input: one-line ValueError, nothing written."""
    import optuna

    p = space.parse(sweep_config)
    check_storage(storage)
    workdir = workdir or default_workdir(p.study)
    paths.check_workdir(workdir)
    check_workdir(p, workdir)
    if report_only and not paths.exists(os.path.join(workdir, "sweep.json")):
        raise ValueError(f"no sweep in {workdir} (no sweep.json) to report on")
    paths.makedirs(workdir)
    lock = workers.lock(os.path.join(workdir, "locks", "sweep.lock"))
    with lock:
        saved = runs.read_json(os.path.join(workdir, "sweep.json"), {})
        if saved.get("n_trials") not in (None, p.n_trials) and not report_only:
            logging.info("n_trials: %s -> %d", saved.get("n_trials"), p.n_trials)
        if report_only:  # the sweep's own trial count decides whether it has finished
            p.n_trials = int(saved.get("n_trials", p.n_trials))
        else:
            report.write_text(os.path.join(workdir, "sweep.json"), json.dumps(
                {"setup": space.roundtrip(p.setup()), "n_trials": p.n_trials,
                 "storage": storage or ("journal/" if paths.is_remote(workdir) else "journal.log")},
                indent=2, sort_keys=True))
        study = optuna.create_study(storage=make_storage(storage, workdir), study_name=p.study, direction="maximize",
                                    load_if_exists=True, sampler=make_sampler(p, 0), pruner=make_pruner(p))
        if p.enqueue and not study.get_trials(deepcopy=False):
            for params in p.enqueue:
                study.enqueue_trial(params)
    trial_fn = objective.Objective(p, workdir, lock, heartbeat_s)
    failures = 0
    while not report_only:
        lock.acquire()
        try:
            workers.retry_interrupted(p, workdir, study)
            state = workers.progress(p, study)
            if not state["waiting"] and state["counted"] >= p.n_trials:
                break
            study.sampler = make_sampler(p, len(study.get_trials(deepcopy=False)))
            study.optimize(trial_fn, n_trials=1, gc_after_trial=False)
        finally:
            lock.release()
        if trial_fn.interrupted is not None:  # SIGTERM/SIGINT: the trial is retried when the sweep reruns
            with lock:
                report.write_report(p, study, workdir, plots=False)
            raise trial_fn.interrupted
        last = workers.last_of_mine(study)
        failures = failures + 1 if last is not None and "error" in last.user_attrs else 0
        with lock:
            report.write_report(p, study, workdir, plots=False)
        if p.max_failures_in_a_row and failures >= p.max_failures_in_a_row:
            raise ValueError(f"{failures} trials in a row failed; the last with: {last.user_attrs['error']} "
                             f"(see {os.path.join(workdir, 'trials.csv')})")
    with lock:
        return report.write_report(p, study, workdir, plots=p.plots, report_only=report_only)

