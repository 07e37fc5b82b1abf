"""Hyper-parameter search (kdjax/sweep.py, python -m experiments.sweep) on tiny digits runs:
outputs, best_config.py reproducing the best trial, teacher sharing, pruning, two workers of one
study, kill + rerun, and one-line errors for bad input."""

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from kdjax import sweep, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# teacher cnn_tiny 1 epoch, MLP student 2 epochs, on 80% of digits' training images
TINY = {"dataset.val_size": 0.2, "teacher.model": "cnn_tiny", "teacher.epochs": 1, "student.epochs": 2,
        "stages": "teacher,student,student_scratch", "throughput_batch": 16, "log_every_steps": 1000,
        "log.tensorboard": False, "log.progress": False}
# Trials run the stages up to the objective ('student'); best_config.py runs all three.
KD_SPACE = {"distill.temperature": {"kind": "float", "low": 1.0, "high": 8.0},
            "distill.kd.weight": {"kind": "float", "low": 0.1, "high": 0.99}}


def sweep_fields(**fields):
    out = {"study": "tiny", "base": "experiments/configs/digits.py", "overrides": dict(TINY),
           "search_space": KD_SPACE, "n_trials": 3}
    out.update(fields)
    return out


def sweep_config(**fields):
    c = sweep.defaults()
    for key, value in sweep_fields(**fields).items():
        node = c
        *path, last = key.split("__")
        for part in path:
            node = node[part]
        node[last] = value
    return c


def write_sweep_file(path, **fields):
    """A sweep config file for the CLI, holding `fields` ('sampler__name' sets c.sampler.name)."""
    lines = ["from kdjax import sweep", "", "", "def get_config(arg=None):", "    c = sweep.defaults()"]
    for key, value in sweep_fields(**fields).items():
        lines.append(f"    c.{key.replace('__', '.')} = {value!r}")
    lines.append("    return c")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def read_csv(workdir):
    with open(os.path.join(workdir, "trials.csv")) as f:
        return list(csv.DictReader(f))


def load_study(workdir, name="tiny"):
    import optuna

    return optuna.load_study(study_name=name, storage=sweep.make_storage(None, workdir))


def cli(*args, env=None):
    return subprocess.Popen([sys.executable, "-m", "experiments.sweep", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def one_device_env():
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")


# ----------------------------------------------------------------------------------------------
# No training


def test_teacher_relevant_fields_move_the_teacher(tmp_path):
    p = sweep.parse(sweep_config())
    _, _, base_teacher = p.configs({"distill.temperature": 4.0, "distill.kd.weight": 0.9}, str(tmp_path))
    student_side = {"distill.temperature": 2.0, "distill.kd.weight": 0.5, "student.learning_rate_scale": 2.0,
                    "student.epochs": 3, "distill.ce_weight": 0.3}
    teacher_side = {"optimizer.learning_rate": 0.01, "optimizer.name": "sgd", "optimizer.weight_decay": 1e-4,
                    "dataset.val_size": 0.3, "seed": 1, "batch_size": 32, "augment.flip": True, "dtype": "bfloat16",
                    "teacher.learning_rate_scale": 0.5, "teacher.epochs": 2, "loss.label_smoothing": 0.1,
                    "train.early_stop_patience": 3}
    for field, value in student_side.items():
        config, teacher, teacher_dir = p.configs({field: value}, str(tmp_path))
        assert teacher_dir == base_teacher, field
        assert config.teacher.checkpoint == teacher_dir and teacher.stages == "teacher"
    dirs = set()
    for field, value in teacher_side.items():
        _, teacher, teacher_dir = p.configs({field: value}, str(tmp_path))
        assert teacher_dir != base_teacher, field
        dirs.add(teacher_dir)
    assert len(dirs) == len(teacher_side)
    # teacher_sharing='base': one teacher whatever the trial changes
    p = sweep.parse(sweep_config(teacher_sharing="base"))
    assert p.configs({"optimizer.learning_rate": 0.01}, str(tmp_path))[2] == base_teacher


def test_a_teacher_from_weights_is_shared_once_fine_tuned_and_loaded_by_each_trial_when_imported(tmp_path):
    """No training: a teacher fine-tuned from teacher.weights (epochs > 0) is one shared teacher run
    that starts from them (the trials take it as teacher.checkpoint, without the weights); an
    imported teacher used as it is (epochs 0) has no run to share, so every trial loads the weights."""
    torchvision = pytest.importorskip("torchvision")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    weights = str(tmp_path / "teacher.safetensors")
    safetensors_torch.save_file({k: v.contiguous() for k, v in torchvision.models.resnet18().state_dict().items()}, weights)
    over = dict(TINY, **{"teacher.model": "resnet18_imagenet", "teacher.weights": weights})
    p = sweep.parse(sweep_config(overrides=over))
    config, teacher, teacher_dir = p.configs({"distill.temperature": 4.0}, str(tmp_path))
    assert teacher.teacher.weights == weights and teacher.stages == "teacher"
    assert config.teacher.checkpoint == teacher_dir and config.teacher.weights is None
    p = sweep.parse(sweep_config(overrides=dict(over, **{"teacher.epochs": 0})))
    config, teacher, teacher_dir = p.configs({"distill.temperature": 4.0}, str(tmp_path))
    assert teacher is None and teacher_dir is None and config.teacher.weights == weights and not config.teacher.checkpoint


def test_digits_kd_sweep_config():
    spec = importlib.util.spec_from_file_location("digits_kd", os.path.join(REPO, "experiments/configs/sweeps/digits_kd.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    p = sweep.parse(c)
    assert (p.study, p.objective, p.n_trials, p.sampler["name"], p.pruner["name"]) == ("digits_kd", "student", 20, "tpe", "median")
    assert p.base.dataset.val_size == 0.2 and p.base.teacher.model == "cnn_small" and p.base.student.model == "mlp"
    space = {q.field: q for q in p.params}
    assert (space["distill.temperature"].low, space["distill.temperature"].high) == (1.0, 8.0)
    assert (space["distill.kd.weight"].low, space["distill.kd.weight"].high) == (0.1, 0.99)
    lr = space["optimizer.learning_rate"]
    assert (lr.low, lr.high, lr.log) == (1e-3, 3e-2, True)
    assert "python -m experiments.sweep --config=experiments/configs/sweeps/digits_kd.py" in module.__doc__


# Every bad input: one line on stderr, exit status 2, nothing written. Each case runs the real
# entry point (experiments.sweep's main, absl flag parsing included) in a process forked from one
# that has imported it once, so the 13 cases cost one start-up; the first case is a plain subprocess.
BAD = {
    "unknown field": ({"search_space": {"distill.temprature": {"kind": "float", "low": 1.0, "high": 8.0}}},
                      "error: search space entry names a field that does not exist in the base config: distill.temprature"),
    "unknown override": ({"overrides": dict(TINY, **{"optimizer.lr": 0.1})},
                         "error: sweep override names a field that does not exist in the base config: optimizer.lr"),
    "empty space": ({"search_space": {}}, "error: the search space is empty"),
    "low >= high": ({"search_space": {"distill.temperature": {"kind": "float", "low": 8.0, "high": 1.0}}},
                    "error: search space entry distill.temperature: low must be < high, got low=8.0 >= high=1.0"),
    "log with low <= 0": ({"search_space": {"optimizer.learning_rate": {"kind": "float", "low": 0.0, "high": 0.1, "log": True}}},
                          "error: search space entry optimizer.learning_rate: a log scale needs low > 0, got low=0.0"),
    "empty choices": ({"search_space": {"optimizer.name": {"kind": "categorical", "choices": []}}},
                      "error: search space entry optimizer.name: categorical needs a non-empty list of choices"),
    "unknown kind": ({"search_space": {"distill.temperature": {"kind": "uniform", "low": 1.0, "high": 8.0}}},
                     "error: search space entry distill.temperature: unknown kind 'uniform'; choose one of: float, int, categorical"),
    "bad choice": ({"search_space": {"optimizer.name": {"kind": "categorical", "choices": ["adam", "adamax"]}}},
                   "error: search space entry optimizer.name='adamax' cannot run: unknown optimizer 'adamax'"),
    "objective not run": ({"objective": "qat"}, "error: objective stage 'qat' is not run by the base config (its "
                          "stages: teacher, student, student_scratch)"),
    "no validation split": ({"overrides": dict(TINY, **{"dataset.val_size": 0.0})},
                            "error: the sweep needs a validation split to select trials on (the test set never drives a search)"),
    "unknown sampler": ({"sampler__name": "cmaes"}, "error: unknown sampler 'cmaes'; choose one of: grid, random, tpe"),
    "unknown pruner": ({"pruner__name": "asha"}, "error: unknown pruner 'asha'; choose one of: none, median, hyperband"),
    "grid without values": ({"sampler__name": "grid"},
                            "error: the grid sampler needs a finite set of values: give distill.temperature a step"),
}
FORKED_CLI = r"""
import json, os, sys
import experiments.sweep as cli
import kdjax.train  # the heavy imports, once; the children initialise JAX themselves
out = {}
for name, argv in json.loads(sys.argv[1]).items():
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r); os.dup2(w, 1); os.dup2(w, 2)
        sys.argv = ["experiments/sweep.py", *argv]
        try:
            cli.main()
        except SystemExit as e:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(e.code if isinstance(e.code, int) else 1)
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    out[name] = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), text]
print(json.dumps(out))
"""


def test_bad_input_is_one_line_and_exit_2_via_the_cli(tmp_path):
    argvs, expected = {}, {}
    for i, (name, (fields, message)) in enumerate(sorted(BAD.items())):
        argvs[name] = [f"--config={write_sweep_file(tmp_path / f'case{i}.py', **fields)}", f"--workdir={tmp_path / f'wd{i}'}"]
        expected[name] = message
    argvs["missing config file"] = ["--config=experiments/configs/sweeps/nope.py", f"--workdir={tmp_path / 'wdx'}"]
    expected["missing config file"] = ("error: sweep config file experiments/configs/sweeps/nope.py not found; "
                                       "sweep configs live in experiments/configs/sweeps/: digits_kd.py")
    argvs["bad storage"] = [f"--config={write_sweep_file(tmp_path / 'good.py')}", f"--workdir={tmp_path / 'wdy'}",
                            "--storage=/tmp/x.db"]
    expected["bad storage"] = "error: --storage='/tmp/x.db': give an RDB URL such as sqlite:///sweep.db"
    first = sorted(argvs)[0]
    proc = cli(*argvs.pop(first))
    results = {first: [proc.wait(), proc.stdout.read()]}
    forked = subprocess.run([sys.executable, "-c", FORKED_CLI, json.dumps(argvs)], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert forked.returncode == 0, forked.stderr[-2000:]
    results.update(json.loads(forked.stdout.strip().splitlines()[-1]))
    for name, (code, text) in results.items():
        lines = [line for line in text.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith(expected[name]), (name, code, text[-1500:])
    assert not [n for n in os.listdir(tmp_path) if n.startswith("wd")]  # nothing written


def test_a_changed_sweep_in_the_same_folder_is_refused(tmp_path):
    workdir = str(tmp_path / "sw")
    os.makedirs(workdir)
    p = sweep.parse(sweep_config())
    with open(os.path.join(workdir, "sweep.json"), "w") as f:
        json.dump({"setup": json.loads(json.dumps(p.setup(), default=str)), "n_trials": 3}, f)
    sweep.check_workdir(sweep.parse(sweep_config(n_trials=5)), workdir)  # more trials: fine
    with pytest.raises(ValueError, match=r"holds a sweep with another setup \(differs in: search_space"):
        sweep.check_workdir(sweep.parse(sweep_config(search_space={"distill.temperature": KD_SPACE["distill.temperature"]})), workdir)


# ----------------------------------------------------------------------------------------------
# Sweeps that train


@pytest.fixture(scope="module")
def kd_sweep(tmp_path_factory):
    """3 TPE trials over temperature and KD weight (nothing the teacher reads), in process."""
    workdir = str(tmp_path_factory.mktemp("kd") / "sweep")
    best = sweep.run(sweep_config(), workdir)
    return workdir, best


def test_sweep_writes_its_outputs(kd_sweep):
    workdir, best = kd_sweep
    rows = read_csv(workdir)
    assert [r["number"] for r in rows] == ["0", "1", "2"] and {r["state"] for r in rows} == {"COMPLETE"}
    assert set(KD_SPACE) <= set(rows[0]) and {"value", "run_dir", "duration_s"} <= set(rows[0])
    assert [r["run_dir"] for r in rows] == ["trials/0", "trials/1", "trials/2"]
    with open(os.path.join(workdir, "best.json")) as f:
        saved = json.load(f)
    values = [float(r["value"]) for r in rows]
    assert saved["val_accuracy"] == max(values) and saved["best_trial"] == values.index(max(values))
    assert saved["finished"] and saved["trials"] == {"COMPLETE": 3}
    run_summary = json.load(open(os.path.join(workdir, f"trials/{saved['best_trial']}/summary.json")))["student"]
    assert saved["val_accuracy"] == run_summary["selected_val_accuracy"]
    assert saved["test_accuracy_of_best_trial"] == run_summary["selected_test_accuracy"]
    assert "TEST accuracy" in saved["test_accuracy_note"]
    for png in ("history.png", "importances.png", "slice.png", "parallel_coordinate.png", "intermediate.png"):
        assert os.path.getsize(os.path.join(workdir, png)) > 1000, png
    assert best["best_trial"] == saved["best_trial"]
    assert set(saved["param_importances"]) == set(KD_SPACE)


def test_the_teacher_is_trained_once_and_shared(kd_sweep):
    workdir, _ = kd_sweep
    teachers = [n for n in os.listdir(workdir) if n.startswith("teacher-")]
    assert len(teachers) == 1
    teacher_dir = os.path.join(workdir, teachers[0])
    with open(os.path.join(teacher_dir, "metrics.jsonl")) as f:
        evals = [json.loads(line) for line in f if '"eval"' in line]
    assert [r["epoch"] for r in evals if r["role"] == "teacher"] == [1]  # one epoch, trained once
    for n in range(3):
        trial = os.path.join(workdir, "trials", str(n))
        assert json.load(open(os.path.join(trial, "config.json")))["teacher"]["checkpoint"] == os.path.abspath(teacher_dir)
        assert not os.path.exists(os.path.join(trial, "teacher"))  # loaded, not trained
        assert not os.path.exists(os.path.join(trial, "student_scratch"))  # after the objective: not run
        assert json.load(open(os.path.join(trial, "summary.json")))["teacher"]["reused_from"] == os.path.abspath(teacher_dir)


def test_best_config_reruns_to_the_same_validation_accuracy(kd_sweep, tmp_path):
    workdir, best = kd_sweep
    spec = importlib.util.spec_from_file_location("best_config", os.path.join(workdir, "best_config.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    assert config.teacher.checkpoint == os.path.abspath(best["teacher_dir"])
    summary = train.run(config, str(tmp_path / "rerun"))
    assert summary["student"]["selected_val_accuracy"] == best["val_accuracy"]
    assert "student_scratch" in summary  # the base config's stages: the comparison table is complete
    assert summary["student"]["selected_epoch"] == best["selected_epoch"]


def test_own_teacher_per_trial_and_the_pruner_stops_a_hopeless_trial(tmp_path):
    """optimizer.learning_rate reaches the teacher, so each trial trains its own; the second trial's
    absurd rate (1e-7) leaves its student at chance and the median pruner stops it after epoch 1."""
    workdir = str(tmp_path / "sw")
    best = sweep.run(sweep_config(
        study="lr", n_trials=2, search_space={"optimizer.learning_rate": {"kind": "float", "low": 1e-7, "high": 3e-2, "log": True}},
        enqueue=({"optimizer.learning_rate": 3e-3}, {"optimizer.learning_rate": 1e-7}),
        pruner__n_startup_trials=1), workdir)
    rows = read_csv(workdir)
    assert [r["state"] for r in rows] == ["COMPLETE", "PRUNED"] and rows[1]["note"] == "pruned after epoch 1"
    assert len({r["teacher_dir"] for r in rows}) == 2
    assert len([n for n in os.listdir(workdir) if n.startswith("teacher-")]) == 2
    assert not os.path.exists(os.path.join(workdir, "trials/1/student/result.json"))  # stopped: 1 of 2 epochs
    assert best["best_trial"] == 0 and best["params"] == {"optimizer.learning_rate": 3e-3}
    assert not os.path.exists(os.path.join(workdir, "importances.png"))  # one searched field: skipped


def test_two_workers_share_one_study_and_run_exactly_n_trials(tmp_path):
    config = write_sweep_file(tmp_path / "two.py", study="two", n_trials=3, plots=False)
    workdir = str(tmp_path / "sw")
    procs = [cli(f"--config={config}", f"--workdir={workdir}", env=one_device_env()) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-2000:] for o in outputs]
    trials = load_study(workdir, "two").get_trials()
    assert len(trials) == 3 and {t.state.name for t in trials} == {"COMPLETE"}
    assert sorted(os.listdir(os.path.join(workdir, "trials"))) == ["0", "1", "2"]
    pids = {t.user_attrs["kdjax_worker"]["pid"] for t in trials}
    assert pids == {p.pid for p in procs}  # both workers ran trials
    assert len([n for n in os.listdir(workdir) if n.startswith("teacher-")]) == 1
    assert "sweep two: 3 trials, states complete 3" in outputs[0] + outputs[1]


def test_killed_sweep_reruns_to_n_trials_resuming_the_interrupted_trial(tmp_path):
    config = write_sweep_file(tmp_path / "kill.py", study="kill", n_trials=2,
                              overrides=dict(TINY, **{"student.epochs": 8}), pruner__name="none", plots=False)
    workdir = str(tmp_path / "sw")
    proc = cli(f"--config={config}", f"--workdir={workdir}", env=one_device_env())
    checkpoints = os.path.join(workdir, "trials", "1", "student", "checkpoints")
    deadline = time.time() + 300
    while not (os.path.isdir(checkpoints) and any(d.isdigit() for d in os.listdir(checkpoints))):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first_summary = os.path.join(workdir, "trials", "0", "summary.json")
    stamp = os.stat(first_summary).st_mtime_ns
    killed_at = max(int(d) for d in os.listdir(checkpoints) if d.isdigit())

    rerun = cli(f"--config={config}", f"--workdir={workdir}", env=one_device_env())
    out = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, out[-3000:]
    assert "trial 1 was interrupted (its worker (pid" in out
    assert "resuming stage 'student' from step" in out and "trials/1" in out
    trials = load_study(workdir, "kill").get_trials()
    states = [(t.number, t.state.name, t.user_attrs.get("run_dir")) for t in trials]
    # trial 2 is the retry of trial 1: same parameters, resumed in trials/1
    assert states == [(0, "COMPLETE", "trials/0"), (1, "FAIL", "trials/1"), (2, "COMPLETE", "trials/1")]
    assert os.stat(first_summary).st_mtime_ns == stamp  # a finished trial is kept as it was
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == 1)
    assert retry.params == trials[1].params
    result = json.load(open(os.path.join(workdir, "trials", "1", "student", "result.json")))
    assert result["epochs"] == 8 and killed_at < result["steps"]
    assert not [n for n in os.listdir(os.path.join(workdir, "trials")) if "replaced" in n]
    assert json.load(open(os.path.join(workdir, "best.json")))["trials"] == {"COMPLETE": 2}


def test_cross_validated_trials_report_every_fold(tmp_path):
    """dataset.folds=2: the objective is the mean over folds of the student's selected validation
    accuracy, each fold trains its own teacher inside the trial, and the pruner sees fold f's
    epoch e as step f * epochs + e."""
    overrides = dict(TINY, **{"dataset.val_size": 0.0, "dataset.folds": 2})
    workdir = str(tmp_path / "sw")
    sweep.run(sweep_config(study="cv", n_trials=1, overrides=overrides, plots=False), workdir)
    (trial,) = load_study(workdir, "cv").get_trials()
    cv = json.load(open(os.path.join(workdir, "trials", "0", "cv.json")))["student"]
    assert trial.value == cv["selected_val_accuracy"] and len(cv["selected_val_accuracy_per_fold"]) == 2
    assert sorted(trial.intermediate_values) == [1, 2, 3, 4]
    assert trial.intermediate_values[2] == cv["selected_val_accuracy_per_fold"][0]
    assert trial.intermediate_values[4] == cv["selected_val_accuracy_per_fold"][1]
    assert os.path.exists(os.path.join(workdir, "trials", "0", "fold1", "teacher", "result.json"))
    assert not [n for n in os.listdir(workdir) if n.startswith("teacher-")]


def test_interrupted_trials_are_retried_and_live_ones_left_alone(tmp_path):
    """No training: RUNNING trials whose worker is gone (a dead pid here; no heartbeat elsewhere)
    and FAIL trials marked interrupted (SIGTERM) get exactly one retry with the same parameters,
    which names the original trial (so it resumes trials/<original>); live trials are untouched."""
    import optuna

    p = sweep.parse(sweep_config(max_retries=2, stale_after_minutes=1.0))
    workdir = str(tmp_path)
    study = optuna.create_study(study_name="r", storage=sweep.make_storage(None, workdir), direction="maximize")
    dead = subprocess.Popen(["true"])
    dead.wait()
    me = sweep.this_worker()
    elsewhere = dict(me, ns="another-machine")
    workers = {"dead": dict(me, pid=dead.pid), "alive": me, "silent elsewhere": elsewhere, "beating elsewhere": elsewhere}
    trials = {}
    for name, worker in workers.items():
        t = study.ask({"distill.temperature": optuna.distributions.FloatDistribution(1.0, 8.0)})
        t.set_user_attr("kdjax_worker", worker)
        trials[name] = t
    os.makedirs(os.path.join(workdir, "heartbeats"))
    for name, age in (("silent elsewhere", 120), ("beating elsewhere", 0)):
        path = os.path.join(workdir, "heartbeats", str(trials[name].number))
        open(path, "w").close()
        os.utime(path, (time.time() - age, time.time() - age))
    preempted = study.ask({"distill.temperature": optuna.distributions.FloatDistribution(1.0, 8.0)})
    preempted.set_user_attr("interrupted", "stage 'student' stopped by SIGTERM at step 6")
    study.tell(preempted, state=optuna.trial.TrialState.FAIL)
    for _ in range(2):  # a second pass retries nothing more
        sweep.retry_interrupted(p, workdir, study)
    by_number = {t.number: t for t in study.get_trials()}
    retries = {t.system_attrs["failed_trial"]: t for t in by_number.values() if t.state.name == "WAITING"}
    expected = {trials["dead"].number, trials["silent elsewhere"].number, preempted.number}
    assert set(retries) == expected
    for n in expected:
        assert by_number[n].state.name == "FAIL" and retries[n].params == by_number[n].params
    for name in ("alive", "beating elsewhere"):
        assert by_number[trials[name].number].state.name == "RUNNING"
    assert sweep.progress(p, study)["counted"] == 5  # 8 trials, 3 of them replaced by their retries
    # A retry interrupted in turn is retried again, up to max_retries=2 times in all.
    study = optuna.create_study(study_name="r2", storage=sweep.make_storage(None, workdir), direction="maximize")
    study.enqueue_trial({"distill.temperature": 2.0})
    for attempt in range(3):
        t = study.ask()  # the original, then its retries (each waiting in turn)
        assert t.suggest_float("distill.temperature", 1.0, 8.0) == 2.0
        t.set_user_attr("interrupted", "SIGTERM")
        study.tell(t, state=optuna.trial.TrialState.FAIL)
        sweep.retry_interrupted(p, workdir, study)
    chain = study.get_trials()
    assert [t.state.name for t in chain] == ["FAIL"] * 3
    assert [t.system_attrs.get("retry_history") for t in chain] == [None, [0], [0, 1]]
    assert {sweep.root_number(t) for t in chain} == {0}  # every attempt resumes trials/0
