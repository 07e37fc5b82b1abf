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

The package, by job: `space` (the sweep config, its search space, the validated sweep and the
experiment configs it makes), `workers` (the sweep lock, liveness and retries), `objective` (one
kdjax run per trial), `runner` (the Optuna study and a worker's loop: `run`) and `report` (CSV,
best.json, best_config.py, plots).
"""

from kdjax.sweep.report import format_report, write_plots, write_report
from kdjax.sweep.runner import check_storage, check_workdir, default_workdir, make_pruner, make_sampler, make_storage, run
from kdjax.sweep.space import (
    KINDS,
    PRUNERS,
    SAMPLERS,
    STUDENT_ONLY,
    TEACHER_SHARING,
    Param,
    Sweep,
    apply,
    build_config,
    defaults,
    load_config_file,
    parse,
    student_only,
    teacher_identity,
)
from kdjax.sweep.workers import progress, retry_interrupted, root_number, this_worker

__all__ = [
    "KINDS", "PRUNERS", "SAMPLERS", "STUDENT_ONLY", "TEACHER_SHARING", "Param", "Sweep", "apply", "build_config",
    "check_storage", "check_workdir", "default_workdir", "defaults", "format_report", "load_config_file",
    "make_pruner", "make_sampler", "make_storage", "parse", "progress", "retry_interrupted", "root_number", "run",
    "student_only", "teacher_identity", "this_worker", "write_plots", "write_report",
]
