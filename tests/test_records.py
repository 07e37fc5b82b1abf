"""tfds data sets prepared as ArrayRecord (kdjax.data.records, dataset.name='tfds:<name>'), streamed
through Grain: a tiny generated data set prepared by tfds itself (a GeneratorBasedBuilder defined
here, ``download_and_prepare(file_format='array_record')`` in a subprocess: preparing imports
TensorFlow, reading must not), batches independent of the loader's workers and processes, a KD run
end to end through the command line with TensorFlow made unimportable in every process, and the
bad inputs, each one line."""

import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from kdjax import config as kconfig
from kdjax import data as kdata
from kdjax.data import stream
from tests.test_stream import _assert_same, _assert_two_processes_split, _hashes

tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("array_record")
pytest.importorskip("grain")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("ant", "bee", "cat")
TRAIN_PER_CLASS, TEST_PER_CLASS = 70, 20


def _pixels(rng, label):
    """A small RGB image whose colour says its class, of a random size."""
    h, w = int(rng.integers(18, 40)), int(rng.integers(18, 40))
    base = np.zeros((h, w, 3), np.float32)
    base[..., label] = 200
    return np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)


class _Generated(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the test builders: train / test splits of generated images."""

    VERSION = tfds.core.Version("1.0.0")
    PER_CLASS = {"train": TRAIN_PER_CLASS, "test": TEST_PER_CLASS}

    def _features(self):
        return {"image": tfds.features.Image(shape=(None, None, 3)), "label": tfds.features.ClassLabel(names=CLASSES)}

    SUPERVISED_KEYS = None

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(self._features()),
                                     supervised_keys=self.SUPERVISED_KEYS)

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in self.PER_CLASS}

    def _generate_examples(self, split):
        rng = np.random.default_rng(0 if split == "train" else 1)
        for i in range(self.PER_CLASS[split] * len(CLASSES)):
            label = i % len(CLASSES)
            yield i, self._example(_pixels(rng, label), label)

    def _example(self, pixels, label):
        return {"image": pixels, "label": label}


class TinyShapes(_Generated, skip_registration=True):
    """The data set the tests read (also prepared as TFRecord, to be refused)."""


class TinyNoImage(_Generated, skip_registration=True):
    PER_CLASS = {"train": 2, "test": 1}

    def _features(self):
        return {"pixels": tfds.features.Tensor(shape=(8, 8, 3), dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=CLASSES)}

    def _example(self, pixels, label):
        return {"pixels": pixels[:8, :8], "label": label}


class TinyNoLabel(_Generated, skip_registration=True):
    PER_CLASS = {"train": 2, "test": 1}

    def _features(self):
        return {"image": tfds.features.Image(shape=(None, None, 3)), "label": tfds.features.Scalar(dtype=np.int64)}


class TinyRenamed(_Generated, skip_registration=True):
    """ImageNet's split names (train, validation); two Image features, the one to read named by
    supervised_keys; a Text feature beside them."""

    PER_CLASS = {"train": 4, "validation": 2}
    SUPERVISED_KEYS = ("photo", "y")

    def _features(self):
        return {"photo": tfds.features.Image(shape=(None, None, 3)), "thumb": tfds.features.Image(shape=(4, 4, 3)),
                "y": tfds.features.ClassLabel(names=CLASSES), "file_name": tfds.features.Text()}

    def _example(self, pixels, label):
        return {"photo": pixels, "thumb": pixels[:4, :4], "y": label, "file_name": f"{label}.png"}


class TinyAmbiguous(TinyRenamed, skip_registration=True):
    """Two Image features and nothing to choose one."""

    SUPERVISED_KEYS = None


def prepare(root):
    """Prepares every test data set under `root` with tfds (run in a subprocess: imports TensorFlow)."""
    TinyShapes(data_dir=os.path.join(root, "array_record"), file_format="array_record").download_and_prepare()
    TinyShapes(data_dir=os.path.join(root, "tfrecord"), file_format="tfrecord").download_and_prepare()
    for builder in (TinyNoImage, TinyNoLabel, TinyRenamed, TinyAmbiguous):
        builder(data_dir=os.path.join(root, "array_record"), file_format="array_record").download_and_prepare()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The tfds data_dir of the prepared data sets (prepared once in a subprocess, ~6 s)."""
    root = str(tmp_path_factory.mktemp("tfds"))
    code = f"import sys; sys.path.insert(0, {REPO!r}); from tests.test_records import prepare; prepare({root!r})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert out.returncode == 0, out.stderr[-3000:]
    return root


def _data_dir(prepared):
    return os.path.join(prepared, "array_record")


def test_records_splits_labels_and_decoding(prepared, tmp_path):
    ds = kdata.load("tfds:tiny_shapes", data_dir=_data_dir(prepared), image_size=16, val_size=0.1, seed=0)
    assert ds.streamed and ds.num_classes == 3 and ds.image_shape == (16, 16, 3)
    assert len(ds.train) + len(ds.val) == 3 * TRAIN_PER_CLASS and len(ds.test) == 3 * TEST_PER_CLASS
    assert not set(ds.train.indices) & set(ds.val.indices) and ds.val.split == ds.train.split == "train"
    assert ds.test.split == "test" and not ds.val.train and not ds.test.train
    # the validation split is stratified, as for a folder: 7 of each class
    np.testing.assert_array_equal(np.bincount(ds.val.labels), [7, 7, 7])
    assert repr(ds.train) == "RecordSplit(tfds:tiny_shapes 'train', 189 records, image_size=16, train=True)"
    # the class colour survives decode + resize + center crop
    images, labels, mask = next(iter(kdata.eval_batches(ds.test, 64, threads=2)))
    assert images.shape == (64, 16, 16, 3) and images.dtype == np.uint8 and int(mask.sum()) == 60
    means = images[:60].reshape(60, -1, 3).astype(np.float32).mean(1)
    np.testing.assert_array_equal(means.argmax(-1), labels[:60])
    # one decoding code path: a record's bytes decode exactly as the same bytes in an image file
    encoded, what = ds.test.encoded(5)
    assert encoded[:8] == b"\x89PNG\r\n\x1a\n" and what.startswith("record ")
    path = tmp_path / "same.png"
    path.write_bytes(encoded)
    np.testing.assert_array_equal(stream.eval_image(encoded, 16, what), stream.eval_image(str(path), 16))
    rng = lambda: np.random.default_rng(3)  # noqa: E731
    np.testing.assert_array_equal(stream.train_image(encoded, 16, rng(), True, what),
                                  stream.train_image(str(path), 16, rng(), True))
    np.testing.assert_array_equal(images[5], stream.eval_image(encoded, 16))


def test_batches_do_not_depend_on_workers_processes_or_the_start_step(prepared):
    ds = kdata.load("tfds:tiny_shapes", data_dir=_data_dir(prepared), image_size=16)
    spe = kdata.steps_per_epoch(len(ds.train), 32)  # 6 steps of 32 out of 210: the run crosses an epoch
    common = dict(seed=3, total_steps=8, steps_per_epoch=spe, flip=True)
    one = _hashes(stream.TrainLoader(ds.train, 32, start_step=0, workers=0, **common))
    assert len(one) == 8
    for step, (index, label, image) in enumerate(one):
        epoch, i = divmod(step, spe)
        np.testing.assert_array_equal(index, kdata.batch_indices(len(ds.train), 32, seed=3, epoch=epoch, step_in_epoch=i))
        np.testing.assert_array_equal(label, ds.train.labels[index])
        means = image.reshape(32, -1, 3).astype(np.float32).mean(1)
        assert (means.argmax(-1) == label).mean() > 0.9  # the crop of record `index` carries its label's colour
    # Grain worker processes (each opens its own tfds.data_source): the same batches; resumed at step 5 too
    _assert_same(_hashes(stream.TrainLoader(ds.train, 32, start_step=5, workers=2, **common)), one[5:])
    # 2 processes: each reads only its half of every global batch; together they are the 1-process batch
    _assert_two_processes_split(ds.train, common, one)


def test_features_and_splits_are_read_from_info(prepared):
    """supervised_keys pick the image among two Image features; 'validation' is the test split."""
    ds = kdata.load("tfds:tiny_renamed", data_dir=_data_dir(prepared), image_size=8)
    assert (ds.train.image_key, ds.test.split, len(ds.train), len(ds.test)) == ("photo", "validation", 12, 6)
    # the photo, not the 4 x 4 thumbnail, is what is decoded
    from PIL import Image

    assert min(Image.open(io.BytesIO(ds.test.encoded(0)[0])).size) >= 18
    images, labels, mask = next(iter(kdata.eval_batches(ds.test, 6)))
    means = images.reshape(6, -1, 3).astype(np.float32).mean(1)
    np.testing.assert_array_equal(means.argmax(-1), labels)


def test_labels_are_kept_in_the_label_cache_and_only_a_matching_file_is_used(prepared, tmp_path, monkeypatch):
    """The first load reads the labels from the records and keeps them; the next reads only the
    cache file (shown by a doctored file being believed); a file that describes other files of the
    split (a data set prepared again) is ignored and replaced; no writable cache still loads."""
    from kdjax.data import records

    monkeypatch.setenv("KDJAX_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    read = records.read_labels
    monkeypatch.setattr(records, "read_labels", lambda *a: calls.append(a[2]) or read(*a))
    load = lambda: kdata.load("tfds:tiny_shapes", data_dir=_data_dir(prepared), image_size=8)
    first = load()
    assert calls == [3 * TRAIN_PER_CLASS, 3 * TEST_PER_CLASS]
    kept = sorted((tmp_path / "cache" / "labels").iterdir())
    assert len(kept) == 2 and all(p.suffix == ".npz" for p in kept)
    second = load()
    assert len(calls) == 2  # both splits from the cache
    np.testing.assert_array_equal(second.train.labels, first.train.labels)
    np.testing.assert_array_equal(second.test.labels, first.test.labels)
    for path in kept:  # believed as long as it describes the split: the second load read only these files
        with np.load(path) as z:
            described = str(z["describes"])
            assert json.loads(described)["files"] and json.loads(described)["records"] == len(z["labels"])
            np.savez(path, labels=(z["labels"] + 1) % 3, describes=z["describes"])
    np.testing.assert_array_equal(load().test.labels, (first.test.labels + 1) % 3)
    assert len(calls) == 2
    for path in kept:  # the same name, describing other files: read again, and replaced
        with np.load(path) as z:
            other = json.loads(str(z["describes"]))
            other["files"][0][1] += 1
            np.savez(path, labels=z["labels"], describes=np.array(json.dumps(other, sort_keys=True)))
    np.testing.assert_array_equal(load().test.labels, first.test.labels)
    assert len(calls) == 4
    load()
    assert len(calls) == 4
    # a cache that cannot be written: loaded all the same, the records read each time
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("KDJAX_CACHE_DIR", str(tmp_path / "file"))
    np.testing.assert_array_equal(load().train.labels, first.train.labels)
    assert len(calls) == 6


# ------------------------------------------------------------------------ end to end, no TensorFlow

#: sitecustomize for the run's processes (the trainer and its spawned Grain workers): importing
#: tensorflow fails and every attempt is appended to $KDJAX_TF_ATTEMPTS, even one that tfds would
#: catch. Looking it up (importlib.util.find_spec, as availability checks do) is not an import and
#: still finds it.
NO_TENSORFLOW = '''
import os, sys, traceback
from importlib.machinery import PathFinder


class _Blocked:
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        with open(os.environ["KDJAX_TF_ATTEMPTS"], "a") as f:
            f.write(f"pid {os.getpid()} imported {module.__name__}:\\n" + "".join(traceback.format_stack()) + "\\n")
        raise ImportError(f"{module.__name__} is blocked by the test (no TensorFlow at read time)")


class _NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] != "tensorflow":
            return None
        spec = PathFinder.find_spec(name, path, target)
        if spec is not None:
            spec.loader = _Blocked(spec.loader)
        return spec


sys.meta_path.insert(0, _NoTensorFlow())
'''


CLI = ["--config.dataset.name=tfds:tiny_shapes", "--config.dataset.image_size=16", "--config.dataset.loader_workers=2",
       "--config.dataset.val_size=0.1", "--config.augment.flip=True", "--config.teacher.model=cnn_tiny",
       "--config.student.model=mlp", "--config.teacher.epochs=1", "--config.student.epochs=2",
       "--config.stages=teacher,student", "--config.batch_size=16", "--config.eval_batch_size=64",
       "--config.throughput_batch=16", "--config.log.report=False", "--config.log.progress=False"]


def test_kd_run_end_to_end_reads_records_without_tensorflow(prepared, tmp_path):
    blocker = tmp_path / "no_tensorflow"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(NO_TENSORFLOW)
    attempts = tmp_path / "tf_attempts.txt"
    env = dict(os.environ, KDJAX_TF_ATTEMPTS=str(attempts),
               PYTHONPATH=os.pathsep.join(filter(None, [str(blocker), REPO, os.environ.get("PYTHONPATH")])))
    # The blocker works: a plain `import tensorflow` fails and is recorded.
    probe = subprocess.run([sys.executable, "-c", "import tensorflow"], env=env, capture_output=True, text=True)
    assert probe.returncode == 1 and "blocked by the test" in probe.stderr and attempts.exists()
    attempts.unlink()
    workdir = tmp_path / "run"
    code = textwrap.dedent("""
        import runpy, sys
        try:
            runpy.run_module("experiments.digits", run_name="__main__")
        finally:
            print("TENSORFLOW_IMPORTED", "tensorflow" in sys.modules, "tensorflow_datasets" in sys.modules)
        """)
    proc = subprocess.run([sys.executable, "-c", code, f"--workdir={workdir}",
                           f"--config.dataset.data_dir={_data_dir(prepared)}", *CLI],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not attempts.exists(), attempts.read_text()[-3000:]
    assert "TENSORFLOW_IMPORTED False True" in proc.stdout, proc.stdout[-1000:]
    summary = json.load(open(workdir / "summary.json"))
    assert summary["student"]["test_accuracy"] > 0.9  # the colours are learnable: the run really trains
    logits = np.load(workdir / "student" / "predictions.npz")["logits"]
    assert logits.shape == (3 * TEST_PER_CLASS, 3)


# ---------------------------------------------------------------------------------- bad input


def _refusal(name, data_dir, **kw):
    with pytest.raises(kdata.DataError) as e:
        kdata.load(name, data_dir=None if data_dir is None else str(data_dir), **kw)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_bad_record_sources_are_refused_in_one_line(prepared, tmp_path):
    good = _data_dir(prepared)
    assert "set config.dataset.data_dir to the tfds data_dir" in _refusal("tfds:tiny_shapes", None)
    assert f"data_dir {tmp_path / 'nowhere'} does not exist" in _refusal("tfds:tiny_shapes", tmp_path / "nowhere")
    assert "names no tfds data set: give tfds:<name>" in _refusal("tfds:", good)
    message = _refusal("tfds:tiny_shapes", tmp_path)
    assert "'tiny_shapes' is neither prepared in" in message and "file_format='array_record'" in message
    # a data set tfds knows, not prepared here: refused, never downloaded
    message = _refusal("tfds:mnist", tmp_path)
    assert f"tfds data set 'mnist' is not prepared in {tmp_path}; prepare it with tfds.builder('mnist'" in message
    message = _refusal("tfds:tiny_shapes", os.path.join(prepared, "tfrecord"))
    assert "is prepared as tfrecord, not array_record" in message
    message = _refusal("tfds:tiny_no_image", good)
    assert "has no Image feature (the images); its features: label: ClassLabel, pixels: Tensor" in message
    message = _refusal("tfds:tiny_no_label", good)
    assert "has no ClassLabel feature (the labels); its features: image: Image, label: Scalar" in message
    message = _refusal("tfds:tiny_ambiguous", good)
    assert "has 2 Image features (photo, thumb), none called 'image' nor named by supervised_keys" in message
    assert "takes data_dir, image_size and val_size" in _refusal("tfds:tiny_shapes", good, classes=(0, 1))
    assert "val_size=300" in _refusal("tfds:tiny_shapes", good, val_size=300)


def _config(**dataset):
    c = kconfig.base()
    c.teacher.model, c.student.model = "cnn_tiny", "mlp"
    c.dataset.name = "tfds:tiny_shapes"
    c.dataset.update(dataset)
    return c


def test_bad_record_configs_are_refused(prepared):
    for c, message in [
        (_config(), "set config.dataset.data_dir to the tfds data_dir it was prepared in"),
        (_config(name="tfds:"), "names no tfds data set"),
        (_config(data_dir=_data_dir(prepared), mock_examples=4), "mock_examples=4 mocks the in-memory"),
        (_config(data_dir=_data_dir(prepared), image_size=4), "image_size=4"),
    ]:
        with pytest.raises(ValueError, match=message):
            kconfig.validate(c)
    kconfig.validate(_config(data_dir=_data_dir(prepared), image_size=16))
    c = _config(data_dir=_data_dir(prepared))
    c.distill.cache_teacher = "on"  # the soft-label store replays the crops (kdjax.data.store)
    kconfig.validate(c)


def test_cli_refuses_a_tfrecord_data_set_in_one_line(prepared, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.digits", f"--workdir={tmp_path / 'run'}",
                           "--config.dataset.name=tfds:tiny_shapes",
                           f"--config.dataset.data_dir={os.path.join(prepared, 'tfrecord')}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "is prepared as tfrecord, not array_record" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "run")
