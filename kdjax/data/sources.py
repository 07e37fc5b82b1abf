"""In-memory sources: the small image-classification data sets, loaded fully into host memory.

Sources
-------
* ``digits``: scikit-learn's bundled 8x8 digits (``sklearn.datasets.load_digits``,
  shipped inside the wheel, so it works offline and without TensorFlow). Pixel
  values 0..16 are scaled to uint8 0..255 (``round(x * 255 / 16)``). There is no
  official test split, so a fixed stratified 80/20 train/test split is made with
  ``train_test_split(test_size=0.2, random_state=0, stratify=y)`` (the constant
  ``DIGITS_SPLIT_SEED``, *not* the run seed): 1437 train / 360 test.
* ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``: TensorFlow Datasets
  (tfds), loaded fully into numpy arrays by iterating the data set in batches
  (``tfds.load(..., batch_size=-1)`` is avoided: it aborted the process under
  ``tfds.testing.mock_data`` with tfds 4.9.10 / TF 2.21). TensorFlow and tfds are
  imported lazily, only when such a data set is requested without ``manual_dir``.
* ``manual_dir`` (air-gapped machines): a folder holding the data set's *original*
  archives, read directly with numpy/gzip/tarfile/pickle (no TensorFlow):

  - mnist / fashion_mnist: ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
    ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz`` (un-gzipped files are
    accepted too). Debian's ``dataset-fashion-mnist`` package installs them in
    ``/usr/share/datasets/fashion-mnist``.
  - cifar10: ``cifar-10-python.tar.gz`` (or its extracted ``cifar-10-batches-py/`` folder).
  - cifar100: ``cifar-100-python.tar.gz`` (or its extracted ``cifar-100-python/`` folder);
    fine (100-class) labels.

Normalisation constants (``Dataset.mean``/``Dataset.std``) are computed per channel
from the full official train split (before a validation split is carved out, so they
do not depend on ``val_size`` or ``seed``), in [0, 1] pixel units, as the population
mean and standard deviation over all train pixels. For CIFAR-10 this gives
mean (0.4914, 0.4822, 0.4465), std (0.2470, 0.2435, 0.2616).

``load`` returns a ``Dataset`` of ``Split``s (uint8 images, int32 labels); ``kdjax.data.batches``
cuts them into batches.

Nothing here reads flags or configs: everything is a plain argument.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import socket
import tarfile
import threading
import urllib.parse
import urllib.request
from typing import Sequence

import numpy as np

IN_MEMORY_DATASETS = ('digits', 'mnist', 'fashion_mnist', 'cifar10', 'cifar100')
#: The name of a tfds data set prepared as ArrayRecord, streamed without TensorFlow
#: (kdjax.data.records): 'tfds:' + its tfds name, e.g. 'tfds:cifar10', 'tfds:imagenet2012'.
TFDS_PREFIX = 'tfds:'
#: Streamed through Grain (kdjax.data.stream): image folders read file by file (kdjax.data.folder)
#: and any 'tfds:<name>' (kdjax.data.records); see is_streamed.
STREAMED_DATASETS = ('folder', 'imagenet2012', TFDS_PREFIX + '<name>')
DATASETS = IN_MEMORY_DATASETS + STREAMED_DATASETS


def is_streamed(name) -> bool:
    """Whether data set `name` is streamed: 'folder', 'imagenet2012' or 'tfds:<name>'."""
    return name in ('folder', 'imagenet2012') or (isinstance(name, str) and name.startswith(TFDS_PREFIX))


def is_known(name) -> bool:
    """Whether `name` is a data set kdjax loads (one of DATASETS, any 'tfds:<name>')."""
    return name in IN_MEMORY_DATASETS or is_streamed(name)


#: The named per-channel (mean, std), in [0, 1] pixel units, that published weights expect
#: (``config.dataset.normalize``; ``with_normalization``): torchvision's and most of timm's ImageNet
#: weights, and the Inception-style scaling to [-1, 1] of timm's augreg ViTs. 'data' (not listed):
#: the data set's own statistics.
NORMALIZATIONS = {
    'imagenet': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    'inception': ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

#: Seed of the fixed digits train/test split (independent of the run seed).
DIGITS_SPLIT_SEED = 0
#: Fraction of digits held out as the fixed test split.
DIGITS_TEST_FRACTION = 0.2

_NUM_CLASSES = {'digits': 10, 'mnist': 10, 'fashion_mnist': 10, 'cifar10': 10, 'cifar100': 100}

# Where tfds downloads each data set from (scheme, host, port): probed before a
# download so that a machine without network fails in seconds, not minutes
# (tfds' own downloader retries 10 times with back-off: ~200 s measured).
_DOWNLOAD_HOSTS = {
    'mnist': ('https', 'storage.googleapis.com', 443),
    'fashion_mnist': ('http', 'fashion-mnist.s3-website.eu-central-1.amazonaws.com', 80),
    'cifar10': ('https', 'www.cs.toronto.edu', 443),
    'cifar100': ('https', 'www.cs.toronto.edu', 443),
}
_NETWORK_TIMEOUT_S = 2.0

_IDX_FILES = (
    'train-images-idx3-ubyte',
    'train-labels-idx1-ubyte',
    't10k-images-idx3-ubyte',
    't10k-labels-idx1-ubyte',
)
_CIFAR_ARCHIVES = {
    'cifar10': ('cifar-10-python.tar.gz', 'cifar-10-batches-py'),
    'cifar100': ('cifar-100-python.tar.gz', 'cifar-100-python'),
}


class DataError(ValueError):
    """A data problem the user can fix; the message is a single line."""

    def __init__(self, message: str):
        super().__init__(' '.join(str(message).split()))


@dataclasses.dataclass(frozen=True)
class Split:
    """Images and labels of one split, in host memory.

    Attributes:
      images: uint8 array (N, H, W, C).
      labels: int32 array (N,).
    """

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise DataError(f'Split.images must be uint8 (N,H,W,C), got {self.images.dtype} {self.images.shape}')
        if self.labels.shape != (self.images.shape[0],) or self.labels.dtype != np.int32:
            raise DataError(f'Split.labels must be int32 (N,), got {self.labels.dtype} {self.labels.shape}')

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_examples(self) -> int:
        """Number of examples N."""
        return len(self)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A loaded data set.

    Attributes:
      name: one of ``DATASETS``.
      train: the training split (minus the validation examples if ``val_size`` > 0).
      val: the validation split carved from train, or None when ``val_size`` == 0.
      test: the official test split (the fixed held-out split for digits).
      num_classes: number of classes; labels are in [0, num_classes).
      mean: per-channel mean in [0, 1] pixel units, from the full official train split.
      std: per-channel standard deviation in [0, 1] pixel units, likewise.
    """

    name: str
    train: Split  # (or a FileSplit / records.RecordSplit for a streamed data set, likewise val and test)
    val: Split | None
    test: Split
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image (as the loader produces it, for a streamed data set)."""
        if self.streamed:
            return self.train.image_shape
        return tuple(int(d) for d in self.train.images.shape[1:])

    @property
    def streamed(self) -> bool:
        """Whether the splits are files or records decoded by the loader (FileSplit, RecordSplit)."""
        return not isinstance(self.train, Split)


# --------------------------------------------------------------------------- loading


def load(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
    val_size: float | int = 0,
    seed: int = 0,
    download: bool = True,
    classes: Sequence[int] | None = None,
    train_per_class: int | None = None,
    folds: int = 0,
    fold: int = 0,
    image_size: int | None = None,
) -> Dataset:
    """Loads a data set fully into host memory (or, for ``STREAMED_DATASETS``, lists its files:
    ``kdjax.data.folder.load_folder``, or its records' labels: ``kdjax.data.records.load_records``).

    Every process of a multi-process run loads the full arrays (these data sets
    are small) and later device-puts only its own slice (see ``batch_indices``).

    Args:
      name: one of ``DATASETS``.
      data_dir: a tfds data directory (default: tfds' default, ``~/tensorflow_datasets``
        or ``$TFDS_DATA_DIR``). Ignored for ``digits`` and when ``manual_dir`` is set.
      manual_dir: a folder holding the data set's original archives (see module
        docstring); read without TensorFlow. Takes precedence over tfds.
      val_size: validation examples carved from train: 0 for none, a fraction in
        (0, 1), or an absolute count >= 1. Stratified by label where possible,
        deterministic given ``seed``.
      seed: seed of the train/validation split.
      download: whether tfds may download and prepare a data set that is not
        prepared in ``data_dir``.
      classes: keep only these original class ids, in every split, relabelled 0..k-1 in the
        given order (e.g. (5, 6, 7, 8, 9) -> labels 0..4). None: all classes.
      train_per_class: keep a seeded random ``train_per_class`` training examples of every
        class (few-shot), after the validation split. None: all.
      folds, fold: k-fold cross-validation (``folds`` >= 2, instead of ``val_size``): the
        validation split is fold ``fold`` (0-based) of a seeded stratified k-fold partition of
        train (sklearn's StratifiedKFold), the other folds are the training split.
      image_size: streamed data sets only: the side of the square images the loader makes
        (None: 224). ``data_dir`` is then the folder's ROOT (for 'tfds:<name>': the tfds data_dir
        the data set was prepared in as ArrayRecord).

    The normalisation statistics are always those of the full official train split, so a model
    trained on a subset normalises its inputs as one trained on the whole data set.

    Returns:
      A ``Dataset``.

    Raises:
      DataError: unknown name, missing data/files, no network, bad ``val_size``.
    """
    if not is_known(name):
        raise DataError(f'unknown data set {name!r}: choose one of {", ".join(DATASETS)}')
    if is_streamed(name):
        if manual_dir is not None or classes is not None or train_per_class is not None or folds:
            raise DataError(f'data set {name!r} (streamed) takes data_dir, image_size and val_size; '
                            'manual_dir, classes, train_per_class and folds are for the in-memory data sets')
        if name.startswith(TFDS_PREFIX):
            from kdjax.data.records import load_records

            return load_records(name, data_dir, image_size=image_size, val_size=val_size, seed=seed)
        from kdjax.data.folder import load_folder

        return load_folder(name, data_dir, image_size=image_size, val_size=val_size, seed=seed)
    if name == 'digits':
        train, test = _load_digits()
    elif manual_dir is not None:
        train, test = _load_manual(name, os.fspath(manual_dir))
    else:
        train, test = _load_tfds(name, data_dir=data_dir, download=download)
    num_classes = _NUM_CLASSES[name]
    for split_name, split in (('train', train), ('test', test)):
        if len(split) and (split.labels.min() < 0 or split.labels.max() >= num_classes):
            raise DataError(f'{name} {split_name} labels outside [0, {num_classes})')
    mean, std = _channel_stats(train.images)
    if classes is not None:
        classes = [int(c) for c in classes]
        if not classes or len(set(classes)) != len(classes) or not all(0 <= c < num_classes for c in classes):
            raise DataError(f'classes={classes!r}: give distinct class ids in [0, {num_classes}) of {name}')
        train, test = _keep_classes(train, classes), _keep_classes(test, classes)
        num_classes = len(classes)
    if folds:
        train, val = _split_fold(train, int(folds), int(fold), val_size, seed)
    else:
        train, val = _split_validation(train, val_size, seed)
    if train_per_class is not None:
        train = _few_shot(train, int(train_per_class), num_classes, seed)
    return Dataset(name=name, train=train, val=val, test=test, num_classes=num_classes, mean=mean, std=std)


def with_normalization(dataset: Dataset, normalize: str) -> Dataset:
    """`dataset` normalising with the named statistics of ``NORMALIZATIONS`` instead of its own
    ('' or 'data': unchanged). A DataError when the names' channels are not the images'."""
    if normalize in ('', 'data'):
        return dataset
    if normalize not in NORMALIZATIONS:
        raise DataError(f"unknown normalisation {normalize!r}: choose 'data' or one of {', '.join(NORMALIZATIONS)}")
    mean, std = NORMALIZATIONS[normalize]
    if len(mean) != len(dataset.mean):
        raise DataError(f"normalisation {normalize!r} has {len(mean)}-channel statistics and {dataset.name}'s "
                        f"images have {len(dataset.mean)} channel(s); use 'data' for them")
    return dataclasses.replace(dataset, mean=mean, std=std)


def _keep_classes(split: Split, classes: list[int]) -> Split:
    """The examples of `classes`, relabelled by their position in `classes`."""
    relabel = np.full(max(max(classes), int(split.labels.max(initial=0))) + 1, -1, np.int32)
    relabel[classes] = np.arange(len(classes), dtype=np.int32)
    keep = np.isin(split.labels, classes)
    return Split(split.images[keep], relabel[split.labels[keep]])


def _few_shot(split: Split, per_class: int, num_classes: int, seed: int) -> Split:
    """A seeded random `per_class` examples of every class (order kept)."""
    rng = np.random.default_rng((seed, 7919))
    picked = []
    for c in range(num_classes):
        idx = np.flatnonzero(split.labels == c)
        if len(idx) < per_class or per_class < 1:
            raise DataError(f'train_per_class={per_class}: class {c} has {len(idx)} training examples; '
                            f'choose 1..{len(idx)}')
        picked.append(rng.choice(idx, per_class, replace=False))
    idx = np.sort(np.concatenate(picked))
    return Split(split.images[idx], split.labels[idx])


def _load_digits() -> tuple[Split, Split]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # (1797, 8, 8, 1)
    labels = bunch.target.astype(np.int32)
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=labels
    )
    idx_train, idx_test = np.sort(idx_train), np.sort(idx_test)
    return Split(images[idx_train], labels[idx_train]), Split(images[idx_test], labels[idx_test])


def _channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel population mean/std of uint8 images in [0, 1] units (float64, chunked)."""
    c = images.shape[-1]
    n = images.shape[0] * images.shape[1] * images.shape[2]
    if n == 0:
        return (0.0,) * c, (1.0,) * c
    s = np.zeros(c, np.float64)
    s2 = np.zeros(c, np.float64)
    for i in range(0, images.shape[0], chunk):
        x = images[i : i + chunk].astype(np.float64) / 255.0
        s += x.sum(axis=(0, 1, 2))
        s2 += np.square(x).sum(axis=(0, 1, 2))
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean * mean, 0.0))
    std = np.where(std > 0, std, 1.0)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _split_fold(train: Split, folds: int, fold: int, val_size, seed: int) -> tuple[Split, Split]:
    """Fold `fold` of a seeded stratified `folds`-fold partition of train as validation."""
    if val_size:
        raise DataError(f'folds={folds} makes the validation split itself; set val_size to 0 (got {val_size!r})')
    if not 2 <= folds <= len(train) or not 0 <= fold < folds:
        raise DataError(f'folds={folds}, fold={fold}: need 2 <= folds <= {len(train)} and 0 <= fold < folds')
    from sklearn.model_selection import StratifiedKFold

    splits = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros(len(train)), train.labels)
    idx_train, idx_val = list(splits)[fold]
    return (Split(train.images[idx_train], train.labels[idx_train]),
            Split(train.images[idx_val], train.labels[idx_val]))


def _split_validation(train: Split, val_size: float | int, seed: int) -> tuple[Split, Split | None]:
    """Carves a deterministic (stratified when possible) validation split from train."""
    picked = _val_indices(train.labels, val_size, seed)
    if picked is None:
        return train, None
    idx_train, idx_val = picked
    return (
        Split(train.images[idx_train], train.labels[idx_train]),
        Split(train.images[idx_val], train.labels[idx_val]),
    )


def _val_indices(labels: np.ndarray, val_size: float | int, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(sorted train indices, sorted validation indices) of a deterministic (stratified when
    possible) validation split of `labels`, or None for val_size 0."""
    n = len(labels)
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float, np.integer, np.floating)):
        raise DataError(f'val_size must be a fraction in (0, 1) or a count, got {val_size!r}')
    if val_size == 0:
        return None
    if 0 < val_size < 1:
        n_val = int(round(float(val_size) * n))
    elif val_size >= 1 and float(val_size).is_integer():
        n_val = int(val_size)
    else:
        raise DataError(f'val_size must be 0, a fraction in (0, 1) or a whole count >= 1, got {val_size!r}')
    if not 1 <= n_val < n:
        raise DataError(f'val_size={val_size!r} gives {n_val} validation examples; need 1..{n - 1} (train has {n})')
    from sklearn.model_selection import train_test_split

    idx = np.arange(n)
    try:
        idx_train, idx_val = train_test_split(idx, test_size=n_val, random_state=seed, stratify=labels)
    except ValueError:  # a class too small to stratify, or fewer val examples than classes
        perm = np.random.default_rng(seed).permutation(n)
        idx_val, idx_train = perm[:n_val], perm[n_val:]
    return np.sort(idx_train), np.sort(idx_val)


# ----------------------------------------------------------------- manual_dir readers


def _manual_hint(name: str) -> str:
    if name in ('mnist', 'fashion_mnist'):
        return ', '.join(f + '.gz' for f in _IDX_FILES) + ' (un-gzipped also accepted)'
    archive, folder = _CIFAR_ARCHIVES[name]
    return f'{archive} (or its extracted {folder}/ folder)'


def _load_manual(name: str, manual_dir: str) -> tuple[Split, Split]:
    if not os.path.isdir(manual_dir):
        raise DataError(f'{name}: manual_dir {manual_dir} is not a folder; it should hold {_manual_hint(name)}')
    try:
        if name in ('mnist', 'fashion_mnist'):
            return _load_idx_dir(name, manual_dir)
        return _load_cifar_dir(name, manual_dir)
    except DataError:
        raise
    except (OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError, tarfile.TarError) as e:
        raise DataError(f'{name}: could not read the archives in {manual_dir}: {type(e).__name__}: {e}') from e


def _load_idx_dir(name: str, manual_dir: str) -> tuple[Split, Split]:
    paths, missing = {}, []
    for stem in _IDX_FILES:
        for candidate in (stem + '.gz', stem):
            p = os.path.join(manual_dir, candidate)
            if os.path.isfile(p):
                paths[stem] = p
                break
        else:
            missing.append(stem + '.gz')
    if missing:
        raise DataError(
            f'{name}: manual_dir {manual_dir} lacks {", ".join(missing)}; expected {_manual_hint(name)}'
        )
    tr_x, tr_y, te_x, te_y = (_read_idx(paths[s]) for s in _IDX_FILES)
    for x, y, split in ((tr_x, tr_y, 'train'), (te_x, te_y, 't10k')):
        if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise DataError(f'{name}: {split} images {x.shape} and labels {y.shape} in {manual_dir} do not match')
    return (
        Split(np.ascontiguousarray(tr_x[..., None]), tr_y.astype(np.int32)),
        Split(np.ascontiguousarray(te_x[..., None]), te_y.astype(np.int32)),
    )


def _read_idx(path: str) -> np.ndarray:
    """Reads an IDX file (uint8 payload), gzipped or not."""
    with open(path, 'rb') as f:
        gz = f.read(2) == b'\x1f\x8b'
    with (gzip.open(path, 'rb') if gz else open(path, 'rb')) as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f'{path} is not an IDX file of unsigned bytes')
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data, '>u4', count=ndim, offset=4))
    size = int(np.prod(shape)) if shape else 1
    if len(data) - header != size:
        raise DataError(f'{path}: IDX header says shape {shape} but holds {len(data) - header} bytes')
    return np.frombuffer(data, np.uint8, count=size, offset=header).reshape(shape).copy()


def _cifar_members(name: str, manual_dir: str) -> dict[str, dict]:
    """Returns the unpickled batches of a CIFAR python archive (tar.gz or extracted folder)."""
    archive, folder = _CIFAR_ARCHIVES[name]
    wanted = (
        [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch'] if name == 'cifar10' else ['train', 'test']
    )
    found: dict[str, dict] = {}
    tar_path = os.path.join(manual_dir, archive)
    dir_path = os.path.join(manual_dir, folder)
    if os.path.isfile(tar_path):
        with tarfile.open(tar_path, 'r:*') as tar:
            for member in tar:
                base = os.path.basename(member.name)
                if member.isfile() and base in wanted and base not in found:
                    with tar.extractfile(member) as f:
                        found[base] = pickle.load(f, encoding='bytes')
        where = tar_path
    elif os.path.isdir(dir_path):
        for base in wanted:
            p = os.path.join(dir_path, base)
            if os.path.isfile(p):
                with open(p, 'rb') as f:
                    found[base] = pickle.load(f, encoding='bytes')
        where = dir_path
    else:
        raise DataError(f'{name}: manual_dir {manual_dir} lacks {archive}; expected {_manual_hint(name)}')
    missing = [w for w in wanted if w not in found]
    if missing:
        raise DataError(f'{name}: {where} lacks {", ".join(missing)}; expected the original {archive}')
    return found


def _cifar_split(batch: dict, label_key: bytes) -> Split:
    data = np.asarray(batch[b'data'], dtype=np.uint8)
    labels = np.asarray(batch[label_key], dtype=np.int32)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise DataError(f'unexpected CIFAR batch shapes: data {data.shape}, labels {labels.shape}')
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # channel-major rows -> NHWC
    return Split(np.ascontiguousarray(images), labels)


def _load_cifar_dir(name: str, manual_dir: str) -> tuple[Split, Split]:
    batches = _cifar_members(name, manual_dir)
    if name == 'cifar10':
        parts = [_cifar_split(batches[f'data_batch_{i}'], b'labels') for i in range(1, 6)]
        train = Split(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))
        test = _cifar_split(batches['test_batch'], b'labels')
    else:
        train = _cifar_split(batches['train'], b'fine_labels')
        test = _cifar_split(batches['test'], b'fine_labels')
    return train, test


# ------------------------------------------------------------------------ tfds path


def _host_reachable(scheme: str, host: str, port: int, timeout: float = _NETWORK_TIMEOUT_S) -> bool:
    """True if a TCP connection to host:port (or to the configured proxy) opens within ``timeout`` s.

    DNS resolution is included in the time limit (it runs in a daemon thread).
    """
    proxy = urllib.request.getproxies().get(scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        parsed = urllib.parse.urlsplit(proxy if '://' in proxy else 'http://' + proxy)
        host, port = parsed.hostname or host, parsed.port or (443 if parsed.scheme == 'https' else 80)
    result = []

    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except Exception:  # noqa: BLE001 - any failure means: cannot download
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _tfds_get_instructions(name: str, where: str) -> str:
    return (
        f'run `python -c "import tensorflow_datasets as tfds; tfds.builder(\'{name}\').download_and_prepare()"` '
        f'on a machine with internet and copy its ~/tensorflow_datasets to {where}, or set data_dir to a prepared tfds '
        f'directory, or manual_dir to a folder holding the original archives ({_manual_hint(name)})'
    )


def _import_tfds(name: str):
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(
            f'{name} needs tensorflow-datasets and tensorflow (pip install "kdjax[tfds]"; {e}), '
            f'or pass manual_dir=<folder holding {_manual_hint(name)}>, which needs neither'
        ) from e
    try:  # keep TensorFlow off accelerators: JAX owns them
        tf.config.set_visible_devices([], 'GPU')
    except (RuntimeError, ValueError):
        pass
    return tfds


def _tfds_mocked(tfds) -> bool:
    """True inside ``tfds.testing.mock_data`` (which makes download_and_prepare a no-op)."""
    fn = tfds.core.DatasetBuilder.download_and_prepare
    return getattr(fn, '__module__', '') == 'tensorflow_datasets.testing.mocking'


def _load_tfds(name: str, *, data_dir, download: bool) -> tuple[Split, Split]:
    tfds = _import_tfds(name)
    builder = tfds.builder(name, data_dir=None if data_dir is None else os.fspath(data_dir))
    where = str(builder.data_dir_root)
    if not builder.is_prepared() and not _tfds_mocked(tfds):
        if not download:
            raise DataError(
                f'{name} is not prepared in {where} and download=False: ' + _tfds_get_instructions(name, where)
            )
        scheme, host, port = _DOWNLOAD_HOSTS[name]
        if not _host_reachable(scheme, host, port):
            raise DataError(
                f'{name} is not prepared in {where} and cannot be downloaded (no network: {host}:{port} '
                f'unreachable within {_NETWORK_TIMEOUT_S:g} s): ' + _tfds_get_instructions(name, where)
            )
        try:
            builder.download_and_prepare()
        except Exception as e:  # noqa: BLE001 - tfds raises many kinds; report one line
            raise DataError(
                f'{name}: download/prepare into {where} failed ({type(e).__name__}: {e}); '
                + _tfds_get_instructions(name, where)
            ) from e
    return _tfds_split(tfds, builder, 'train'), _tfds_split(tfds, builder, 'test')


def _tfds_split(tfds, builder, split: str, batch_size: int = 1024) -> Split:
    """Reads one tfds split into numpy by iterating batches (never ``batch_size=-1``)."""
    ds = builder.as_dataset(split=split, shuffle_files=False)
    images, labels = [], []
    for batch in tfds.as_numpy(ds.batch(batch_size)):
        images.append(np.asarray(batch['image'], dtype=np.uint8))
        labels.append(np.asarray(batch['label'], dtype=np.int32))
    if not images:
        h, w, c = builder.info.features['image'].shape
        return Split(np.zeros((0, h, w, c), np.uint8), np.zeros((0,), np.int32))
    return Split(np.concatenate(images), np.concatenate(labels))
