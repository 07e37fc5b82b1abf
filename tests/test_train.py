"""End-to-end tests of the real trainer (kdjax.train.run) on tiny models.

They run the same code path as `python -m experiments.digits` / `experiments.cifar`, shrunk:
tiny models, one or two epochs, so that the trainer cannot silently drift from the library.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments.configs import cifar10_resnet18_mobilenetv2 as cifar_cfg
from experiments.configs import digits as digits_cfg
from kdjax import checkpoint as kckpt
from kdjax import config as kconfig
from kdjax import runs, train
from tests.test_distill import _np_kd, _np_softmax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def set_fields(c, overrides: dict):
    """Sets {'a.b.c': value} fields of config `c`; returns `c`."""
    for key, value in overrides.items():
        node = c
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return c


def tiny_digits_config(**overrides):
    c = digits_cfg.get_config()
    c.teacher.model = "cnn_tiny"  # has BatchNorm: exercises the synchronised batch statistics
    c.teacher.epochs = 1
    c.student.model = "mlp"
    c.student.epochs = 1
    c.stages = "teacher,student"
    c.log_every_steps = 1
    c.throughput_batch = 16
    return set_fields(c, overrides)


def read_metrics(workdir, role, kind="train"):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if r["role"] == role and r["kind"] == kind]


def final_params(workdir, role):
    ckpts = kckpt.StageCheckpoints(os.path.join(workdir, role, "checkpoints"))
    step = ckpts.latest_step()
    state, _ = ckpts.restore(step)  # no target: the saved arrays as they are
    ckpts.close()
    return step, state["params"]


def test_offline_default_shrunk_writes_summary(tmp_path):
    workdir = str(tmp_path / "run")
    summary = train.run(tiny_digits_config(stages="teacher,student,student_scratch"), workdir)
    assert set(summary) == {"teacher", "student", "student_scratch"}
    on_disk = json.load(open(os.path.join(workdir, "summary.json")))
    for role, r in on_disk.items():
        assert 0.0 <= r["test_accuracy"] <= 1.0
        assert r["num_params"] > 0 and r["images_per_sec"] > 0
    assert on_disk["teacher"]["test_accuracy"] > 0.5  # one epoch of a CNN on digits
    assert os.path.exists(os.path.join(workdir, "config.json"))
    table = train.format_table(summary)
    assert "student_scratch" in table and "cnn_tiny" in table
    for role in ("teacher", "student", "student_scratch"):  # the selected model's test logits
        pred = np.load(os.path.join(workdir, role, "predictions.npz"))
        assert pred["logits"].shape == (360, 10) and pred["labels"].shape == (360,)
        assert np.mean(pred["logits"].argmax(-1) == pred["labels"]) == pytest.approx(
            on_disk[role]["selected_test_accuracy"])


def test_scratch_baseline_is_paired_with_the_student(tmp_path):
    """student and student_scratch start from the same initialisation (and data order), so their
    difference is paired: with the distillation weight at 0 the two trainings are the same."""
    workdir = str(tmp_path / "run")
    config = tiny_digits_config(stages="teacher,student,student_scratch", **{"distill.method": "kd",
                                                                            "distill.kd.weight": 0.0,
                                                                            "distill.ce_weight": 1.0})
    summary = train.run(config, workdir)
    a = np.load(os.path.join(workdir, "student", "predictions.npz"))["logits"]
    b = np.load(os.path.join(workdir, "student_scratch", "predictions.npz"))["logits"]
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert summary["student"]["test_accuracy"] == summary["student_scratch"]["test_accuracy"]


def test_early_stopping_and_the_epoch_callback(tmp_path):
    """With a learning rate too small to change anything, the validation score never strictly
    improves after epoch 1: patience 2 stops the stage after epoch 3 of 6, and a rerun (resume)
    does not train further. on_epoch sees every evaluated epoch."""
    seen = []
    config = tiny_digits_config(stages="teacher", **{"teacher.epochs": 6, "dataset.val_size": 0.2, "teacher.model": "mlp",
                                                     "train.early_stop_patience": 2,
                                                     "optimizer.learning_rate": 1e-12})
    workdir = str(tmp_path / "run")
    summary = train.run(config, workdir, on_epoch=lambda role, row: seen.append((role, row["epoch"])))
    assert seen == [("teacher", 1), ("teacher", 2), ("teacher", 3)]
    assert summary["teacher"]["stopped_early_at_epoch"] == 3 and summary["teacher"]["selected_epoch"] == 3
    os.remove(os.path.join(workdir, "teacher", "result.json"))  # as if killed after the last checkpoint
    seen.clear()
    again = train.run(config, workdir, on_epoch=lambda role, row: seen.append((role, row["epoch"])))
    assert seen == [] and again["teacher"]["stopped_early_at_epoch"] == 3
    with pytest.raises(ValueError, match="early_stop_patience=2 needs a validation split"):
        kconfig.validate(tiny_digits_config(**{"train.early_stop_patience": 2}))


def test_jit_and_pmap_on_two_devices_match_one_device(tmp_path):
    assert jax.device_count() >= 2, "tests/conftest.py forces 2 host devices"
    losses = {}
    for name, overrides in {
        "one_device": {"parallel": "jit", "num_devices": 1},
        "jit_2": {"parallel": "jit", "num_devices": 2},
        "pmap_2": {"parallel": "pmap", "num_devices": 2},
    }.items():
        workdir = str(tmp_path / name)
        train.run(tiny_digits_config(**overrides), workdir)
        losses[name] = {
            role: np.array([[r["loss"], r["accuracy"], r["grad_norm"]] for r in read_metrics(workdir, role)])
            for role in ("teacher", "student")
        }
        assert len(losses[name]["student"]) == 22  # 1437 // 64 steps
    for name in ("jit_2", "pmap_2"):
        for role in ("teacher", "student"):
            np.testing.assert_allclose(losses[name][role], losses["one_device"][role], rtol=2e-4, atol=1e-5)


def test_reuses_teacher_from_another_run(tmp_path):
    first = str(tmp_path / "first")
    train.run(tiny_digits_config(stages="teacher"), first)
    second = str(tmp_path / "second")
    summary = train.run(tiny_digits_config(**{"teacher.checkpoint": first}), second)
    assert summary["teacher"]["reused_from"] == os.path.abspath(first)
    assert not os.path.exists(os.path.join(second, "teacher"))
    assert "student" in summary


def test_workdir_with_another_config_is_refused(tmp_path):
    workdir = str(tmp_path / "run")
    train.run(tiny_digits_config(stages="teacher"), workdir)
    before = open(os.path.join(workdir, "config.json")).read()
    with pytest.raises(ValueError, match="different config .*distill"):
        train.run(tiny_digits_config(stages="teacher", **{"distill.temperature": 8.0}), workdir)
    assert open(os.path.join(workdir, "config.json")).read() == before


def test_cifar_smoke_runs_end_to_end_on_mock_data(tmp_path):
    c = cifar_cfg.get_config("smoke")
    assert c.dataset.mock_examples > 0 and c.dataset.name == "cifar10"
    # The smoke config keeps ResNet-18 -> MobileNetV2; compiling those takes minutes on 2 CPU
    # cores, so this test swaps in the smallest CIFAR models. Everything else is the smoke run.
    c.teacher.model, c.student.model = "resnet8", "resnet8"
    summary = train.run(c, str(tmp_path / "smoke"))
    assert set(summary) == {"teacher", "student", "student_scratch"}
    assert summary["student"]["terms"] == {"ce": 0.1, "kd": 0.9}


def test_cifar_without_data_stops_with_one_line(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.cifar",
         "--config=experiments/configs/cifar10_resnet18_mobilenetv2.py",
         f"--workdir={tmp_path / 'run'}", f"--config.dataset.data_dir={tmp_path / 'empty'}",
         "--config.dataset.download=False"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cifar10" in errors[0] and "data_dir" in errors[0]
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """One finished teacher+student run that the teacher-variant tests below reuse."""
    workdir = str(tmp_path_factory.mktemp("teacher_run"))
    train.run(tiny_digits_config(), workdir)
    return workdir


def _np_ce(logits, labels):
    return -np.mean(np.log(_np_softmax(logits)[np.arange(len(labels)), labels]))


def _outputs(model, variables, images, dataset, feature="logits"):
    """A model's eval-mode output on uint8 images, normalised as the trainer does (float64)."""
    from kdjax import data as kdata
    from kdjax import models

    fn = jax.jit(lambda v, x: models.apply_model(model, v, kdata.normalize(x, dataset.mean, dataset.std), train=False)[1])
    return np.asarray(fn(variables, images)[feature], np.float64)


def _first_step(config, dataset, role):
    """(batch, initial student variables) of a stage's first step: the trainer's batch for step 0
    (kdjax.data.train_batch) and its student initialisation (kdjax.step.init_state: split(PRNGKey(seed))[0],
    seed = config.seed + 1000 * the role's index)."""
    from kdjax import data as kdata
    from kdjax import models

    spe = kdata.steps_per_epoch(len(dataset.train.labels), config.batch_size)
    batch = kdata.train_batch(dataset.train, config.batch_size, seed=config.seed, step=0, steps_per_epoch=spe)
    model = models.get_model(config.student.model, num_classes=dataset.num_classes)
    seed = config.seed + train.ROLES.index("student" if role == "student_scratch" else role) * 1000  # the paired baseline
    variables = jax.jit(lambda k: model.init(jax.random.split(k)[0], np.zeros((2,) + dataset.image_shape, np.float32),
                                             train=False))(jax.random.PRNGKey(seed))
    return batch, model, variables


def _check_first_step_kd(workdir, config, role, p_teacher, variables=None):
    """The logged loss/kd (and loss/ce) of the stage's first step equal numpy's on its batch."""
    dataset = train.load_dataset(config.dataset, config.seed)
    batch, model, init = _first_step(config, dataset, role)
    s = _outputs(model, init if variables is None else variables, batch["image"], dataset)
    row = read_metrics(workdir, role)[0]
    assert row["step"] == 1
    T = config.distill.temperature
    np.testing.assert_allclose(row["loss/kd"], _np_kd(s, p_teacher(batch["index"], T), T), rtol=2e-4)
    if "loss/ce" in row:
        np.testing.assert_allclose(row["loss/ce"], _np_ce(s, batch["label"]), rtol=2e-4)
    return row


def _trainer_takes_ensemble_settings():
    import inspect

    return "ensemble_order" in inspect.getsource(train)


@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory):
    """A second teacher (an MLP, another seed) for the ensemble tests."""
    other = str(tmp_path_factory.mktemp("other_teacher"))
    train.run(tiny_digits_config(stages="teacher", seed=1, **{"teacher.model": "mlp"}), other)
    return other


def _teacher_outputs(sources, config, feature="logits"):
    dataset = train.load_dataset(config.dataset, config.seed)
    loaded = [runs.load_trained_model(run, role, dataset, np.float32) for run, role in sources]
    return [_outputs(m, v, dataset.train.images, dataset, feature) for m, v, _ in loaded]


def test_ensemble_of_teachers(tmp_path, teacher_run, other_teacher):
    """The student of two teachers learns, at step 1, KD against the average of the two teachers'
    softmax at T = 4 (numpy, from each teacher's logits on the step's batch); the cached teacher
    outputs are both teachers' logits, stacked on a teacher axis."""
    config = tiny_digits_config(stages="student", **{"teacher.checkpoint": teacher_run,
                                                     "teacher.ensemble": other_teacher, "distill.cache_teacher": "on"})
    workdir = str(tmp_path / "ensemble")
    summary = train.run(config, workdir)
    assert set(summary["ensemble"]) == {os.path.abspath(other_teacher)}
    assert summary["teacher"]["reused_from"] == os.path.abspath(teacher_run)
    assert summary["student"]["test_accuracy"] > 0.3
    z = np.stack(_teacher_outputs([(teacher_run, "teacher"), (other_teacher, "teacher")], config), axis=1)
    with np.load(os.path.join(workdir, "student", "teacher_cache.npz")) as f:
        assert f["logits"].shape == (1437, 2, 10)
        np.testing.assert_allclose(f["logits"], z, rtol=1e-4, atol=1e-4)
    _check_first_step_kd(workdir, config, "student", lambda idx, T: np.mean(_np_softmax(z[idx] / T), axis=1))


@pytest.mark.skipif(not _trainer_takes_ensemble_settings(),
                    reason="kdjax/train.py does not pass teacher.ensemble_weights / feature_source yet")
def test_ensemble_weights_and_feature_source(tmp_path, teacher_run, other_teacher):
    """teacher.ensemble_weights=1,3 weighs the second teacher 3x in the tempered average;
    teacher.feature_source=1 makes RKD read the second teacher's embedding; without it a feature
    method with several teachers is refused in one line before anything runs."""
    settings = {"teacher.checkpoint": teacher_run, "teacher.ensemble": other_teacher, "distill.cache_teacher": "on",
                "distill.method": "kd+rkd"}
    with pytest.raises(ValueError, match="term 'rkd' reads the teacher's embedding, but the teacher is an ensemble "
                                         "of 2 models: set config.teacher.feature_source"):
        train.run(tiny_digits_config(stages="student", **settings), str(tmp_path / "refused"))
    assert not os.path.exists(tmp_path / "refused")
    config = tiny_digits_config(stages="student", **settings, **{"teacher.ensemble_weights": "1,3",
                                                                "teacher.feature_source": 1})
    workdir = str(tmp_path / "weighted")
    train.run(config, workdir)
    runs = [(teacher_run, "teacher"), (other_teacher, "teacher")]
    z = _teacher_outputs(runs, config)
    with np.load(os.path.join(workdir, "student", "teacher_cache.npz")) as f:  # the feature source first
        np.testing.assert_allclose(f["logits"], np.stack([z[1], z[0]], axis=1), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(f["embedding"], _teacher_outputs(runs[1:], config, "embedding")[0],
                                   rtol=1e-4, atol=1e-4)
    _check_first_step_kd(workdir, config, "student",
                         lambda idx, T: 0.25 * _np_softmax(z[0][idx] / T) + 0.75 * _np_softmax(z[1][idx] / T))
    with pytest.raises(ValueError, match="has 3 weights for 2 teacher"):
        train.run(tiny_digits_config(stages="student", **settings, **{"teacher.ensemble_weights": "1,2,3",
                                                                     "teacher.feature_source": 0}),
                  str(tmp_path / "bad_weights"))


def test_born_again_teacher_is_an_earlier_student(tmp_path, teacher_run):
    """The teacher is the earlier run's student: the cached teacher outputs are that student's
    logits, and step 1's KD is numpy's against its softmax at T = 4."""
    config = tiny_digits_config(**{"teacher.checkpoint": teacher_run, "teacher.checkpoint_role": "student",
                                   "distill.cache_teacher": "on"})
    workdir = str(tmp_path / "born_again")
    summary = train.run(config, workdir)
    assert summary["teacher"]["model"] == "mlp" and summary["teacher"]["reused_role"] == "student"
    (z,) = _teacher_outputs([(teacher_run, "student")], config)
    with np.load(os.path.join(workdir, "student", "teacher_cache.npz")) as f:
        np.testing.assert_allclose(f["logits"], z, rtol=1e-4, atol=1e-4)
    (teacher_z,) = _teacher_outputs([(teacher_run, "teacher")], config)
    assert np.abs(z - teacher_z).max() > 1.0  # the earlier student, not the earlier teacher
    _check_first_step_kd(workdir, config, "student", lambda idx, T: _np_softmax(z[idx] / T))


def test_mean_teacher_ema_is_updated_every_step(tmp_path):
    workdir = str(tmp_path / "ema")
    train.run(tiny_digits_config(stages="student", **{"teacher.source": "ema", "teacher.ema_decay": 0.9}), workdir)
    rows = read_metrics(workdir, "student")
    kd = [r["loss/kd"] for r in rows]
    assert kd[0] == pytest.approx(0.0, abs=1e-6)  # step 1: the EMA equals the student
    assert max(kd[1:]) > 1e-4  # afterwards the student moves away from its average
    ckpts = kckpt.StageCheckpoints(os.path.join(workdir, "student", "checkpoints"))
    state, _ = ckpts.restore(ckpts.latest_step())
    ckpts.close()
    ema, params = state["ema"]["params"], state["params"]["student"]
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), ema, params))
    assert 0 < max(diffs)


def test_two_stage_init_then_distill(tmp_path, teacher_run):
    """student_init trains on its terms alone (loss = 0.9 * kd, no CE; step 1's KD is numpy's), and
    the student stage starts from its result: step 1's CE and KD, computed in numpy with the
    student_init's final weights, equal the logged ones (a fresh student's would not)."""
    config = tiny_digits_config(stages="student_init,student", **{
        "teacher.checkpoint": teacher_run, "student_init.epochs": 1, "student_init.terms": "kd"})
    workdir = str(tmp_path / "two_stage")
    summary = train.run(config, workdir)
    assert summary["student_init"]["terms"] == {"kd": 0.9}
    assert summary["student"]["terms"] == {"ce": 0.1, "kd": 0.9}
    (z,) = _teacher_outputs([(teacher_run, "teacher")], config)
    p_teacher = lambda idx, T: _np_softmax(z[idx] / T)  # noqa: E731
    rows = read_metrics(workdir, "student_init")
    assert all("loss/ce" not in r and r["loss"] == pytest.approx(0.9 * r["loss/kd"], rel=1e-6) for r in rows)
    _check_first_step_kd(workdir, config, "student_init", p_teacher)
    _, params = final_params(workdir, "student_init")
    row = _check_first_step_kd(workdir, config, "student", p_teacher, variables={"params": params["student"]})
    np.testing.assert_allclose(row["loss"], 0.1 * row["loss/ce"] + 0.9 * row["loss/kd"], rtol=1e-6)
    dataset = train.load_dataset(config.dataset, config.seed)
    batch, model, fresh = _first_step(config, dataset, "student")
    fresh_kd = _np_kd(_outputs(model, fresh, batch["image"], dataset), p_teacher(batch["index"], 4.0), 4.0)
    assert abs(fresh_kd - row["loss/kd"]) > 0.05 * row["loss/kd"]
    with pytest.raises(ValueError, match="student_init.terms"):
        train.run(tiny_digits_config(stages="student_init,student", **{
            "teacher.checkpoint": teacher_run, "student_init.epochs": 1, "student_init.terms": "nope"}),
            str(tmp_path / "bad"))


def test_function_matching_with_mixup_on_device(tmp_path, teacher_run):
    """big_vision's function matching: one mixup per batch, seen by teacher and student alike."""
    summary = train.run(
        tiny_digits_config(stages="student", **{"teacher.checkpoint": teacher_run, "distill.method": "fm",
                                                "augment.mixup_alpha": 0.5, "student.epochs": 3}),
        str(tmp_path / "fm"),
    )
    assert summary["student"]["terms"] == {"fm": 1.0}  # function matching: no label term
    fm = [r["loss/fm"] for r in read_metrics(str(tmp_path / "fm"), "student")]
    assert np.mean(fm[-10:]) < 0.7 * np.mean(fm[:10])  # the student matches the teacher better


def test_cached_teacher_outputs_equal_running_the_teacher(tmp_path, teacher_run):
    """distill.cache_teacher: the teacher's logits computed once give the run the teacher would."""
    runs = {}
    for mode in ("off", "on"):
        workdir = str(tmp_path / mode)
        train.run(tiny_digits_config(stages="student", **{"teacher.checkpoint": teacher_run,
                                                          "distill.cache_teacher": mode}), workdir)
        runs[mode] = workdir
    assert not os.path.exists(os.path.join(runs["off"], "student", "teacher_cache.npz"))
    with np.load(os.path.join(runs["on"], "student", "teacher_cache.npz")) as f:
        assert f["logits"].shape == (1437, 10)  # every training example (val_size 0), 10 classes
    rows = {m: np.array([[r["loss"], r["loss/kd"], r["grad_norm"]] for r in read_metrics(w, "student")])
            for m, w in runs.items()}
    np.testing.assert_allclose(rows["on"], rows["off"], rtol=1e-5, atol=1e-6)
    (_, on), (_, off) = final_params(runs["on"], "student"), final_params(runs["off"], "student")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), on, off)


def test_cache_teacher_on_is_refused_when_augmentation_changes_the_input(tmp_path):
    config = tiny_digits_config(**{"distill.cache_teacher": "on", "augment.flip": True})
    with pytest.raises(ValueError, match="cache_teacher='on' is invalid here: augmentation"):
        train.run(config, str(tmp_path / "run"))
    assert not os.path.exists(str(tmp_path / "run"))


def test_any_eval_batch_size_on_eight_devices(tmp_path):
    """eval_batch_size=500 on 8 devices (not divisible): padded and masked, same accuracy."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    workdir = tmp_path / "eight"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.digits", f"--workdir={workdir}", "--config.stages=teacher",
         "--config.teacher.model=mlp", "--config.teacher.epochs=1", "--config.eval_batch_size=500",
         "--config.throughput_batch=16", "--config.log.report=False"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data-parallel over 8 devices" in proc.stderr
    one = train.run(tiny_digits_config(stages="teacher", num_devices=1, **{"teacher.model": "mlp"}),
                    str(tmp_path / "one"))
    eight = json.load(open(workdir / "summary.json"))
    # Same test accuracy up to float reassociation across devices (360 test images).
    assert abs(eight["teacher"]["test_accuracy"] - one["teacher"]["test_accuracy"]) <= 1 / 360


def test_run_identity_ignores_unused_methods_new_fields_and_runtime_settings(tmp_path, monkeypatch):
    from experiments import launch
    from kdjax import distill

    config = digits_cfg.get_config()
    name = launch.default_workdir(config, "experiments/configs/digits.py")
    assert name.startswith(os.path.join("runs", "digits-kd-s0-"))

    # kdjax grows: a new method (its default sub-dict lands in every config) and a new default field.
    monkeypatch.setitem(distill.METHODS, "newkd", distill.Method(
        paper="(test)", ce_weight=1.0, defaults={"weight": 1.0}, build=lambda h, t, d: []))
    from experiments.configs import common

    base = common.base

    def grown_base(method="kd"):
        c = base(method)
        c.new_default_field = 0
        return c

    monkeypatch.setattr(common, "base", grown_base)
    grown = digits_cfg.get_config()
    assert "newkd" in grown.distill and grown.new_default_field == 0
    assert launch.default_workdir(grown, "experiments/configs/digits.py") == name
    # Runtime settings do not move the run either; anything that changes results does.
    grown.log_every_steps, grown.eval_batch_size, grown.compile_cache_dir = 7, 128, ""
    assert launch.default_workdir(grown, "experiments/configs/digits.py") == name
    for field, value in (("seed", 1), ("distill.temperature", 8.0), ("distill.kd.weight", 0.5)):
        changed = digits_cfg.get_config()
        node, *path = [changed] + field.split(".")[:-1]
        for p in path:
            node = node[p]
        node[field.split(".")[-1]] = value
        assert launch.default_workdir(changed, "experiments/configs/digits.py") != name, field

    # A run started before kdjax grew resumes under the grown config; a real change is refused.
    workdir = str(tmp_path / "run")
    runs.prepare_workdir(config, workdir, overwrite=False)
    runs.prepare_workdir(grown, workdir, overwrite=False)
    changed = digits_cfg.get_config()
    changed.distill.kd.weight = 0.5
    with pytest.raises(ValueError, match=r"differs in: distill\.kd\.weight"):
        runs.prepare_workdir(changed, workdir, overwrite=False)


def test_dropout_is_seeded_per_step_and_changes_training(tmp_path):
    """Dropout in the MLP student: the same run twice gives identical weights (masks come from the
    step's key, so a resume draws them again), and the masks really act (weights differ from the
    same run without dropout). A model without dropout is refused in one line."""
    cfg = lambda rate: tiny_digits_config(stages="teacher,student", **{"teacher.model": "mlp",  # noqa: E731
                                                                       "student.dropout": rate})
    runs = {}
    for name, rate in (("a", 0.5), ("b", 0.5), ("none", 0.0)):
        train.run(cfg(rate), str(tmp_path / name))
        runs[name] = final_params(str(tmp_path / name), "student")[1]
    same = jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), runs["a"], runs["b"])
    assert all(jax.tree.leaves(same))
    assert not np.allclose(runs["a"]["student"]["fc1"]["kernel"], runs["none"]["student"]["fc1"]["kernel"])
    with pytest.raises(ValueError, match=r"config.student.dropout must be in \[0, 1\), got 1.5"):
        kconfig.validate(tiny_digits_config(**{"student.dropout": 1.5}))
    with pytest.raises(ValueError, match="model 'resnet8' has no dropout; models with dropout: mlp"):
        kconfig.validate(tiny_digits_config(**{"teacher.model": "resnet8", "teacher.dropout": 0.2}))


def test_k_fold_cross_validation(tmp_path):
    """dataset.folds=3: three runs, each validating on its own stratified third of train (disjoint,
    together all of train), and cv.json with mean +- std over folds."""
    workdir = str(tmp_path / "cv")
    summary = train.run(tiny_digits_config(stages="teacher", **{"dataset.folds": 3}), workdir)
    cv = json.load(open(os.path.join(workdir, "cv.json")))
    per_fold = [json.load(open(os.path.join(workdir, f"fold{k}", "summary.json")))["teacher"] for k in range(3)]
    vals = [r["selected_val_accuracy"] for r in per_fold]
    assert cv["teacher"]["selected_val_accuracy_per_fold"] == vals
    assert cv["teacher"]["selected_val_accuracy"] == pytest.approx(np.mean(vals))
    assert cv["teacher"]["selected_val_accuracy_std"] == pytest.approx(np.std(vals, ddof=1))
    assert summary["teacher"]["folds"] == 3 and "+-" in train.format_table(summary)
    val_sets = [train.load_dataset({"name": "digits", "folds": 3, "fold": k}, 0).val for k in range(3)]
    assert sum(len(v.labels) for v in val_sets) == 1437  # the folds partition train
    with pytest.raises(ValueError, match="set config.dataset.val_size to 0"):
        train.run(tiny_digits_config(**{"dataset.folds": 3, "dataset.val_size": 0.2}), str(tmp_path / "bad"))


def test_bfloat16_kd_run_end_to_end(tmp_path):
    """dtype=bfloat16 (the models compute in bf16; parameters, losses and the optimizer stay f32):
    a digits teacher + KD student run finishes with every logged loss finite, no skipped step,
    and test accuracies within a few points of the same run in float32 (measured on this tiny
    config: teacher 0.817 vs 0.822, student 0.778 vs 0.778)."""
    runs = {}
    for dtype in ("bfloat16", "float32"):
        workdir = str(tmp_path / dtype)
        summary = train.run(tiny_digits_config(dtype=dtype, **{"teacher.epochs": 2, "student.epochs": 2}), workdir)
        runs[dtype] = (workdir, summary)
    (w16, s16), (w32, s32) = runs["bfloat16"], runs["float32"]
    for role in ("teacher", "student"):
        rows16, rows32 = read_metrics(w16, role), read_metrics(w32, role)
        assert len(rows16) == len(rows32) == 44  # every step logged: 2 epochs x 22 steps
        for r in rows16:
            assert all(np.isfinite(v) for k, v in r.items() if k.startswith("loss")), r
            assert r["nonfinite"] == 0 if "nonfinite" in r else True
        assert "skipped_nonfinite_steps" not in s16[role]
        first16, first32 = rows16[0]["loss"], rows32[0]["loss"]
        assert first16 != first32 and first16 == pytest.approx(first32, rel=1e-2)  # bf16 really ran
        assert rows16[-1]["loss"] < 0.7 * first16  # and it learned
        assert abs(s16[role]["test_accuracy"] - s32[role]["test_accuracy"]) <= 0.05, (role, s16[role], s32[role])
        assert s16[role]["test_accuracy"] > 0.6
    kd = [r["loss/kd"] for r in read_metrics(w16, "student")]
    assert np.all(np.isfinite(kd)) and np.mean(kd[-5:]) < np.mean(kd[:5])


def test_nan_guard_catches_non_finite_optimizer_updates(tmp_path, monkeypatch):
    """An optimizer whose updates overflow (optax.scale(inf) after the real one) while loss and
    gradient stay finite: nan_policy='stop' stops at step 1 (not at step 2, after the parameters
    became inf), and 'skip' skips every step, so the parameters stay at their initial values."""
    import jax.numpy as jnp
    import optax

    from kdjax import optim

    make = optim.make_optimizer
    monkeypatch.setattr(optim, "make_optimizer", lambda *a, **k: optax.chain(make(*a, **k), optax.scale(jnp.inf)))
    config = lambda policy: tiny_digits_config(stages="teacher", nan_policy=policy, **{"teacher.model": "mlp"})  # noqa: E731
    with pytest.raises(train.NonFiniteError, match=r"non-finite .* at step 1 \(epoch .*\) of stage 'teacher'") as err:
        train.run(config("stop"), str(tmp_path / "stop"))
    if _trainer_takes_ensemble_settings():  # the trainer's message names the update (same diff)
        assert "optimizer update (update_norm=" in str(err.value)
    workdir = str(tmp_path / "skip")
    summary = train.run(config("skip"), workdir)
    assert summary["teacher"]["skipped_nonfinite_steps"] == 22  # every step of the epoch
    rows = read_metrics(workdir, "teacher")
    assert all(r["nonfinite"] == 1.0 and np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in rows)
    assert not np.isfinite(rows[0]["update_norm"])
    c = config("skip")
    dataset = train.load_dataset(c.dataset, c.seed)
    model = train.models.get_model("mlp", num_classes=dataset.num_classes)
    init = jax.jit(lambda k: model.init(jax.random.split(k)[0], np.zeros((2,) + dataset.image_shape, np.float32),
                                        train=False))(jax.random.PRNGKey(c.seed + train.ROLES.index("teacher") * 1000))
    _, params = final_params(workdir, "teacher")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), params["student"], init["params"])
