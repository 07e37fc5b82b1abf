"""Bad input gets one clear line (what was wrong, what is allowed) and nothing saved is lost.

Each case goes through `kdjax.train.run`, whose ValueErrors the entry points print as one line
with exit status 2 (`test_cli_bad_input_is_one_line` checks that path through the real CLI).
"""

import json
import os
import subprocess
import sys

import pytest

from kdjax import train
from tests.test_train import REPO, tiny_digits_config

CASES = {
    "unknown model": ({"teacher.model": "resnet9"}, "unknown model 'resnet9'; choose one of: cnn_small"),
    "unknown method": ({"distill.method": "fitnett"}, "unknown distillation method 'fitnett'; choose one of:"),
    "unknown optimizer": ({"optimizer.name": "adamax"}, "unknown optimizer 'adamax'; choose one of: adadelta"),
    "unknown schedule": ({"optimizer.schedule": "poly"}, "unknown schedule 'poly'; choose one of:"),
    "unknown data set": ({"dataset.name": "imagenet"}, "unknown data set 'imagenet'; choose one of: digits"),
    "missing feature": ({"distill.method": "at"}, "reads student feature 'stage*', which the student model does "
                        "not have; it has: embedding, hidden1, logits"),
    "two-stage method without its init stage": ({"distill.method": "fsp", "student.model": "cnn_tiny"},
                                                "distillation term 'fsp' is trained only in stage 'student_init'"),
    "channel-wise method, unequal widths": ({"distill.method": "kdsvd", "student.model": "cnn_tiny",
                                             "teacher.model": "cnn_small"},
                                            "kdsvd: student_feats[0] has 16 channels and teacher_feats[0] 32"),
    "negative temperature": ({"distill.temperature": -1.0}, "distill.temperature must be > 0"),
    "bad sdd scales": ({"distill.method": "sdd", "distill.sdd.scales": (1, 0)},
                       "distill.sdd.scales must be positive integers, e.g. (1, 2, 4), got (1, 0)"),
    "zero batch size": ({"batch_size": 0}, "config.batch_size must be a positive integer, got 0"),
    "batch vs devices": ({"batch_size": 63}, "config.batch_size=63 is not divisible by the 2 devices"),
    "unknown stage": ({"stages": "teacher,studnet"}, "unknown stage 'studnet'"),
    "bad optimizer field": ({"optimizer.b2": 1.0}, "b2 must be in [0, 1), got 1.0"),
    # Options that would be silently ignored are refused (issue 8.4):
    "mixup and cutmix": ({"augment.mixup_alpha": 0.2, "augment.cutmix_alpha": 1.0},
                         "config.augment.mixup_alpha=0.2 and cutmix_alpha=1.0 are both > 0, but each batch gets "
                         "mixup or cutmix, not both (cutmix would be ignored): set one to 0"),
    "ema teacher and checkpoint": ({"stages": "student", "teacher.source": "ema", "teacher.checkpoint": "runs/t"},
                                   "config.teacher.source='ema' (Mean Teacher) makes the student's moving average "
                                   "the teacher, so config.teacher.checkpoint would be ignored: unset one of the two"),
    "ema teacher and ensemble": ({"stages": "student", "teacher.source": "ema", "teacher.ensemble": "runs/a,runs/b"},
                                 "so config.teacher.ensemble would be ignored: unset one of the two"),
    "mlkd without two views": ({"distill.method": "mlkd"},
                               "distill.method=mlkd needs two augmented views: set --config.augment.views=weak,strong"),
    "two views nobody reads": ({"augment.views": "weak,strong"},
                               "config.augment.views=weak,strong: no distillation term reads the strong view"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config_value(case, tmp_path):
    overrides, message = CASES[case]
    with pytest.raises(ValueError) as err:
        train.run(tiny_digits_config(**overrides), str(tmp_path / "run"))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_shapes_a_method_cannot_reconcile(tmp_path):
    config = tiny_digits_config(**{"student.model": "cnn_tiny"})
    # A raw FitNet hint with no regressor: student stage2 has 32 channels, the teacher's 16 ... 64.
    config.teacher.model = "cnn_small"
    config.distill.terms.raw_hint = {"loss": "fitnet", "weight": 1.0, "student": "stage2", "teacher": "stage2"}
    with pytest.raises(ValueError, match=r"fitnet: .*same shape"):
        train.run(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "teacher")  # refused before any training


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("teacher"))
    train.run(tiny_digits_config(stages="teacher"), workdir)
    return workdir


def test_teacher_checkpoint_missing(tmp_path):
    with pytest.raises(ValueError, match="is not a kdjax run directory"):
        train.run(tiny_digits_config(stages="student", **{"teacher.checkpoint": str(tmp_path / "nope")}),
                  str(tmp_path / "run"))


def test_teacher_checkpoint_corrupt(tmp_path, teacher_run):
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", teacher_run, str(broken)], check=True)
    for root, _, files in os.walk(broken / "teacher" / "checkpoints"):
        for name in files:
            if "state" in root:
                with open(os.path.join(root, name), "r+b") as f:
                    f.truncate(0)
    with pytest.raises(ValueError, match="corrupt or incomplete"):
        train.run(tiny_digits_config(stages="student", **{"teacher.checkpoint": str(broken)}), str(tmp_path / "run"))


def test_teacher_checkpoint_of_another_architecture(tmp_path, teacher_run):
    other = tmp_path / "other"
    subprocess.run(["cp", "-r", teacher_run, str(other)], check=True)
    config_path = other / "config.json"
    saved = json.loads(config_path.read_text())
    saved["teacher"]["model"] = "cnn_small"  # the checkpoint holds a cnn_tiny
    config_path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="does not fit a cnn_small"):
        train.run(tiny_digits_config(stages="student", **{"teacher.checkpoint": str(other)}), str(tmp_path / "run"))


ENSEMBLE_CASES = {
    "feature method, no feature_source": ({"distill.method": "kd+rkd"},
                                          "term 'rkd' reads the teacher's embedding, but the teacher is an ensemble of 2 "
                                          "models: set config.teacher.feature_source to the index of the one"),
    "feature_source out of range": ({"distill.method": "kd+rkd", "teacher.feature_source": 2},
                                    "config.teacher.feature_source=2 is not a teacher index: there are 2 teacher(s), 0..1"),
    "ensemble_weights of another count": ({"teacher.ensemble_weights": "1,2,3"},
                                          "config.teacher.ensemble_weights has 3 weights for 2 teacher(s)"),
    "ensemble_weights not numbers": ({"teacher.ensemble_weights": "1,x"},
                                     "config.teacher.ensemble_weights='1,x': give comma-separated numbers"),
}


@pytest.mark.parametrize("case", sorted(ENSEMBLE_CASES))
def test_bad_ensemble_settings(case, tmp_path, teacher_run):
    """Two teachers (the same run twice, as checkpoint and as ensemble member): refused in one line
    before the workdir is touched."""
    overrides, message = ENSEMBLE_CASES[case]
    config = tiny_digits_config(stages="student", **{"teacher.checkpoint": teacher_run,
                                                     "teacher.ensemble": teacher_run, **overrides})
    with pytest.raises(ValueError) as err:
        train.run(config, str(tmp_path / "run"))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not os.path.exists(tmp_path / "run")


def test_workdir_of_another_config_is_kept_or_moved_aside(tmp_path, teacher_run):
    workdir = tmp_path / "run"
    subprocess.run(["cp", "-r", teacher_run, str(workdir)], check=True)
    before = sorted(os.listdir(workdir))
    other = tiny_digits_config(stages="teacher", seed=5)
    with pytest.raises(ValueError, match="different config .*seed.*--overwrite"):
        train.run(other, str(workdir))
    assert sorted(os.listdir(workdir)) == before
    train.run(other, str(workdir), overwrite=True)
    aside = [p for p in os.listdir(tmp_path) if p.startswith("run.replaced-")]
    assert len(aside) == 1 and sorted(os.listdir(tmp_path / aside[0])) == before


@pytest.mark.parametrize("args, message", [
    (["--config.teacher.model=resnet9"], "error: unknown model 'resnet9'"),
    (["--config.no_such_field=1"], "error: --config override names a field that does not exist"),
    (["--config.augment.mixup_alpha=0.2", "--config.augment.cutmix_alpha=1.0"],
     "error: config.augment.mixup_alpha=0.2 and cutmix_alpha=1.0 are both > 0"),
    (["--config=experiments/configs/digits.py:methd=at"],
     "error: config file experiments/configs/digits.py: ValueError: unknown config argument 'methd'"),
])
def test_cli_bad_input_is_one_line(args, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.digits", f"--workdir={tmp_path / 'run'}", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), proc.stderr[-2000:]


CONFIG_FILE_CASES = {
    "missing": (None, "error: config file {path} not found; configs live in experiments/configs/: "
                      "cifar100_resnet32x4_deit_tiny.py, cifar100_resnet32x4_mobilenetv2_half.py, "),
    "raises on import": ("import no_such_module_kdjax\n",
                         "error: config file {path}: ModuleNotFoundError: No module named 'no_such_module_kdjax'"),
    "get_config raises": ("def get_config(arg=None):\n    raise KeyError('student')\n",
                          "error: config file {path}: KeyError: 'student'"),
    "syntax error": ("def get_config(arg=None)\n", "error: config file {path}: SyntaxError: "),
    "no get_config": ("CONFIG = 1\n", "error: config file {path} defines no get_config(arg=None) function"),
}


@pytest.mark.parametrize("entry", ["experiments.digits", "experiments.cifar"])
@pytest.mark.parametrize("case", sorted(CONFIG_FILE_CASES))
def test_cli_config_file_that_cannot_load_is_one_line(entry, case, tmp_path):
    """A missing config file, or one that fails to load, gives one line naming the file and exit 2,
    for every entry point (they share experiments/launch.py)."""
    source, message = CONFIG_FILE_CASES[case]
    if source is None:
        path = "experiments/configs/nope.py"
    else:
        path = str(tmp_path / "bad_config.py")
        with open(path, "w") as f:
            f.write(source)
    proc = subprocess.run([sys.executable, "-m", entry, f"--config={path}:smoke", "--config.seed=1",
                           f"--workdir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message.format(path=path)), proc.stderr[-2000:]
    if source is None:  # every shipped config is listed
        shipped = sorted(n for n in os.listdir(os.path.join(REPO, "experiments", "configs"))
                         if n.endswith(".py") and not n.startswith(("_", "common")))
        assert lines[0].endswith(": " + ", ".join(shipped)) and "digits.py" in shipped
    assert not os.path.exists(tmp_path / "run")
