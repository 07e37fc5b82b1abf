"""tfds data sets prepared as ArrayRecord, streamed through Grain with no TensorFlow at read time.

``dataset.name='tfds:<name>'`` with ``dataset.data_dir`` the tfds data directory the data set was
prepared in (``<name>`` as tfds spells it, optionally with a config and version:
``tfds:cifar10``, ``tfds:imagenet2012``, ``tfds:my_set/small:1.0.0``). The data set must already be
prepared there with ``file_format='array_record'`` (docs/data.md shows how; preparing may use
TensorFlow); kdjax never downloads or prepares it. Reading is tfds' data source
(``builder.as_data_source``, what ``tfds.data_source`` returns: random access by record index, the
``array_record`` reader, tfds' numpy example parser): TensorFlow is not
imported (``tests/test_records.py`` runs a whole KD run with TensorFlow made unimportable).

What is read from the builder's ``info``:

* the image feature: the ``tfds.features.Image`` of ``info.supervised_keys`` if it names one, else
  the one called ``image``, else the only Image feature; the label feature likewise among the
  ``tfds.features.ClassLabel`` features (``label``). No such feature, or several and nothing to
  choose one, is refused in one line. The image is read as its encoded bytes
  (``tfds.decode.SkipDecoding``) and decoded by PIL on the loader workers exactly as an image
  folder's files (``kdjax.data.stream``: RGB, random-resized crop, flip; eval: resize + center crop).
* the class count ``num_classes`` of the ClassLabel (its names are logged);
* the splits: ``train``, and as kdjax's test split tfds' ``test``, else ``validation`` (ImageNet's
  is ``validation``). ``dataset.val_size`` carves a validation split from train exactly as for an
  image folder (stratified, seeded).

The labels of every record of both splits are needed when the data set is loaded (every process
orders, carves and scores examples as the in-memory path does). The first load reads them in one
pass over the records (image bytes not decoded; a cost that grows with the data set: it reads
every record's bytes, docs/data.md) and keeps them in the label cache, ``labels/<key>.npz`` under
``cache_root()`` ($KDJAX_CACHE_DIR, else $XDG_CACHE_HOME/kdjax, else ~/.cache/kdjax). The key
names the data set's full name and version, the split, the label feature and the name and size of
each of the split's ArrayRecord files, so a data set prepared again (other files) is read again; a
cache file that does not describe the split is ignored and replaced. Later loads, on that
machine, read only that file. Training and evaluation then read, in each process, only that
process's records by index.

Normalisation statistics: ImageNet's, as for an image folder (computing the data set's own would
decode every image).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import zipfile

import numpy as np
from absl import logging

from kdjax.data.sources import DataError, TFDS_PREFIX

#: The tfds splits used as kdjax's test split, the first present.
TEST_SPLITS = ('test', 'validation')
#: Records whose labels are read in one call at load time.
LABEL_CHUNK = 4096


class RecordSplit:
    """One split of a tfds ArrayRecord data set: record indices and labels, decoded by the loader.

    Attributes:
      name: the tfds name (without ``tfds:``).
      data_dir: the tfds data directory.
      split: the tfds split ('train', 'test', 'validation').
      indices: int64 (N,) record indices in that split (a subset once a validation split is carved).
      labels: int32 (N,) class indices.
      image_key: the image feature's name.
      image_size: side of the square images the loader produces.
      train: whether the loader applies the training augmentation or the evaluation transform.

    The ``tfds.data_source`` is opened on first read in each process (a worker opens its own; it
    is not pickled).
    """

    def __init__(self, name: str, data_dir: str, split: str, indices: np.ndarray, labels: np.ndarray,
                 image_key: str, image_size: int, train: bool):
        self.name, self.data_dir, self.split = name, data_dir, split
        self.indices, self.labels = np.asarray(indices, np.int64), np.asarray(labels, np.int32)
        self.image_key, self.image_size, self.train = image_key, int(image_size), bool(train)
        self._source, self._lock = None, threading.Lock()

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def num_examples(self) -> int:
        return len(self)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, 3)

    def source(self):
        """This process's ``tfds.data_source`` of the split (images as their encoded bytes)."""
        if self._source is None:
            with self._lock:
                if self._source is None:
                    self._source = open_source(self.name, self.data_dir, self.split, self.image_key)
        return self._source

    def encoded(self, i: int) -> tuple[bytes, str]:
        """(the encoded image of example `i`, how a refusal names it)."""
        record = int(self.indices[i])
        return self.source()[record][self.image_key], f'record {record} of {self.name} {self.split!r} in {self.data_dir}'

    def subset(self, idx: np.ndarray, train: bool | None = None) -> 'RecordSplit':
        return RecordSplit(self.name, self.data_dir, self.split, self.indices[idx], self.labels[idx], self.image_key,
                           self.image_size, self.train if train is None else train)

    def __getstate__(self):
        state = dict(self.__dict__)
        state['_source'] = state['_lock'] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # deterministic (Grain compares reprs of data sources)
        return (f'RecordSplit({TFDS_PREFIX}{self.name} {self.split!r}, {len(self)} records, '
                f'image_size={self.image_size}, train={self.train})')


def open_source(name: str, data_dir: str, split: str, image_key: str):
    """The ArrayRecord data source of one prepared split (``builder.as_data_source``, what
    ``tfds.data_source`` returns), the image feature left encoded; never downloads."""
    import tensorflow_datasets as tfds

    return tfds.builder(name, data_dir=data_dir).as_data_source(
        split=split, decoders={image_key: tfds.decode.SkipDecoding()}, file_format=tfds.core.FileFormat.ARRAY_RECORD)


def _builder(tfds, name: str, root: str):
    """The prepared ArrayRecord builder of `name` in `root`, or a one-line DataError."""
    hint = (f"prepare it with tfds.builder({name!r}, data_dir={root!r}, file_format='array_record')"
            '.download_and_prepare() (docs/data.md)')
    try:
        builder = tfds.builder(name, data_dir=root)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(f'tfds data set {name!r} is neither prepared in {root} nor known to tfds; {hint}') from None
    except (ValueError, OSError, AssertionError) as e:
        first = (str(e).strip().splitlines() or [''])[0]
        raise DataError(f'tfds data set {name!r} in {root}: {type(e).__name__}: {first}') from None
    if not builder.is_prepared():
        raise DataError(f'tfds data set {name!r} is not prepared in {root}; {hint}')
    formats = builder.info.available_file_formats()  # the prepared format and any converted alongside
    if tfds.core.FileFormat.ARRAY_RECORD not in formats:
        shown = ' and '.join(sorted(getattr(f, 'value', str(f)) for f in formats)) or 'no known format'
        raise DataError(f'tfds data set {name!r} in {builder.data_dir} is prepared as {shown}, not array_record, '
                        f'which kdjax reads by record index; prepare it again into another data_dir '
                        f"with file_format='array_record'")
    return builder


def _feature(info, kind, default: str, what: str, name: str) -> str:
    """The name of the top-level feature of type `kind` that holds the `what` (see the module docstring)."""
    features = info.features
    found = sorted(k for k, f in features.items() if isinstance(f, kind))
    keys = info.supervised_keys
    position = 0 if default == 'image' else 1
    if isinstance(keys, (tuple, list)) and len(keys) == 2 and isinstance(keys[position], str) and keys[position] in found:
        return keys[position]
    if default in found:
        return default
    if len(found) == 1:
        return found[0]
    listed = ', '.join(f'{k}: {type(features[k]).__name__}' for k in sorted(features.keys()))
    if not found:
        raise DataError(f'tfds data set {name!r} has no {kind.__name__} feature ({what}); its features: {listed}. '
                        f'kdjax streams image classification data sets (an Image and a ClassLabel feature)')
    raise DataError(f'tfds data set {name!r} has {len(found)} {kind.__name__} features ({", ".join(found)}), none '
                    f'called {default!r} nor named by supervised_keys, so its {what} is ambiguous')


def read_labels(source, label_key: str, n: int) -> np.ndarray:
    """int32 (n,): the label of every record of `source`, read in chunks of LABEL_CHUNK."""
    labels = np.empty(n, np.int32)
    for start in range(0, n, LABEL_CHUNK):
        rows = source.__getitems__(list(range(start, min(n, start + LABEL_CHUNK))))
        labels[start:start + len(rows)] = [int(r[label_key]) for r in rows]
    return labels


def cache_root() -> str:
    """The folder of kdjax's caches on this machine: $KDJAX_CACHE_DIR, else $XDG_CACHE_HOME/kdjax, else
    ~/.cache/kdjax (a gs:// folder works too: everything goes through kdjax.paths)."""
    explicit = os.environ.get('KDJAX_CACHE_DIR')
    if explicit:
        return os.path.expanduser(explicit)
    return os.path.join(os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'kdjax')


def _describe(builder, split: str, label_key: str, n: int) -> str:
    """What identifies one split's labels (the label cache's key, see the module docstring)."""
    from kdjax import paths

    folder = str(builder.data_dir)
    prefix = f'{builder.name}-{split}.array_record'
    files = sorted(f for f in paths.listdir(folder) if f.startswith(prefix))
    return json.dumps({'dataset': builder.info.full_name, 'split': split, 'label': label_key, 'records': n,
                       'files': [[f, paths.getsize(f'{folder}/{f}')] for f in files]}, sort_keys=True)


def split_labels(builder, split: str, label_key: str, source) -> tuple[np.ndarray, str]:
    """(int32 labels of every record of `split`, where they came from, for the log). Read from the
    label cache when it holds this split, else read from the records and kept there."""
    from kdjax import paths

    described = _describe(builder, split, label_key, len(source))
    path = f'{cache_root()}/labels/{hashlib.sha256(described.encode()).hexdigest()[:32]}.npz'
    try:
        with paths.load_npz(path) as kept:
            labels = np.asarray(kept['labels'], np.int32)
            if str(kept['describes']) == described and labels.shape == (len(source),):
                return labels, f'from the label cache {path}'
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        pass  # no cache yet, or one that does not hold this split: read the records
    labels = read_labels(source, label_key, len(source))
    try:
        paths.save_npz(path, labels=labels, describes=np.array(described))
    except OSError as e:
        logging.warning('could not keep the labels of %s %r in the label cache %s (%s); the next load reads the '
                        'records again (set KDJAX_CACHE_DIR to a writable folder)', builder.name, split, path, e)
        return labels, 'read from the records'
    return labels, f'read from the records, kept in {path}'


def load_records(name: str, data_dir, *, image_size: int | None = None, val_size: float | int = 0, seed: int = 0):
    """The ``Dataset`` of ``name`` ('tfds:<tfds name>') prepared as ArrayRecord in ``data_dir``.
    Raises DataError (one line) for a missing data_dir, a data set not prepared there or not as
    ArrayRecord, no image or label feature, or no train / test split."""
    from kdjax.data.folder import DEFAULT_IMAGE_SIZE
    from kdjax.data.sources import NORMALIZATIONS, Dataset, _val_indices

    tname = name[len(TFDS_PREFIX):].strip()
    if not tname:
        raise DataError(f'dataset.name={name!r} names no tfds data set: give tfds:<name>, e.g. tfds:cifar10')
    if not data_dir:
        raise DataError(f'dataset {name!r} reads a tfds data set prepared as ArrayRecord: set config.dataset.data_dir '
                        'to the tfds data_dir it was prepared in (e.g. ~/tensorflow_datasets)')
    root = os.path.expanduser(os.fspath(data_dir))
    if '://' not in root:
        root = os.path.abspath(root)
        if not os.path.isdir(root):
            raise DataError(f'data_dir {root} does not exist or is not a folder')
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(f"dataset {name!r} is read with tensorflow-datasets, which is not installed: "
                        "pip install 'kdjax[arrayrecord]'") from None
    builder = _builder(tfds, tname, root)
    info = builder.info
    image_key = _feature(info, tfds.features.Image, 'image', 'the images', tname)
    label_key = _feature(info, tfds.features.ClassLabel, 'label', 'the labels', tname)
    image = info.features[image_key]
    if np.dtype(image.np_dtype) != np.uint8:
        raise DataError(f'tfds data set {tname!r}: image feature {image_key!r} is {np.dtype(image.np_dtype)}; kdjax '
                        'streams uint8 JPEG/PNG images')
    splits = sorted(info.splits.keys())
    test_split = next((s for s in TEST_SPLITS if s in splits), None)
    if 'train' not in splits or test_split is None:
        raise DataError(f'tfds data set {tname!r} has splits {", ".join(splits) or "none"}; kdjax needs train and '
                        'test (or validation, used as the test split)')
    num_classes = int(info.features[label_key].num_classes)
    size = DEFAULT_IMAGE_SIZE if image_size is None else int(image_size)
    made = {}
    for split, train in (('train', True), (test_split, False)):
        start = time.perf_counter()
        source = open_source(tname, root, split, image_key)
        if not len(source):
            raise DataError(f'tfds data set {tname!r}: split {split!r} has no records')
        labels, came = split_labels(builder, split, label_key, source)
        if labels.min() < 0 or labels.max() >= num_classes:
            raise DataError(f'tfds data set {tname!r} {split}: labels outside [0, {num_classes})')
        logging.info('%s%s %r: the labels of %d records %s in %.2f s', TFDS_PREFIX, tname, split, len(labels), came,
                     time.perf_counter() - start)
        made[split] = RecordSplit(tname, root, split, np.arange(len(labels)), labels, image_key, size, train)
    names = info.features[label_key].names
    logging.info('%s%s: image feature %r, label feature %r, %d classes (%s%s), test split %r', TFDS_PREFIX, tname,
                 image_key, label_key, num_classes, ', '.join(names[:10]), ', ...' if len(names) > 10 else '', test_split)
    train, test = made['train'], made[test_split]
    val = None
    picked = _val_indices(train.labels, val_size, seed)
    if picked is not None:
        idx_train, idx_val = picked
        train, val = train.subset(idx_train), train.subset(idx_val, train=False)
    return Dataset(name=name, train=train, val=val, test=test, num_classes=num_classes,
                   mean=NORMALIZATIONS['imagenet'][0], std=NORMALIZATIONS['imagenet'][1])
