"""Where the numbers go: TensorBoard event files hold every scalar of metrics.jsonl; without a
terminal a plain progress line replaces the bar; the default output is short; W&B without wandb
is one line."""

import glob
import json
import os
import struct
import subprocess
import sys

import pytest

from kdjax import train
from tests.test_train import REPO, tiny_digits_config


def read_scalars(folder: str) -> dict[tuple[str, int], float]:
    """(tag, step) -> value from every tensorboardX event file in `folder` (TFRecord framing:
    uint64 length, uint32 crc, payload, uint32 crc)."""
    from tensorboardX.proto import event_pb2

    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out[(value.tag, event.step)] = value.simple_value
    return out


def test_tensorboard_holds_the_scalars_of_metrics_jsonl(tmp_path):
    workdir = str(tmp_path / "run")
    train.run(tiny_digits_config(**{"log_every_steps": 5}), workdir)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    for role in ("teacher", "student"):
        scalars = read_scalars(os.path.join(workdir, "tensorboard", role))
        mine = [r for r in rows if r["role"] == role]
        assert mine
        for r in mine:
            for key, value in r.items():
                if key in ("role", "kind", "step", "epoch"):
                    continue
                assert scalars[(f"{r['kind']}/{key}", r["step"])] == pytest.approx(value, rel=1e-6, abs=1e-6)
        assert any(tag == "train/images_per_sec" for tag, _ in scalars)


def test_default_output_is_short_and_progress_lines_replace_the_bar(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "experiments.digits", f"--workdir={tmp_path / 'run'}", "--config.teacher.model=cnn_tiny",
         "--config.teacher.epochs=2", "--config.student.epochs=2", "--config.stages=teacher,student",
         "--config.log_every_steps=1", "--config.log.progress_seconds=0", "--config.throughput_batch=16"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "train step" not in out.stderr and "eval step" not in out.stderr  # detail: --verbosity=1
    assert "[teacher] epoch 2/2, step 44/44, loss" in out.stderr  # stderr is not a terminal: plain lines
    assert "[student] done: test accuracy" in out.stderr
    assert out.stderr.count("\n") < 150


def test_wandb_without_the_package_is_one_line(tmp_path):
    pytest.importorskip("absl")
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    with pytest.raises(ValueError, match=r"config.log.wandb=True needs the wandb package: pip install wandb"):
        train.run(tiny_digits_config(**{"log.wandb": True}), str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")
