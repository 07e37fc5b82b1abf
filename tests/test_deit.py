"""DeiT distillation end to end: a distilled ViT student (distillation token, second head) learns
from a CNN teacher with `distill.method=deit`, and its report has each head's accuracy and both.
(The loss's parity with facebookresearch/deit's DistillationLoss: tests/test_losses.py.)"""
from __future__ import annotations

import numpy as np
import pytest

from experiments.configs import digits
from kdjax import distill, train
from tests.test_train import read_metrics


def _config(mode, **overrides):
    c = digits.get_config("method=deit")
    c.stages = "teacher,student"
    c.teacher.model, c.teacher.epochs, c.student.epochs = "cnn_tiny", 1, 2
    c.distill.deit.mode = mode
    c.log_every_steps = 5
    c.throughput_batch = 16
    for key, value in overrides.items():
        node = c
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return c


def test_deit_hard_distillation_trains_a_two_head_vit(tmp_path):
    workdir = str(tmp_path / "run")
    summary = train.run(_config("hard"), workdir)
    s = summary["student"]
    assert s["model"] == "deit_tiny_distilled_patch4_32" and set(s["terms"]) == {"deit"}
    heads = {k: s[k] for k in ("test_accuracy_cls", "test_accuracy_dist", "test_accuracy_heads_logit_mean",
                               "test_accuracy_heads_softmax_mean")}
    assert all(0.0 <= v <= 1.0 for v in heads.values())
    # the model's logits are the mean of the two heads': its selected-epoch accuracy is that one
    assert s["selected_test_accuracy"] == pytest.approx(heads["test_accuracy_heads_logit_mean"])
    rows = read_metrics(workdir, "student")
    values = [r["loss/deit"] for r in rows if "loss/deit" in r]
    assert values and np.all(np.isfinite(values)) and np.mean(values[-3:]) < np.mean(values[:3])  # it learns


def test_deit_needs_a_distilled_vit_and_a_known_mode():
    from kdjax import config as kconfig
    with pytest.raises(ValueError, match="unknown config.distill.deit.mode 'medium'; choose one of: hard, soft"):
        distill.build_terms(_config("medium").distill.to_dict())
    with pytest.raises(ValueError, match="alpha must be in"):
        distill.build_terms(_config("hard", **{"distill.deit.alpha": 1.5}).distill.to_dict())
    assert distill.METHODS["deit"].vit_student
    kconfig.validate(_config("soft"))


@pytest.mark.parametrize("name", ["cifar100_resnet32x4_deit_tiny", "cifar100_vit_tiny_resnet8x4"])
def test_vit_pair_smoke_runs(name, tmp_path):
    """The CIFAR-100 ViT pairs' `:smoke` runs on mock data, end to end. Compiling 12 ViT blocks
    (and ResNet-32x4) takes minutes on 2 CPU cores, so the ViT keeps 2 blocks here and the CNN
    teacher is a resnet8; everything else is the smoke run."""
    import importlib
    c = importlib.import_module(f"experiments.configs.{name}").get_config("smoke")
    assert c.dataset.mock_examples > 0 and c.dataset.name == "cifar100"
    vit_role = "student" if "deit" in c.student.model else "teacher"
    c[vit_role].kwargs.depth = 2
    if c.teacher.model == "resnet32x4":
        c.teacher.model = "resnet8"
    summary = train.run(c, str(tmp_path / "smoke"))
    assert set(summary) == {"teacher", "student", "student_scratch"}
    if vit_role == "student":
        assert summary["student"]["terms"] == {"deit": 1.0}
        assert "test_accuracy_dist" in summary["student"] and "test_accuracy_cls" in summary["student_scratch"]
    else:
        assert summary["student"]["terms"] == {"ce": 0.1, "kd": 0.9}
