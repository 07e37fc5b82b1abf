"""The streamed input path (kdjax.data.folder, kdjax.data.stream) on a generated image folder of a
few hundred tiny JPEG/PNG files: batches independent of the loader's workers and processes,
replayable crops, the bad inputs, and a KD run end to end through the command line (the teacher's
soft labels stored under the crops, kdjax.data.store), SIGKILLed mid-epoch with its Grain workers on
and rerun, bit-identical to an uninterrupted one, leaving no worker behind."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from kdjax import config as kconfig
from kdjax import data as kdata
from kdjax.data import folder as kfolder
from kdjax.data import stream
from tests.test_train import final_params, read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("ant", "bee", "cat")  # sorted: labels 0, 1, 2
TRAIN_PER_CLASS, VAL_PER_CLASS = 70, 20


def _image(rng, label, i):
    """A small image whose colour says its class; modes vary (RGB/L/RGBA PNG, RGB/CMYK JPEG)."""
    h, w = int(rng.integers(18, 40)), int(rng.integers(18, 40))
    base = np.zeros((h, w, 3), np.float32)
    base[..., label] = 200
    array = np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(array)
    kind = i % 5
    if kind == 1:
        return image.convert("L"), "png"
    if kind == 2:
        return image.convert("RGBA"), "png"
    if kind == 3:
        return image.convert("CMYK"), "jpg"
    return image, ("png" if kind == 4 else "jpg")


def make_folder(root, per_class=(TRAIN_PER_CLASS, VAL_PER_CLASS), classes=CLASSES, seed=0):
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), per_class):
        for label, name in enumerate(classes):
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(n):
                image, ext = _image(rng, label, i)
                image.save(os.path.join(root, split, name, f"{i:04d}.{ext}"))
    return str(root)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = make_folder(tmp_path_factory.mktemp("images") / "root")
    with open(os.path.join(root, "train", "ant", "notes.txt"), "w") as f:  # skipped with a counted warning
        f.write("not an image")
    return root


def _assert_two_processes_split(split, common, one, steps=8):
    """Two processes' loaders of `split` read disjoint halves of every global batch of 32, which
    together are `one` (the 1-process batches' hashes) for the first `steps` steps."""
    parts = [_hashes(stream.TrainLoader(split, 32, start_step=0, workers=0, process_index=p, process_count=2,
                                        **common)) for p in range(2)]
    for step in range(steps):
        first, second = parts[0][step], parts[1][step]
        assert not set(first[0]) & set(second[0])
        for k in range(3):
            np.testing.assert_array_equal(np.concatenate([first[k], second[k]]), one[step][k])


def _hashes(loader):
    with loader:
        return [(b["index"].copy(), b["label"].copy(), b["image"].copy()) for b in loader]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            np.testing.assert_array_equal(u, v)


def test_folder_splits_labels_and_decoding(folder, caplog):
    with caplog.at_level("WARNING"):
        ds = kdata.load("folder", data_dir=folder, image_size=16, val_size=0.1, seed=0)
    assert "skipped 1 file(s) that are not .jpg/.jpeg/.png" in caplog.text
    assert ds.streamed and ds.num_classes == 3 and ds.image_shape == (16, 16, 3)
    assert len(ds.train) + len(ds.val) == 3 * TRAIN_PER_CLASS and len(ds.test) == 3 * VAL_PER_CLASS
    assert not set(ds.train.files) & set(ds.val.files)
    # class index = sorted class folder name; every mode decodes to RGB uint8 of the asked size
    for path, label in zip(ds.test.files, ds.test.labels):
        assert os.path.basename(os.path.dirname(path)) == CLASSES[label]
    images, labels, mask = next(iter(kdata.eval_batches(ds.test, 64, threads=2)))
    assert images.shape == (64, 16, 16, 3) and images.dtype == np.uint8
    # the class colour survives decode + resize + center crop (channel `label` is the bright one),
    # except in the grayscale files, whose three channels are equal
    means = images[mask > 0].reshape(-1, 256, 3).astype(np.float32).mean(1)
    gray = np.all(images[mask > 0] == images[mask > 0][..., :1], axis=(1, 2, 3))
    assert 0 < gray.sum() < len(gray)
    np.testing.assert_array_equal(means[~gray].argmax(-1), labels[mask > 0][~gray])
    # the padded last eval batch: 60 examples in batches of 64 -> one batch, 4 padded rows
    assert int(mask.sum()) == 60 and np.all(images[60:] == 0)


def test_eval_transform_is_resize_then_center_crop(tmp_path):
    """A 40 x 20 (w x h) image at image_size 14: shorter side to round(14 / 0.875) = 16 -> 32 x 16,
    then the central 14 x 14 (left 9, top 1), computed by hand with PIL."""
    array = np.random.default_rng(1).integers(0, 255, (20, 40, 3), dtype=np.uint8)
    path = str(tmp_path / "x.png")
    Image.fromarray(array).save(path)
    expected = np.asarray(Image.fromarray(array).resize((32, 16), Image.BILINEAR))[1:15, 9:23]
    np.testing.assert_array_equal(stream.eval_image(path, 14), expected)


def test_crop_params_follow_torchvision_random_resized_crop():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = stream.crop_params(rng, 30, 50)
        assert 0 <= top <= 30 - h and 0 <= left <= 50 - w and h > 0 and w > 0
        assert 0.08 * 1500 * 0.8 <= h * w <= 1500 and 0.7 < w / h < 1.45  # rounding widens the bounds a little
    # no draw fits a 1 x 100 strip: the fallback is the whole height, width clipped to ratio 4/3, centered
    assert stream.crop_params(np.random.default_rng(0), 1, 100) == (0, 49, 1, 1)
    # the same (seed, epoch, index) always gives the same crop and flip
    draw = lambda: stream.crop_params(np.random.default_rng((3, 1, 7, stream.CROP_STREAM)), 30, 50)  # noqa: E731
    assert draw() == draw()


def test_batches_do_not_depend_on_workers_processes_or_the_start_step(folder):
    ds = kdata.load("folder", data_dir=folder, image_size=16)
    spe = kdata.steps_per_epoch(len(ds.train), 32)  # 6 steps of 32 out of 210: the run crosses an epoch
    common = dict(seed=3, total_steps=8, steps_per_epoch=spe, flip=True)
    one = _hashes(stream.TrainLoader(ds.train, 32, start_step=0, workers=0, **common))
    assert len(one) == 8
    for step, (index, label, image) in enumerate(one):  # the in-memory path's order, the folder's labels
        epoch, i = divmod(step, spe)
        np.testing.assert_array_equal(index, kdata.batch_indices(len(ds.train), 32, seed=3, epoch=epoch, step_in_epoch=i))
        np.testing.assert_array_equal(label, ds.train.labels[index])
    # Grain worker processes: the same batches, in the same order; a run resumed at step 5 too
    _assert_same(_hashes(stream.TrainLoader(ds.train, 32, start_step=5, workers=2, **common)), one[5:])
    # 2 processes: each reads only its half of every global batch; together they are the 1-process batch
    _assert_two_processes_split(ds.train, common, one)
    # epochs differ in order and crops; the seed changes the crops of the same example
    other = _hashes(stream.TrainLoader(ds.train, 32, start_step=0, workers=0, **dict(common, seed=4)))
    assert not np.array_equal(other[0][2], one[0][2])


# ---------------------------------------------------------------------------------- bad input


def _refusal(root, **kw):
    with pytest.raises(kdata.DataError) as e:
        kdata.load("folder", data_dir=str(root), **kw)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_bad_folders_are_refused_in_one_line(tmp_path, folder):
    assert "does not exist" in _refusal(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    assert "needs a train/ folder and a val/ (or test/) folder" in _refusal(tmp_path / "empty")
    for d in ("empty2/train/a", "empty2/val/a"):
        os.makedirs(tmp_path / d)
    assert "has no class folders with .jpg/.jpeg/.png images" in _refusal(tmp_path / "empty2")
    extra = make_folder(tmp_path / "extra", per_class=(2, 1), classes=("a", "b"))
    os.makedirs(os.path.join(extra, "val", "zebra"))
    assert "1 class(es) train/ lacks: zebra" in _refusal(extra)
    missing = make_folder(tmp_path / "missing", per_class=(2, 1), classes=("a", "b"))
    os.rename(os.path.join(missing, "val", "b"), os.path.join(missing, "b_elsewhere"))
    assert "lacks 1 class(es) of train/: b" in _refusal(missing)
    assert "ImageNet-1k has 1000" in str(pytest.raises(kdata.DataError, kdata.load, "imagenet2012", data_dir=folder).value)


def test_an_unreadable_image_is_refused_naming_the_file(tmp_path):
    root = make_folder(tmp_path / "broken", per_class=(4, 1), classes=("a", "b"))
    bad = os.path.join(root, "train", "b", "0001.jpg")
    with open(bad, "wb") as f:
        f.write(b"this is not a jpeg")
    ds = kdata.load("folder", data_dir=root, image_size=8)
    with pytest.raises(kdata.DataError, match=f"{bad} is not a readable JPEG/PNG image"):
        _hashes(stream.TrainLoader(ds.train, 8, seed=0, start_step=0, total_steps=1, steps_per_epoch=1, flip=False,
                                   workers=0))


def _config(**dataset):
    c = kconfig.base()
    c.teacher.model, c.student.model = "cnn_tiny", "mlp"
    c.dataset.name = "folder"
    c.dataset.update(dataset)
    return c


def test_bad_loader_settings_are_refused(folder):
    cores = os.cpu_count()
    for c, message in [
        (_config(data_dir=folder, loader_workers=cores + 1), f"this machine has {cores} cores; choose 0"),
        (_config(data_dir=folder, loader_workers=-1), "choose 0"),
        (_config(), "set config.dataset.data_dir"),
        (_config(data_dir=folder, image_size=4), "image_size=4"),
    ]:
        with pytest.raises(ValueError, match=message):
            kconfig.validate(c)
    c = _config(data_dir=folder)
    c.augment.crop_padding = 4
    with pytest.raises(ValueError, match="set augment.crop_padding=0"):
        kconfig.validate(c)
    c = _config()
    c.dataset.name = "digits"
    c.dataset.image_size = 32
    with pytest.raises(ValueError, match="is held in memory: unset it"):
        kconfig.validate(c)
    c = _config(data_dir=folder)  # the crops are replayed (kdjax.data.store), mixup is not
    c.distill.cache_teacher, c.augment.mixup_alpha = "on", 0.2
    with pytest.raises(ValueError, match="cache_teacher='on' is invalid here: augmentation"):
        kconfig.validate(c)


# ------------------------------------------------------------------------ end to end, SIGKILL

CLI = ["--config.dataset.name=folder", "--config.dataset.image_size=16", "--config.dataset.loader_workers=2",
       "--config.augment.flip=True", "--config.teacher.model=cnn_tiny", "--config.student.model=mlp",
       "--config.teacher.epochs=1", "--config.student.epochs=2", "--config.stages=teacher,student",
       "--config.batch_size=16", "--config.eval_batch_size=64", "--config.throughput_batch=16",
       "--config.log_every_steps=1", "--config.checkpoint.every_steps=3", "--config.log.report=False",
       "--config.log.progress=False", "--config.distill.cache_teacher=on", "--verbosity=1"]


def _start(workdir, folder):
    return subprocess.Popen([sys.executable, "-m", "experiments.digits", f"--workdir={workdir}",
                             f"--config.dataset.data_dir={folder}", *CLI],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _children(pid):
    """pids of the live processes whose parent is `pid` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry))
    return out


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kd_run_sigkilled_mid_epoch_reruns_bit_identical_and_leaves_no_workers(tmp_path, folder):
    reference = str(tmp_path / "reference")
    ref = _start(reference, folder)
    killed_dir = str(tmp_path / "killed")
    proc = _start(killed_dir, folder)  # both at once: two busy cores, but half the wall time
    # 210 training images, batch 16: 13 steps an epoch; the kill lands in the student's 2nd epoch
    deadline = time.time() + 300
    for line in proc.stdout:
        if "[student] train step 18 " in line or time.time() > deadline:
            break
    workers = _children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(workers) >= 2, "the Grain workers were not running when the run was killed"
    deadline = time.time() + 30
    while any(map(_alive, workers)) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(map(_alive, workers)), f"orphaned loader workers: {[w for w in workers if _alive(w)]}"
    ref_out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, ref_out[-3000:]
    rerun = _start(killed_dir, folder)
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out[-3000:]
    assert "resuming stage 'student' from step" in out and "Traceback" not in out
    # kd on replayable crops: distill.cache_teacher='on' stored the teacher's logits (kdjax.data.store)
    # before the student stage, and the rerun read them back instead of recomputing them
    assert "teacher soft labels read from" in out
    for workdir in (reference, killed_dir):
        assert os.listdir(os.path.join(workdir, "student", "soft_labels"))
    ref_step, ref_params = final_params(reference, "student")
    step, params = final_params(killed_dir, "student")
    assert step == ref_step == 26
    jax.tree.map(np.testing.assert_array_equal, params, ref_params)
    ref_summary = json.load(open(os.path.join(reference, "summary.json")))
    summary = json.load(open(os.path.join(killed_dir, "summary.json")))
    for role in ("teacher", "student"):
        assert summary[role]["test_accuracy"] == ref_summary[role]["test_accuracy"]
    assert ref_summary["student"]["test_accuracy"] > 0.9  # the colours are learnable: the run really trains
    assert read_metrics(killed_dir, "student")[-1] == read_metrics(reference, "student")[-1]
    logits = np.load(os.path.join(reference, "student", "predictions.npz"))
    assert logits["logits"].shape == (3 * VAL_PER_CLASS, 3)


def test_cli_refuses_a_missing_data_dir_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.digits", f"--workdir={tmp_path / 'run'}",
                           "--config.dataset.name=folder", f"--config.dataset.data_dir={tmp_path / 'nowhere'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "does not exist or is not a folder" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "run")


def test_two_processes_match_one_process_with_two_devices(tmp_path, folder):
    """Two processes of one jax.distributed job, each decoding only its half of every global batch,
    train the same models as one process with two devices (tests/test_multihost.py's setup)."""
    from tests.test_multihost import _final_state, _flatten, _free_port, _read, _start, _summary, _wait_all

    multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
    data = [f"--config.dataset.data_dir={folder}", "--config.dataset.name=folder", "--config.dataset.image_size=16",
            "--config.dataset.loader_workers=0", "--config.augment.flip=True", "--config.batch_size=32",
            "--config.eval_batch_size=64"]
    dist = [f"--coordinator_address=127.0.0.1:{_free_port()}", "--num_processes=2", f"--workdir={multi}"]
    jobs = [_start("process0", data + dist + ["--process_id=0"], 1, str(tmp_path)),
            _start("process1", data + dist + ["--process_id=1"], 1, str(tmp_path)),
            _start("single", data + [f"--workdir={single}"], 2, str(tmp_path))]
    _wait_all(jobs, 300)
    assert "Connecting to JAX distributed service" in _read(jobs[1], "out") + _read(jobs[1], "err")
    sum_m, sum_s = _summary(multi), _summary(single)
    for role in ("teacher", "student"):
        np.testing.assert_allclose(sum_m[role]["test_accuracy"], sum_s[role]["test_accuracy"], rtol=1e-4)
        step_m, state_m, _ = _final_state(multi, role)
        step_s, state_s, _ = _final_state(single, role)
        assert step_m == step_s == 6  # 210 images, batch 32
        flat_m, flat_s = dict(_flatten(state_m["params"])), dict(_flatten(state_s["params"]))
        for path in flat_s:
            np.testing.assert_allclose(flat_m[path], flat_s[path], rtol=1e-4, atol=1e-6, err_msg=f"{role} {path}")
