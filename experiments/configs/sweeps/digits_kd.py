"""KD hyper-parameters of the offline digits experiment, searched with Optuna's TPE.

    python -m experiments.sweep --config=experiments/configs/sweeps/digits_kd.py

Base: experiments/configs/digits.py (cnn_small teacher 20 epochs, 32-unit MLP student 60 epochs,
Adam, cosine) with 20% of the training images held out for validation (dataset.val_size=0.2:
trials are compared on validation accuracy only). Searched: distill.temperature (1..8),
distill.kd.weight (0.1..0.99; the CE weight stays at KD's 0.1) and optimizer.learning_rate
(1e-3..3e-2, log; the base rate of both stages, the student's being 10/3 of it). Objective: the
student's best-epoch validation accuracy (summary['student']['selected_val_accuracy']). TPE
(10 random start-up trials), 20 trials, median pruner (from the 6th trial, after 20 of the 60
epochs). Since optimizer.learning_rate also trains the teacher, each trial trains its own teacher
(<sweep>/teacher-<hash>); with --config.teacher_sharing=base one teacher from the base config
serves every trial and the searched rate tunes the student alone.

Two workers share one study: start the same command in two shells (or twice with `&`); together
they run 20 trials. Kill one and rerun it: the interrupted trial is retried and resumes from its
checkpoint. Outputs in runs/sweeps/digits_kd/: trials.csv, best.json, best_config.py, PNGs.

Expected runtime (2-core AMD EPYC VM, no accelerator, 2 workers): 96 s wall on an otherwise idle
machine, 209 s while other jobs kept it busy (load ~6); each trial trains a teacher (20 epochs)
and a student (60 epochs, or until pruned), 6-11 s of one core's time. Measured results:
docs/sweeps.md.
"""

from kdjax import sweep


def get_config(arg=None):
    del arg
    c = sweep.defaults()
    c.study = "digits_kd"
    c.base = "experiments/configs/digits.py"
    c.overrides = {"dataset.val_size": 0.2}
    c.search_space = {
        "distill.temperature": {"kind": "float", "low": 1.0, "high": 8.0},
        "distill.kd.weight": {"kind": "float", "low": 0.1, "high": 0.99},
        "optimizer.learning_rate": {"kind": "float", "low": 1e-3, "high": 3e-2, "log": True},
    }
    c.objective = "student"
    c.sampler.name = "tpe"
    c.sampler.seed = 0
    c.n_trials = 20
    c.pruner.name = "median"
    c.pruner.n_startup_trials = 5
    c.pruner.n_warmup_steps = 20
    return c
