"""The benchmark suite runs end to end and writes every field (tiny run; no timing assertions)."""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASE_FIELDS = {
    "case", "description", "kind", "pair", "teacher", "student", "cached_teacher", "data_shape", "num_classes",
    "batch", "dtype", "backend", "device_kind", "num_devices", "parallel", "jax_version", "augment", "optimizer",
    "params", "init_s", "compile_s", "flops_per_image", "flops_per_step", "images_per_s", "step_ms_median",
    "achieved_flops_per_s", "timing", "case_s",
}
STAT_FIELDS = {"median", "min", "max", "q25", "q75", "iqr", "n", "step_ms_median"}


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_suite_writes_every_field(tmp_path):
    out = tmp_path / "bench.json"
    # --compare-torch: kdjax's environment has no torch, so the suite must say it skipped the comparison
    # (where this interpreter does have torch, the PyTorch fields are checked instead).
    cmd = [sys.executable, "-m", "experiments.bench", "--suite", "--cases", "teacher_cnn_small,kd_mlp",
           "--steps", "2", "--warmup", "1", "--compare-torch", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "teacher_cnn_small" in proc.stdout and "kdjax/torch" in proc.stdout  # the printed table

    result = json.loads(out.read_text())
    env = result["environment"]
    for key in ("jax", "backend", "device_kind", "cpu_count", "xla_flags", "command"):
        assert key in env
    has_torch = "torch" in env
    if not has_torch:
        assert "skipped" in env["torch_note"]

    cases = {c["case"]: c for c in result["cases"]}
    assert list(cases) == ["teacher_cnn_small", "kd_mlp"]
    for name, c in cases.items():
        missing = CASE_FIELDS - set(c)
        assert not missing, (name, missing)
        assert c["backend"] == "cpu" and c["dtype"] == "float32" and c["kind"] == "train"
        assert c["batch"] == 128 and c["data_shape"] == [28, 28, 1]
        assert c["jax_version"] == env["jax"]
        for key in ("init_s", "compile_s", "flops_per_image", "flops_per_step", "achieved_flops_per_s",
                    "step_ms_median", "case_s"):
            assert _positive(c[key]), (name, key, c[key])
        assert math.isclose(c["flops_per_step"], c["flops_per_image"] * c["batch"])
        ips = c["images_per_s"]
        assert STAT_FIELDS <= set(ips)
        assert ips["n"] >= 2
        assert all(_positive(ips[k]) for k in ("median", "min", "max", "q25", "q75"))
        assert ips["min"] <= ips["q25"] <= ips["median"] <= ips["q75"] <= ips["max"]
        assert ips["iqr"] >= 0
        assert _positive(c["params"]["student"])
        if has_torch:
            t = c["torch"]
            assert t["params_match_kdjax"]
            assert _positive(t["images_per_s"]["median"]) and _positive(t["ratio_kdjax_over_torch"])
        else:
            assert "torch" not in c

    teacher, kd = cases["teacher_cnn_small"], cases["kd_mlp"]
    assert teacher["teacher"] is None and teacher["student"] == "cnn_small"
    assert teacher["optimizer"]["name"] == "adam"  # the Fashion-MNIST recipe's optimizer
    assert kd["cached_teacher"] and kd["pair"] == "cnn_small -> mlp"
    assert teacher["params"]["student"] == 65834 and kd["params"]["student"] == 25450
    # The conv teacher step does far more arithmetic per image than the MLP's (cached logits: no teacher).
    assert teacher["flops_per_image"] > 100 * kd["flops_per_image"]


def test_list_and_unknown_case():
    run = lambda *a: subprocess.run([sys.executable, "-m", "experiments.bench", *a], cwd=ROOT,  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    listed = run("--list")
    assert listed.returncode == 0
    for name in ("kd_r18_mnv2", "kd_r32x4_r8x4", "teacher_cnn_small", "kd_mlp", "eval_forward"):
        assert name in listed.stdout
    bad = run("--cases", "no_such_case")
    assert bad.returncode != 0 and "unknown case" in bad.stderr
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: unknown case(s) no_such_case")
    assert len([line for line in bad.stderr.splitlines() if not line[:1] in "IW"]) == 1  # one line, no usage dump
    model = run("--student", "no_such_model")
    assert model.returncode == 2 and "Traceback" not in model.stderr
    assert model.stderr.strip().splitlines()[-1].startswith("error: unknown model 'no_such_model'; choose one of:")


def test_input_pipeline_cases_run_and_refuse_too_many_workers(tmp_path):
    """--input_pipeline on a tiny generated folder (in TMPDIR): the JSON has a case per worker
    count with images/s and per-core figures (no torch here: --compare-torch is not given)."""
    env = dict(os.environ, TMPDIR=str(tmp_path))
    out = tmp_path / "input.json"
    cmd = [sys.executable, "-m", "experiments.bench", "--input_pipeline", "--input_images=12", "--input_size=16",
           "--input_workers=0", "--input_batch=4", "--input_batches=2", f"--out={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    (case,) = result["input_cases"]
    assert case["case"] == "input_rrc16_workers0" and case["kdjax"]["images_per_sec_median"] > 0
    assert case["decoder"].startswith("PIL") and result["images"] == 12
    assert os.path.isdir(tmp_path / "kdjax-bench-jpegs-12" / "train" / "class0")
    too_many = subprocess.run(cmd[:-1] + [f"--input_workers={os.cpu_count() + 1}"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
    assert too_many.returncode == 2 and "cores; choose 0" in too_many.stderr.strip().splitlines()[-1]
