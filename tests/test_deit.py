"""DeiT distillation end to end: a distilled ViT student (distillation token, second head) learns
from a CNN teacher with `distill.method=deit`, and its report has each head's accuracy and both.
(The loss's parity with facebookresearch/deit's DistillationLoss: tests/test_losses.py.)"""
from __future__ import annotations

import numpy as np
import pytest

from experiments.configs import digits
from kdjax import distill, train
from tests.test_train import read_metrics, set_fields


def _config(mode, **overrides):
    c = digits.get_config("method=deit")
    c.stages = "teacher,student"
    c.teacher.model, c.teacher.epochs, c.student.epochs = "cnn_tiny", 1, 2
    c.distill.deit.mode = mode
    c.log_every_steps = 5
    c.throughput_batch = 16
    return set_fields(c, overrides)


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
    from kdjax import evaluate  # the evaluation report shows them too
    rep = evaluate.report(workdir, latency_calls=20, plots=False)
    assert next(r for r in rep["models"] if r["name"] == "student")["heads"] == heads
    assert "Two heads (DeiT): test accuracy of the class head" in open(f"{workdir}/report.md").read()
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


def test_deit_term_soft_mixup_and_dkd_on_the_distillation_head():
    """The deit term is losses.deit on (logits_cls, logits_dist) vs the teacher's logits, with the
    configured label smoothing; under mixup the class head's CE is split between the two labels;
    another logit method can read the distillation head (dkd.student=logits_dist)."""
    import jax
    from kdjax import losses
    rng = np.random.default_rng(0)
    s = {k: 3 * rng.standard_normal((6, 10)).astype(np.float32) for k in ("logits", "logits_cls", "logits_dist")}
    t = {"logits": 3 * rng.standard_normal((6, 10)).astype(np.float32)}
    y = rng.integers(0, 10, 6).astype(np.int32)
    cfg = _config("soft", **{"distill.deit.tau": 2.0}).distill.to_dict()
    terms = distill.build_terms(cfg, label_smoothing=0.1)
    d = distill.Distiller(terms)
    ctx = distill.Context(labels=y, train=False, indices=np.arange(6, dtype=np.int32), rng=jax.random.key(0))
    got = d.apply({}, s, t, ctx)["deit"]
    want = losses.deit(s["logits_cls"], s["logits_dist"], t["logits"], y, "soft", 0.5, 2.0, 0.1)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    perm, lam = np.array([1, 0, 3, 2, 5, 4]), np.float32(0.3)
    mixed = d.apply({}, s, t, distill.Context(labels=y, train=False, indices=np.arange(6, dtype=np.int32),
                                               rng=jax.random.key(0), mix_perm=perm, mix_lam=lam))["deit"]
    np.testing.assert_allclose(mixed, lam * want + (1 - lam) * losses.deit(
        s["logits_cls"], s["logits_dist"], t["logits"], y[perm], "soft", 0.5, 2.0, 0.1), rtol=1e-6)
    both = distill.build_terms(_config("hard", **{"distill.method": "deit+dkd",
                                                  "distill.dkd.student": "logits_dist"}).distill.to_dict())
    assert [(x.name, x.student) for x in both] == [("ce", ("logits",)), ("deit", ("logits_cls", "logits_dist")),
                                                  ("dkd", ("logits_dist",))]
