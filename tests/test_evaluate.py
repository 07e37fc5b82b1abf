"""The evaluation report (kdjax.evaluate, python -m experiments.evaluate) on a tiny finished run
with a pruned variant: every accuracy-type figure recomputed with plain numpy from the
predictions.npz files, the plots, the CLI's bad input, and the definitions on hand-made logits."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kdjax import evaluate
from kdjax import train
from tests.test_train import REPO, tiny_digits_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished teacher/student/scratch run with one pruned variant, and its report."""
    workdir = str(tmp_path_factory.mktemp("evaluate") / "run")
    train.run(tiny_digits_config(stages="teacher,student,student_scratch"), workdir)
    variant = tiny_digits_config(stages="prune", **{
        "init.from_run": workdir, "init.role": "student", "init.stages": "prune", "teacher.checkpoint": workdir,
        "prune.epochs": 1, "prune.sparsity": 0.7})
    train.run(variant, os.path.join(workdir, "variants", "prune70"))
    report = evaluate.report(workdir, latency_calls=20)
    return workdir, report, json.load(open(os.path.join(workdir, "report.json")))


def _numpy_figures(logits, labels, teacher_logits):
    """Top-1, top-5, ECE (15 bins), macro-F1, confusion matrix and agreement, from scratch."""
    n, c = logits.shape
    preds = logits.argmax(1)
    top5 = np.mean([labels[i] in np.argsort(-logits[i])[:5] for i in range(n)])
    z = logits.astype(np.float64) - logits.max(1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    conf = probs.max(1)
    ece = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.mean() * abs(np.mean(preds[inside] == labels[inside]) - conf[inside].mean())
    cm = np.zeros((c, c), np.int64)
    np.add.at(cm, (labels, preds), 1)
    f1 = []
    for k in np.unique(labels):
        tp, fp, fn = cm[k, k], cm[:, k].sum() - cm[k, k], cm[k, :].sum() - cm[k, k]
        f1.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"top1": np.mean(preds == labels), "top5": top5, "ece": ece, "macro_f1": np.mean(f1), "cm": cm,
            "agreement": np.mean(preds == teacher_logits.argmax(1))}


def test_every_model_is_reported_and_matches_its_predictions(run):
    workdir, _, saved = run
    rows = {r["name"]: r for r in saved["models"]}
    assert list(rows) == ["teacher", "student", "student_scratch", "student-prune70"]
    assert saved["skipped"] == []
    teacher = np.load(os.path.join(workdir, "teacher", "predictions.npz"))
    for name, r in rows.items():
        assert r["logits_source"].endswith("predictions.npz"), name
        pred = np.load(os.path.join(workdir, r["logits_source"]))
        want = _numpy_figures(pred["logits"], pred["labels"], teacher["logits"])
        assert r["top1_accuracy"] == pytest.approx(want["top1"], abs=1e-12), name
        assert r["top5_accuracy"] == pytest.approx(want["top5"], abs=1e-12), name
        assert r["ece"] == pytest.approx(want["ece"], abs=1e-9), name
        assert r["macro"]["f1"] == pytest.approx(want["macro_f1"], abs=1e-12), name
        assert np.array_equal(np.array(r["confusion_matrix"]), want["cm"]), name
        assert r["teacher_agreement"] == pytest.approx(want["agreement"], abs=1e-12), name
        assert sum(b["count"] for b in r["reliability"]) == len(pred["labels"]) == r["num_examples"] == 360
        assert r["roc_auc_classes"] == "all 10 classes" and 0.5 < r["roc_auc_ovr_macro"] <= 1.0
        assert r["nll"] > 0 and r["kl_teacher_model"] >= 0
        assert r["params"] > 0 and r["flops_per_image"] > 0
        assert 0 < r["latency_ms_batch1"] and 0 < r["latency_ms_eval_batch"]
    assert rows["teacher"]["teacher_agreement"] == 1.0 and rows["teacher"]["kl_teacher_model"] == 0.0
    assert rows["teacher"]["flops_per_image"] > rows["student"]["flops_per_image"]
    # The selected model's accuracy as the trainer recorded it.
    assert rows["student"]["top1_accuracy"] == pytest.approx(
        json.load(open(os.path.join(workdir, "student", "result.json")))["selected_test_accuracy"])
    pruned = rows["student-prune70"]
    assert (pruned["stage"], pruned["folder"]) == ("prune", os.path.join("variants", "prune70"))
    assert pruned["nonzero_params"] < 0.6 * pruned["params"]
    assert saved["device"] and saved["eval_batch_size"] == tiny_digits_config().eval_batch_size
    assert rows["teacher"]["training_curves"]["eval"]["epoch"] == [1.0]
    assert rows["student-prune70"]["training_curves"]["eval"]["epoch"] == [1.0]


def test_markdown_and_plots(run):
    workdir, report, _ = run
    md = open(os.path.join(workdir, "report.md")).read()
    assert "| model | arch | params | non-zero | MFLOPs/img | top-1 | top-5 |" in md
    assert md.count("| student-prune70 |") == 1 and "predictions.npz" in md
    assert evaluate.main_table(report) in md
    import matplotlib.image

    files = [p for name, kinds in report["plots"].items() if name != "comparison" for p in kinds.values()]
    files.append(report["plots"]["comparison"])
    assert len(files) == 4 * 3 + 1  # confusion, reliability, curves per model; the comparison
    for rel in files:
        path = os.path.join(workdir, rel)
        assert os.path.getsize(path) > 10_000, rel
        pixels = matplotlib.image.imread(path)
        assert pixels.ndim == 3 and pixels[..., :3].std() > 0.05, rel  # not a blank canvas


def test_cli_refuses_a_folder_that_is_not_a_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.evaluate", f"--workdir={tmp_path}"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == f"error: {tmp_path} is not a kdjax run directory (no config.json)"
    assert not os.path.exists(tmp_path / "report.json")


def test_absent_class_and_few_classes():
    """4 classes, class 3 never in the labels: ROC-AUC over the 3 present classes, macro means over
    them, null recall for the absent class; top-5 is null with <= 5 classes."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=200)
    logits = rng.normal(size=(200, 4)).astype(np.float32)
    logits[np.arange(200), labels] += 1.5
    logits[:10, 3] += 5.0  # some predictions of the absent class
    m = evaluate.classification_metrics(logits, labels)
    probs = evaluate.softmax(logits)
    assert m["roc_auc_ovr_macro"] == pytest.approx(np.mean([roc_auc_score(labels == k, probs[:, k]) for k in range(3)]))
    assert m["roc_auc_classes"].startswith("the 3 of 4 classes")
    assert m["per_class"][3]["support"] == 0 and m["per_class"][3]["recall"] is None
    assert m["per_class"][3]["precision"] == 0.0  # predicted 10 times, never right
    assert m["top5_accuracy"] is None and m["teacher_agreement"] is None
    assert np.array(m["confusion_matrix"])[:, 3].sum() >= 10
    recalls = [m["per_class"][k]["recall"] for k in range(3)]
    assert m["macro"]["recall"] == pytest.approx(np.mean(recalls))
    one_class = evaluate.classification_metrics(logits, np.zeros(200, int))
    assert one_class["roc_auc_ovr_macro"] is None


def test_ece_and_kl_definitions():
    """ECE of a model that is always right with confidence 0.9 is 0.1, all in bin (13/15, 14/15];
    KL(p || p) = 0 and KL matches the closed form."""
    c = 10
    p_max = 0.9
    logits = np.full((30, c), np.log((1 - p_max) / (c - 1)))
    logits[:, 0] = np.log(p_max)
    ece, bins = evaluate.expected_calibration_error(evaluate.softmax(logits), np.zeros(30, int))
    assert ece == pytest.approx(0.1)
    assert bins[13]["count"] == 30 and bins[13]["accuracy"] == 1.0
    t = np.array([[2.0, 0.0, -1.0]])
    m = np.array([[0.0, 1.0, 0.0]])
    pt, pm = evaluate.softmax(t)[0], evaluate.softmax(m)[0]
    assert evaluate.kl_teacher_model(t, m) == pytest.approx(float(np.sum(pt * np.log(pt / pm))))
    assert evaluate.kl_teacher_model(t, t) == 0.0


def test_a_stage_without_predictions_is_recomputed_from_its_checkpoint(run, tmp_path):
    """Runs from before predictions.npz: the logits come from the checkpoint, and the report says so."""
    import shutil

    workdir, _, saved = run
    old = str(tmp_path / "old")
    shutil.copytree(workdir, old, ignore=shutil.ignore_patterns("variants", "report*"))
    os.remove(os.path.join(old, "student", "predictions.npz"))
    rows = {r["name"]: r for r in evaluate.report(old, latency_calls=20, plots=False)["models"]}
    before = {r["name"]: r for r in saved["models"]}
    assert rows["student"]["logits_source"].startswith("recomputed from the student checkpoint")
    assert rows["teacher"]["logits_source"] == os.path.join("teacher", "predictions.npz")
    for key in ("top1_accuracy", "teacher_agreement", "confusion_matrix"):
        assert rows["student"][key] == before["student"][key], key
    assert rows["student"]["nll"] == pytest.approx(before["student"]["nll"], rel=1e-5)
    assert "recomputed from the student checkpoint" in open(os.path.join(old, "report.md")).read()


def test_cli_reports_a_run(run):
    workdir, _, saved = run
    proc = subprocess.run([sys.executable, "-m", "experiments.evaluate", f"--workdir={workdir}",
                           "--latency_calls=20"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| student-prune70 | mlp |" in proc.stdout and "report.md" in proc.stdout
    again = json.load(open(os.path.join(workdir, "report.json")))
    assert [r["top1_accuracy"] for r in again["models"]] == [r["top1_accuracy"] for r in saved["models"]]
