"""experiments.compress end to end on digits with tiny epochs: every variant trained, exported,
measured and tabled; rerunning skips; the acceptance properties that hold at any accuracy."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments.configs import compress_digits
from kdjax import compress
from kdjax import config as kconfig
from tests.test_train import REPO


def tiny_compress_config():
    c = compress_digits.get_config()
    c.teacher.model = "cnn_tiny"
    c.teacher.epochs = 1
    c.student.epochs = 2
    c.student.kwargs.hidden = (256, 128)  # 51k parameters: int8 storage can show its 4x
    c.stages = "teacher,student"
    c.prune.epochs = 1
    c.quant.epochs = 1
    c.quant.calibration_batches = 2
    c.log_every_steps = 10
    c.throughput_batch = 16
    c.compress.latency_calls = 3
    c.compress.variants.prune90.prune.end_epoch = 0.5  # gradual, within the one epoch
    return c


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("compress"))
    report = compress.run(tiny_compress_config(), workdir)
    return workdir, {r["name"]: r for r in report["rows"]}


def test_every_row_is_measured_and_written(pipeline):
    workdir, rows = pipeline
    assert list(rows)[:5] == ["teacher", "student", "student-int8", "student-int8-static", "student-bf16"]
    assert sorted(list(rows)[5:]) == ["student-channel50", "student-nm24", "student-prune50", "student-prune70",
                                      "student-prune90", "student-qat"]
    for name, r in rows.items():
        for ext in ("jaxexport", "npz", "json"):
            assert os.path.getsize(os.path.join(workdir, "export", f"{name}.{ext}")) > 0
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["flops_per_image"] > 0
        assert r["latency_ms_batch1"] > 0 and r["latency_ms_batch256"] > 0
    assert rows["teacher"]["teacher_agreement"] == 1.0
    md = open(os.path.join(workdir, "compress.md")).read()
    assert md.count("| student-") == 9 and "Device: cpu" in md and "median of 3 calls" in md
    assert os.path.getsize(os.path.join(workdir, "compress.png")) > 10_000
    saved = json.load(open(os.path.join(workdir, "compress.json")))
    assert [r["name"] for r in saved["rows"]] == list(rows)


def test_pruned_and_quantised_artifacts_have_the_promised_structure(pipeline):
    workdir, rows = pipeline
    weights = lambda name: np.load(os.path.join(workdir, "export", f"{name}.npz"))  # noqa: E731
    for name, fraction in (("student-prune50", 0.5), ("student-prune70", 0.7), ("student-prune90", 0.9)):
        w = weights(name)
        for key in ("params/fc1/kernel", "params/fc2/kernel"):  # exact per layer (layer-wise threshold)
            assert abs(np.sum(w[key] == 0) - round(fraction * w[key].size)) <= 1, (name, key)
        assert np.count_nonzero(w["params/head/kernel"]) == w["params/head/kernel"].size  # never pruned
    nm = weights("student-nm24")
    for key in ("params/fc1/kernel", "params/fc2/kernel"):
        groups = np.moveaxis(nm[key], -2, -1).reshape(-1, 4)  # groups of 4 along the input dimension
        assert (np.count_nonzero(groups, axis=1) <= 2).all()
    assert rows["student-channel50"]["params"] <= 0.6 * rows["student"]["params"]
    int8 = weights("student-int8")
    assert int8["params/fc1/kernel.qvalue"].dtype == np.int8
    for name in ("student-int8", "student-int8-static", "student-qat"):
        assert rows[name]["artifact_bytes"] <= 0.3 * rows["student"]["artifact_bytes"], name
        assert rows[name]["weights_dtype"] == "int8"
    assert rows["student-bf16"]["weights_dtype"] == "bfloat16"


def test_the_table_matches_the_artifacts_and_the_runs(pipeline):
    workdir, rows = pipeline
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert rows["student"]["last_epoch_accuracy"] == summary["student"]["test_accuracy"]
    # The float student's artifact computes what its stage selected: the same test accuracy.
    assert rows["student"]["test_accuracy"] == pytest.approx(summary["student"]["selected_test_accuracy"])
    prune70 = json.load(open(os.path.join(workdir, "variants", "prune70", "summary.json")))["prune"]
    assert rows["student-prune70"]["test_accuracy"] == pytest.approx(prune70["selected_test_accuracy"])
    channel = json.load(open(os.path.join(workdir, "variants", "channel50", "prune", "model.json")))
    assert channel["kwargs"]["hidden"] == [128, 64]


def test_rerun_skips_everything_and_export_variant_matches(pipeline, tmp_path):
    workdir, rows = pipeline
    config = tiny_compress_config()
    out = subprocess.run(
        [sys.executable, "-m", "experiments.compress", f"--workdir={workdir}", "--config.teacher.model=cnn_tiny",
         "--config.teacher.epochs=1", "--config.student.epochs=2", "--config.student.kwargs.hidden=(256, 128)",
         "--config.stages=teacher,student", "--config.prune.epochs=1", "--config.quant.epochs=1",
         "--config.quant.calibration_batches=2", "--config.log_every_steps=10", "--config.throughput_batch=16",
         "--config.compress.latency_calls=3", "--config.compress.variants.prune90.prune.end_epoch=0.5"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert ": training " not in out.stderr and out.stderr.count("already finished") == 2 + len(config.compress.variants)
    assert "| student-channel50" in out.stdout
    exported = subprocess.run([sys.executable, "-m", "experiments.export", f"--workdir={workdir}", "--model=student",
                               "--variant=int8", f"--out={tmp_path}"], cwd=REPO, capture_output=True, text=True,
                              timeout=300)
    assert exported.returncode == 0, exported.stderr[-2000:]
    a = np.load(tmp_path / "student-int8.npz")
    b = np.load(os.path.join(workdir, "export", "student-int8.npz"))
    assert sorted(a.files) == sorted(b.files) and all(np.array_equal(a[k], b[k]) for k in a.files)
    meta = json.load(open(tmp_path / "student-int8.json"))
    assert meta["test_accuracy"] == pytest.approx(rows["student-int8"]["test_accuracy"])
    bad = subprocess.run([sys.executable, "-m", "experiments.export", f"--workdir={workdir}", "--variant=nope"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown --variant 'nope'" in bad.stderr and "Traceback" not in bad.stderr


def test_a_conv_student_in_weights_mode_is_refused_naming_the_layer(tmp_path):
    c = tiny_compress_config()
    c.student.model = "cnn_tiny"
    c.student.kwargs = {}
    c.compress.variants = {"qat": {"stage": "qat", "quant": {"mode": "weights"}}}
    with pytest.raises(ValueError, match="conv1_0"):
        compress.run(c, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")  # refused before anything was written


def test_an_option_no_part_of_the_command_reads_is_refused(tmp_path):
    """Every pruning variant sets or ignores prune.sparsity, so `--config.prune.sparsity` would be
    accepted and ignored: one line naming where it belongs, exit 2, nothing written."""
    unread = compress.unread_fields(compress_digits.get_config())
    assert {"prune.sparsity", "prune.method", "quant.mode"} <= set(unread)
    assert "prune.epochs" not in unread and "quant.calibration_batches" not in unread  # read by every variant / row
    c = compress_digits.get_config()
    c.compress.variants = {"qat": {"stage": "qat"}}  # no pruning variant: nothing reads prune.*
    assert "no variant of config.compress.variants has stage 'prune'" in compress.unread_fields(c)["prune.epochs"]
    with pytest.raises(ValueError, match=r"--config.prune.sparsity is not read by experiments.compress: every "
                                         r"'prune' variant sets its own prune.sparsity or ignores it; set it in a "
                                         r"variant, e.g. --config.compress.variants.\w+.prune.sparsity="):
        compress.check_overrides(compress_digits.get_config(), {"prune.sparsity": 0.5})
    proc = subprocess.run([sys.executable, "-m", "experiments.compress", f"--workdir={tmp_path / 'run'}",
                           "--config.prune.sparsity=1.5"], cwd=REPO, capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(errors) == 1 and "--config.prune.sparsity is not read" in errors[0]
    assert not os.path.exists(tmp_path / "run")


def test_an_impossible_value_is_refused_even_where_no_stage_reads_it():
    c = compress_digits.get_config()
    c.prune.sparsity = 1.5  # no stage of the experiment itself prunes
    with pytest.raises(ValueError, match=r"prune.sparsity must be in \[0, 1\), got 1.5"):
        kconfig.validate(compress.experiment_config(c))
    c = compress_digits.get_config()
    c.prune.n, c.prune.m = 4, 2
    with pytest.raises(ValueError, match="0 < n < m"):
        kconfig.validate(compress.experiment_config(c))
