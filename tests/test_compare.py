"""experiments.compare (methods x seeds into one folder of runs) and experiments.table / kdjax.table
(the table read back from the run folders): the real commands on digits shrunk to one epoch per
stage, and the table's arithmetic on hand-made run folders."""

import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kdjax import table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.teacher.model=cnn_tiny", "--config.teacher.epochs=1", "--config.student.epochs=1",
        "--config.log_every_steps=1000", "--config.throughput_batch=16"]


def _cli(module, *args, cwd=REPO):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def _csv_rows(text):
    return {r["label"]: r for r in csv.DictReader(io.StringIO(text))}


def _num(cell):
    return None if cell == "" else float(cell)


def _result_mtimes(folder):
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(folder) for f in files if f == "result.json"}


def test_compare_digits_then_table(tmp_path):
    root = str(tmp_path / "runs")
    args = ["--config=experiments/configs/digits.py", "--methods=kd,at", "--seeds=0,1", f"--root={root}", *TINY]
    p = _cli("experiments.compare", *args)
    assert p.returncode == 0, p.stderr[-3000:]
    folder = os.path.join(root, "digits")
    labels = {"teacher": "teacher", "scratch": "student_scratch", "scratch-cnn_tiny": "student_scratch",
              "kd": "student", "at": "student"}
    assert sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))) == sorted(labels)
    summaries, configs = {}, {}
    for label, role in labels.items():
        for seed in (0, 1):
            run = os.path.join(folder, label, f"seed{seed}")
            summaries[label, seed] = json.load(open(os.path.join(run, "summary.json")))[role]
            configs[label, seed] = json.load(open(os.path.join(run, "config.json")))
            assert configs[label, seed]["seed"] == seed
    # each method gets the student its config intends; its baseline has that student, same seed
    assert {summaries["kd", s]["model"] for s in (0, 1)} == {"mlp"}
    assert {summaries["at", s]["model"] for s in (0, 1)} == {"cnn_tiny"}
    for s in (0, 1):
        assert configs["kd", s]["student"] == configs["scratch", s]["student"]
        assert configs["at", s]["student"] == configs["scratch-cnn_tiny", s]["student"]
        assert configs["at", s]["teacher"]["checkpoint"] == os.path.join(folder, "teacher", f"seed{s}")
        assert configs["at", s]["stages"] == "student" and configs["teacher", s]["stages"] == "teacher"

    out = str(tmp_path / "tbl" / "t")
    p = _cli("experiments.table", folder, f"--out={out}")
    assert p.returncode == 0, p.stderr[-3000:]
    md = open(out + ".md").read()
    assert md.strip() in p.stdout
    assert md.strip().splitlines()[-1] == f"Produced by: python -m experiments.table {folder} --out={out}"
    rows = _csv_rows(open(out + ".csv").read())
    assert set(rows) == set(labels)
    partner = {"kd": "scratch", "at": "scratch-cnn_tiny"}
    for label, row in rows.items():  # every figure against numpy on the runs' summary.json
        last = np.array([summaries[label, s]["test_accuracy"] for s in (0, 1)])
        best = np.array([summaries[label, s]["best_test_accuracy"] for s in (0, 1)])
        assert row["n"] == "2" and row["seeds"] == "0 1"
        assert _num(row["last_mean"]) == pytest.approx(last.mean(), abs=1e-12)
        assert _num(row["last_std"]) == pytest.approx(last.std(ddof=1), abs=1e-12)
        assert _num(row["best_mean"]) == pytest.approx(best.mean(), abs=1e-12)
        assert _num(row["best_std"]) == pytest.approx(best.std(ddof=1), abs=1e-12)
        assert row["params"] == str(summaries[label, 0]["num_params"])
        seconds = sum(summaries[label, s]["train_seconds_this_session"]
                      + (summaries[label, s].get("teacher_cache_seconds_this_session") or 0) for s in (0, 1))
        assert _num(row["train_seconds"]) == pytest.approx(seconds, abs=1e-9)
        assert f"{last.mean():.4f} ± {last.std(ddof=1):.4f}" in md
        if label in partner:
            d_last = last - np.array([summaries[partner[label], s]["test_accuracy"] for s in (0, 1)])
            d_best = best - np.array([summaries[partner[label], s]["best_test_accuracy"] for s in (0, 1)])
            assert row["paired_with"] == partner[label] and row["delta_seeds"] == "0 1"
            assert _num(row["delta_last_mean"]) == pytest.approx(d_last.mean(), abs=1e-12)
            assert _num(row["delta_last_std"]) == pytest.approx(d_last.std(ddof=1), abs=1e-12)
            assert _num(row["delta_best_mean"]) == pytest.approx(d_best.mean(), abs=1e-12)
            assert f"{d_last.mean():+.4f} ± {d_last.std(ddof=1):.4f}" in md
        else:
            assert row["delta_last_mean"] == "" and row["delta_n"] == "0"

    # the same command again trains nothing
    before = _result_mtimes(folder)
    p = _cli("experiments.compare", *args)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count(": already finished (") == 10 and "(0 trained, 10 already finished, 0 failed)" in p.stdout
    assert "training ->" not in p.stdout
    assert _result_mtimes(folder) == before

    # other overrides into the same folder: refused before anything trains
    p = _cli("experiments.compare", *args[:-1], "--config.log_every_steps=1000", "--config.student.epochs=2")
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0
    assert "holds a run of another config (differs in: student.epochs)" in p.stderr
    assert _result_mtimes(folder) == before


@pytest.mark.parametrize("args,message", [
    (["--config=experiments/configs/digits.py", "--methods=kd,kdd"], "unknown distillation method 'kdd'"),
    (["--config=experiments/configs/nope.py", "--methods=kd"], "config file experiments/configs/nope.py not found"),
    (["--config=experiments/configs/digits.py", "--methods=kd", "--seeds="], "no seeds"),
])
def test_compare_bad_input_one_line_exit_2(tmp_path, args, message):
    p = _cli("experiments.compare", *args, f"--root={tmp_path / 'runs'}")
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().count("\n") == 0 and message in p.stderr
    assert not os.path.exists(tmp_path / "runs")


def test_a_second_baseline_of_one_model_is_named_the_same_for_every_seed():
    """No training: at (cnn_tiny) and fsp (cnn_tiny widened to the teacher's widths) need two
    baselines of the same model; the second is named by its config, not by the seed, so each seed's
    run of it lands in one folder and the table pairs every seed (it used to get a name per seed,
    and a name that depended on which methods a command listed)."""
    from experiments import compare

    folder, runs = compare.plan("experiments/configs/digits.py", ["at", "fsp"], [0, 1], "/nonexistent", {})
    labels = {}
    for r in runs:
        labels.setdefault(r.label, []).append(r.seed)
    baselines = sorted(name for name in labels if name.startswith("scratch"))
    assert len(baselines) == 2 and baselines[0] == "scratch-cnn_tiny"
    assert baselines[1].startswith("scratch-cnn_tiny-") and labels[baselines[1]] == [0, 1]
    # nor by the other methods of the command: fsp alone gets the same folder
    _, alone = compare.plan("experiments/configs/digits.py", ["fsp"], [0], "/nonexistent", {})
    assert [r.label for r in alone if r.label.startswith("scratch")] == [baselines[1]]


def test_table_bad_input_one_line_exit_2(tmp_path):
    p = _cli("experiments.table", str(tmp_path / "nope"))
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "is not a folder" in p.stderr
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="no finished runs"):
        table.write(str(tmp_path / "empty"))


def _fake_run(root, label, seed, kind, last, best=None, student="mlp", params=100, seconds=1.0, finished=True):
    """A run folder as kdjax.train writes it, with only the fields kdjax.table reads."""
    stage = {"teacher": "teacher", "scratch": "student_scratch", "student": "student"}[kind]
    run = os.path.join(root, label, f"seed{seed}")
    os.makedirs(os.path.join(run, stage))
    config = {"seed": seed, "stages": stage, "student": {"model": student, "epochs": 5, "kwargs": {}}}
    json.dump(config, open(os.path.join(run, "config.json"), "w"))
    if not finished:
        return
    result = {"model": "cnn_small" if kind == "teacher" else student, "num_params": params,
              "test_accuracy": last, "best_test_accuracy": last if best is None else best,
              "train_seconds_this_session": seconds, "teacher_cache_seconds_this_session": None}
    json.dump({stage: result}, open(os.path.join(run, "summary.json"), "w"))
    json.dump(result, open(os.path.join(run, stage, "result.json"), "w"))


def test_table_pairs_same_seed_and_same_student(tmp_path):
    root = str(tmp_path)
    for s, acc in enumerate((0.99, 0.98, 0.97)):
        _fake_run(root, "teacher", s, "teacher", acc, params=5000)
    # baselines differ a lot between seeds; each kd seed is baseline + a small, varying gain
    scratch, gains = (0.90, 0.80, 0.70), (0.01, 0.03, 0.00)
    for s in range(3):
        _fake_run(root, "scratch", s, "scratch", scratch[s], best=scratch[s] + 0.05)
        _fake_run(root, "kd", s, "student", scratch[s] + gains[s], best=scratch[s] + 0.05 + 2 * gains[s])
        if s < 2:
            _fake_run(root, "scratch-cnn", s, "scratch", 0.5 + s / 10, student="cnn", params=300)
        _fake_run(root, "at", s, "student", 0.6 + s / 10, student="cnn", params=300)  # seed 2: no cnn baseline
    _fake_run(root, "dkd", 0, "student", 0.95)  # one seed only
    _fake_run(root, "dkd", 1, "student", 0.95, finished=False)  # unfinished: left out, listed
    md, md_path, csv_path = table.write(root, command="python -m experiments.table X")
    rows = _csv_rows(open(csv_path).read())

    kd = rows["kd"]
    assert _num(kd["delta_last_mean"]) == pytest.approx(np.mean(gains), abs=1e-12)
    assert _num(kd["delta_last_std"]) == pytest.approx(np.std(gains, ddof=1), abs=1e-12)
    assert _num(kd["delta_best_mean"]) == pytest.approx(np.mean(2 * np.array(gains)), abs=1e-12)
    # unpaired, the spread of the baselines (0.1 per seed) would swamp the gain
    assert _num(kd["delta_last_std"]) < 0.05 < np.std(np.array(scratch) + gains, ddof=1)
    at = rows["at"]
    assert at["paired_with"] == "scratch-cnn" and at["delta_seeds"] == "0 1" and at["n"] == "3"
    assert _num(at["delta_last_mean"]) == pytest.approx(0.1, abs=1e-12)
    assert _num(at["delta_last_std"]) == pytest.approx(0.0, abs=1e-12)
    assert rows["dkd"]["n"] == "1" and rows["dkd"]["last_std"] == ""
    assert _num(rows["dkd"]["delta_last_mean"]) == pytest.approx(0.05, abs=1e-12)
    assert _num(rows["teacher"]["train_seconds"]) == 3.0

    lines = md.splitlines()
    # teacher, then per student architecture: its baseline, then its methods by mean last-epoch accuracy
    order = [line.split(" | ")[0].lstrip("| ") for line in lines[2:8]]
    assert order == ["teacher", "from scratch", "`dkd`", "`kd`", "from scratch (scratch-cnn)", "`at`"]
    assert lines[8] == ""
    assert "| `dkd` | mlp | 0 | 0.9500 (n=1) |" in md
    assert "0,1,2 (Δ: 0,1)" in md
    assert "Not finished (left out): dkd/seed1" in md and lines[-1] == "Produced by: python -m experiments.table X"


def test_a_teacher_fine_tuned_from_weights_is_trained_once_and_an_imported_one_is_refused(tmp_path):
    """No training: with teacher.weights and teacher.epochs > 0 the teacher run starts from the
    weights and the method runs take that run as teacher.checkpoint (not the weights again); a
    teacher used as it is (epochs 0) has no run to share, and is refused in one line."""
    torchvision = pytest.importorskip("torchvision")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    from experiments import compare

    weights = str(tmp_path / "resnet18.safetensors")
    safetensors_torch.save_file({k: v.contiguous() for k, v in torchvision.models.resnet18().state_dict().items()}, weights)
    config = f"experiments/configs/folder_finetune.py:teacher_weights={weights}"
    _, runs = compare.plan(config, ["kd", "dkd"], [0], "/nonexistent", {})
    teacher = [r for r in runs if r.label == "teacher"]
    assert len(teacher) == 1 and teacher[0].config.teacher.weights == weights
    for r in runs:
        if r.label in ("kd", "dkd"):
            assert r.config.teacher.checkpoint == teacher[0].workdir and r.config.teacher.weights is None
    with pytest.raises(ValueError, match="teacher.weights with teacher.epochs=0 is an imported teacher") as e:
        compare.plan(config, ["kd"], [0], "/nonexistent", {"teacher.epochs": 0})
    assert "\n" not in str(e.value)
