"""The soft-label store of a streamed run (kdjax.data.store, FKD) on tests/test_stream.py's generated
image folder: with every class kept the student's run equals the teacher-in-the-step run; with top 1
of 3 it trains, and the stored values are the teacher's on the loader's crops; a build interrupted
midway is finished by the rerun; the bad inputs are refused in one line."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import config as kconfig
from kdjax import data as kdata
from kdjax import distill, models, runs, train
from kdjax.data import store as kstore
from kdjax.data import stream
from tests.test_stream import folder  # noqa: F401 (the module's generated image folder)
from tests.test_train import final_params, read_metrics, set_fields


def _config(root, **overrides):
    c = kconfig.base()
    c.dataset.name = "folder"
    return set_fields(c, {
        "dataset.data_dir": root, "dataset.image_size": 16, "dataset.loader_workers": 0, "augment.flip": True,
        "teacher.model": "cnn_tiny", "student.model": "mlp", "teacher.epochs": 1, "student.epochs": 2,
        "stages": "teacher", "batch_size": 16, "eval_batch_size": 64, "throughput_batch": 16, "log_every_steps": 1,
        "log.report": False, "log.progress": False, **overrides})


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, folder):  # noqa: F811
    workdir = str(tmp_path_factory.mktemp("fkd_teacher"))
    train.run(_config(folder), workdir)
    return workdir


def _student(root, teacher_run, workdir, **overrides):
    train.run(_config(root, stages="student", **{"teacher.checkpoint": teacher_run, **overrides}), workdir)
    return workdir


@pytest.fixture(scope="module")
def top1_run(tmp_path_factory, folder, teacher_run):  # noqa: F811
    return _student(folder, teacher_run, str(tmp_path_factory.mktemp("fkd_top1")),
                    **{"distill.cache_teacher": "on", "distill.cache_top_k": 1})


def _pieces(workdir):
    return sorted(glob.glob(os.path.join(workdir, "student", "soft_labels", "*", "*.npz")))


def test_all_classes_equal_the_teacher_in_the_step(tmp_path, folder, teacher_run, caplog):  # noqa: F811
    off = _student(folder, teacher_run, str(tmp_path / "off"), **{"distill.cache_teacher": "off"})
    on = _student(folder, teacher_run, str(tmp_path / "on"), **{"distill.cache_teacher": "on"})
    assert not _pieces(off) and len(_pieces(on)) == 1  # 26 steps x 16 x 34 bytes: one piece
    # a shared folder (distill.cache_dir): the second run of the same teacher, data and crops reads it
    shared = {"distill.cache_teacher": "on", "distill.cache_dir": str(tmp_path / "shared")}
    with caplog.at_level("INFO"):
        first = _student(folder, teacher_run, str(tmp_path / "first"), **shared)
        assert "teacher soft labels read from" not in caplog.text
        second = _student(folder, teacher_run, str(tmp_path / "second"), **shared)
    assert f"teacher soft labels read from {tmp_path / 'shared'}" in caplog.text
    assert not _pieces(first) and len(glob.glob(str(tmp_path / "shared" / "*" / "*.npz"))) == 1
    for w in (first, second):
        assert read_metrics(w, "student") == read_metrics(on, "student")
    rows = {w: np.array([[r["loss"], r["loss/kd"], r["grad_norm"]] for r in read_metrics(w, "student")])
            for w in (off, on)}
    assert rows[on].shape == (26, 3)  # 210 images, batch 16: 13 steps an epoch, 2 epochs
    # float tolerance: the store's teacher pass is its own XLA program (on this CPU they agree exactly)
    np.testing.assert_allclose(rows[on], rows[off], rtol=1e-5, atol=1e-6)
    (_, p_on), (_, p_off) = final_params(on, "student"), final_params(off, "student")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p_on, p_off)


def test_top_k_trains_and_stores_the_teachers_top_k_of_each_crop(top1_run, folder, teacher_run):  # noqa: F811
    metrics = read_metrics(top1_run, "student")
    assert len(metrics) == 26 and all(np.isfinite(r["loss/kd"]) for r in metrics)
    ds = kdata.load("folder", data_dir=folder, image_size=16)
    teacher, variables, _ = runs.load_trained_model(teacher_run, "teacher", ds, jnp.float32)
    logits_of = jax.jit(lambda v, x: models.apply_model(teacher, v, kdata.normalize(x, ds.mean, ds.std), train=False)[1]
                        ["logits"])
    (piece,) = _pieces(top1_run)
    with np.load(piece) as f:
        stored = {k: f[k] for k in f.files}
    spe = kdata.steps_per_epoch(len(ds.train), 16)
    with stream.TrainLoader(ds.train, 16, seed=0, start_step=0, total_steps=2 * spe, steps_per_epoch=spe, flip=True,
                            workers=0, crops=True) as loader:
        batches = list(loader)
    crops = np.concatenate([b["crop"] for b in batches])
    assert len(set(crops[:len(ds.train) - 2].tolist())) > 100  # the crops differ from example to example
    np.testing.assert_array_equal(stored["crop"], crops)
    np.testing.assert_array_equal(stored["index"], np.concatenate([b["index"] for b in batches]))
    logits = np.concatenate([np.asarray(logits_of(variables, b["image"])) for b in batches])
    assert stored["values"].shape == (2 * spe * 16, 1) and stored["indices"].dtype == np.int16
    np.testing.assert_array_equal(stored["indices"][:, 0], logits.argmax(-1))
    np.testing.assert_allclose(stored["values"][:, 0], logits.max(-1), rtol=1e-5, atol=1e-5)
    others = np.where(np.arange(3) == logits.argmax(-1)[:, None], -np.inf, logits)
    np.testing.assert_allclose(stored["rest"], np.logaddexp.reduce(others, -1) - np.log(2), rtol=1e-5, atol=1e-5)
    # the soft label: the teacher's top-1 probability, the rest shared equally (FKD's marginal smoothing)
    soft = jax.nn.softmax(kstore.soft_logits(stored["values"], stored["indices"], stored["rest"], 3))
    p = jax.nn.softmax(logits)
    top = p.max(-1)
    np.testing.assert_allclose(soft.max(-1), top, rtol=1e-5)
    np.testing.assert_allclose(np.sort(soft, -1)[:, :2], np.repeat(((1 - top) / 2)[:, None], 2, 1), rtol=1e-4,
                               atol=1e-6)


def test_an_interrupted_build_is_finished_by_the_rerun(tmp_path, folder, teacher_run, top1_run, monkeypatch):  # noqa: F811
    """A build stopped after its 2nd piece (pieces of 4 steps here) leaves 2 whole pieces and a
    stray .tmp; the rerun computes the other 5 only and trains the run an uninterrupted one does."""
    monkeypatch.setattr(kstore, "PIECE_BYTES", 4 * 16 * kstore.example_bytes(1, 3))
    save, saved = kstore.paths.save_npz, []

    class Killed(BaseException):
        pass

    def save_twice(path, **arrays):
        if len(saved) == 2:
            with open(path + ".tmp", "wb") as f:
                f.write(b"half a piece")
            raise Killed  # what a SIGKILL leaves, short of the process ending
        saved.append(path)
        save(path, **arrays)

    monkeypatch.setattr(kstore.paths, "save_npz", save_twice)
    workdir = str(tmp_path / "run")
    settings = {"distill.cache_teacher": "on", "distill.cache_top_k": 1}
    with pytest.raises(Killed):
        _student(folder, teacher_run, workdir, **settings)
    assert len(_pieces(workdir)) == 2
    first = {p: os.path.getmtime(p) for p in _pieces(workdir)}
    monkeypatch.setattr(kstore.paths, "save_npz", save)
    _student(folder, teacher_run, workdir, **settings)
    assert len(_pieces(workdir)) == 7  # 26 steps in pieces of 4
    assert all(os.path.getmtime(p) == t for p, t in first.items())  # kept, not recomputed
    (_, params), (_, ref) = final_params(workdir, "student"), final_params(top1_run, "student")
    jax.tree.map(np.testing.assert_array_equal, params, ref)


# ---------------------------------------------------------------------------------- bad input

def _one_line(match, fn, *args, **kw):
    with pytest.raises(ValueError, match=match) as e:
        fn(*args, **kw)
    assert "\n" not in str(e.value)


def test_bad_settings_are_refused_in_one_line(folder):  # noqa: F811
    on = {"distill.cache_teacher": "on"}
    for overrides, match in [
        ({**on, "distill.cache_top_k": 0}, "cache_top_k=0: choose a number of classes >= 1"),
        ({"distill.cache_top_k": 2}, "cache_top_k=2 sets up the soft-label store, which only config.distill.cache_"
                                     "teacher='on' builds \\(it is 'auto'\\)"),
        ({"distill.cache_dir": "/tmp/x", "distill.cache_teacher": "off"}, "cache_dir='/tmp/x' sets up the soft-label"),
        ({**on, "distill.method": "fitnet"}, "reads the teacher's stage2, and a streamed data set's soft-label store"),
        ({**on, "augment.cutmix_alpha": 1.0}, "cache_teacher='on' is invalid here: augmentation"),
    ]:
        _one_line(match, kconfig.validate, _config(folder, stages="teacher,student", **overrides))
    for field, value in (("cache_top_k", 3), ("cache_dir", "/tmp/x")):
        c = _config(folder, **on, **{"augment.flip": False})
        c.dataset.name, c.dataset.data_dir, c.dataset.image_size, c.dataset.loader_workers = "digits", None, None, None
        c.distill[field] = value
        _one_line(f"{field}=.* is held in memory and caches every logit", kconfig.validate, c)


def _open(mode, terms, teacher, variables, ds, **kw):
    args = dict(top_k=None, num_classes=3, global_batch=16, total_steps=26, steps_per_epoch=13, seed=0, flip=True,
                dtype=jnp.float32, obstacle=None, root="/tmp/unused", label="[student]")
    return kstore.open_store(mode, (teacher,), (variables,), terms, ds.train, **{**args, **kw})


def test_the_store_refuses_or_is_not_used(folder, teacher_run, caplog):  # noqa: F811
    ds = kdata.load("folder", data_dir=folder, image_size=16)
    teacher, variables, _ = runs.load_trained_model(teacher_run, "teacher", ds, jnp.float32)
    kd, fitnet = distill.build_terms({"method": "kd"}), distill.build_terms({"method": "fitnet"})
    for k in (4, 0, 2.5):
        _one_line(f"cache_top_k={k!r}: choose 1..3", _open, "on", kd, teacher, variables, ds, top_k=k)
    _one_line("term 'fitnet' reads teacher features other than the logits", _open, "on", fitnet, teacher, variables, ds)
    _one_line(r"store would need 2176.0 GiB, more than 256 GiB: set distill.cache_top_k lower", _open, "on", kd,
              teacher, variables, ds, total_steps=2**32)
    with caplog.at_level("INFO"):
        assert _open("off", kd, teacher, variables, ds) is None
        assert _open("auto", kd, teacher, variables, ds) is None  # the teacher in the step: nothing to reuse
        store = _open("on", kd, teacher, variables, ds, top_k=2)
    assert "teacher soft labels not stored: on a streamed data set the store runs the teacher" in caplog.text
    # 26 steps x batch 16 x (2 x (4 + 2) + 4 + 8 + 4) bytes, logged before anything is computed
    assert "26 steps x batch 16 x 28 bytes (top 2 of 3 classes, 1 teacher(s)) = 0.000 GiB" in caplog.text
    assert store.top_k == 2 and store.num_pieces == 1 and store.directory.startswith("/tmp/unused/")
    assert not os.path.exists("/tmp/unused")  # nothing is written before `build`
