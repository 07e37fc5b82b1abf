"""Image-folder sources: data sets too large for host memory, read file by file (``kdjax.data.stream``).

Layout (torchvision's ``ImageFolder``; ImageNet-1k as the usual preparation script leaves it)::

    ROOT/train/<class>/<file>      the training split
    ROOT/val/<class>/<file>        the evaluation split (kdjax's 'test' split), or ROOT/test/...

Class index = position of the class folder's name in the sorted list of ``train``'s class folders
(as torchvision). Files are JPEG or PNG (by extension, case-insensitive: .jpg .jpeg .png);
grayscale, palette, RGBA and CMYK images are converted to RGB when decoded. A file with another
extension (``.txt``, ``.DS_Store``, a ``.csv`` of labels) is skipped and counted in one warning:
such files are common beside images and are not images, while refusing them would make a user
clean a 1.28M-file tree for a README. A file with an image extension that does not decode is
refused when it is read, naming the file (it is data the user meant to train on).

Nothing is decoded here: a ``FileSplit`` holds the sorted file paths and labels; the loader
workers decode, crop and resize (``kdjax.data.stream``). ``dataset.val_size`` carves a validation
split from train exactly as for the in-memory data sets (stratified, seeded).

Normalisation statistics: ImageNet's (mean 0.485, 0.456, 0.406; std 0.229, 0.224, 0.225, the
constants of torchvision's and timm's ImageNet recipes) for every folder: computing a folder's own
would need a pass over every image.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from absl import logging

from kdjax.data.sources import NORMALIZATIONS, DataError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
TEST_SPLIT_DIRS = ('val', 'test')  # the first present is the evaluation split
IMAGENET_CLASSES = 1000
DEFAULT_IMAGE_SIZE = 224


@dataclasses.dataclass(frozen=True, eq=False)
class FileSplit:
    """One split of an image folder: file paths and labels, decoded by the loader.

    Attributes:
      files: absolute paths, sorted by (class, file name).
      labels: int32 (N,) class indices.
      image_size: side of the square images the loader produces.
      train: whether the loader applies the training augmentation (random-resized crop, flip)
        or the evaluation transform (resize, center crop).
    """

    files: tuple[str, ...]
    labels: np.ndarray
    image_size: int
    train: bool

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_examples(self) -> int:
        return len(self)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, 3)

    def encoded(self, i: int) -> tuple[str, None]:
        """(what the loader decodes for example `i`: its path, how a refusal names it: by the path)."""
        return self.files[i], None

    def subset(self, idx: np.ndarray, train: bool | None = None) -> 'FileSplit':
        return FileSplit(tuple(self.files[i] for i in idx), self.labels[idx], self.image_size,
                         self.train if train is None else train)

    def __repr__(self) -> str:  # deterministic (Grain compares reprs of data sources)
        return f'FileSplit({len(self.files)} files, image_size={self.image_size}, train={self.train})'


def _scan(split_dir: str, classes: list[str] | None) -> tuple[list[str], list[str], list[int], int]:
    """(classes, files, labels, skipped non-image files) of one split folder."""
    found = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if classes is None:
        classes = found
    files, labels, skipped = [], [], 0
    for label, name in enumerate(classes):
        folder = os.path.join(split_dir, name)
        if not os.path.isdir(folder):
            continue
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if not entry.is_file():
                continue
            if entry.name.lower().endswith(IMAGE_EXTENSIONS):
                files.append(entry.path)
                labels.append(label)
            else:
                skipped += 1
    return found, files, labels, skipped


def load_folder(name: str, data_dir, *, image_size: int | None = None, val_size: float | int = 0,
                seed: int = 0):
    """The ``Dataset`` of an image folder (``name`` 'folder', or 'imagenet2012', which also checks
    that train has ImageNet-1k's 1000 classes). Raises DataError (one line) for a missing folder,
    an empty split, or splits whose class folders differ."""
    from kdjax.data.sources import Dataset, _val_indices

    if not data_dir:
        raise DataError(f'dataset {name!r} reads an image folder: set config.dataset.data_dir to its ROOT '
                        '(ROOT/train/<class>/<image>, ROOT/val/<class>/<image>)')
    root = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
    if not os.path.isdir(root):
        raise DataError(f'data_dir {root} does not exist or is not a folder')
    size = DEFAULT_IMAGE_SIZE if image_size is None else int(image_size)
    train_dir = os.path.join(root, 'train')
    test_dir = next((os.path.join(root, d) for d in TEST_SPLIT_DIRS if os.path.isdir(os.path.join(root, d))), None)
    if not os.path.isdir(train_dir) or test_dir is None:
        raise DataError(f'{root} needs a train/ folder and a val/ (or test/) folder, each with one folder per class; '
                        f'found: {", ".join(sorted(os.listdir(root))) or "nothing"}')
    classes, files, labels, skipped = _scan(train_dir, None)
    if not classes or not files:
        raise DataError(f'{train_dir} has no class folders with .jpg/.jpeg/.png images')
    test_classes, test_files, test_labels, test_skipped = _scan(test_dir, classes)
    if test_classes != classes:
        only_train = sorted(set(classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(classes))
        what = (f'{len(only_test)} class(es) train/ lacks: {", ".join(only_test[:5])}' if only_test else
                f'lacks {len(only_train)} class(es) of train/: {", ".join(only_train[:5])}')
        raise DataError(f'{test_dir} {what}; both splits need the same class folders')
    if not test_files:
        raise DataError(f'{test_dir} has no .jpg/.jpeg/.png images')
    empty = [c for c in classes if c not in {classes[i] for i in set(labels)}]
    if empty:
        raise DataError(f'{train_dir}: class folder(s) without images: {", ".join(empty[:5])}')
    if name == 'imagenet2012' and len(classes) != IMAGENET_CLASSES:
        raise DataError(f'dataset imagenet2012: {train_dir} has {len(classes)} class folders, ImageNet-1k has '
                        f'{IMAGENET_CLASSES}; use dataset.name=folder for another folder')
    if skipped + test_skipped:
        logging.warning('%s: skipped %d file(s) that are not .jpg/.jpeg/.png (%d in train/, %d in %s/)', root,
                        skipped + test_skipped, skipped, test_skipped, os.path.basename(test_dir))
    train = FileSplit(tuple(files), np.asarray(labels, np.int32), size, True)
    test = FileSplit(tuple(test_files), np.asarray(test_labels, np.int32), size, False)
    val = None
    picked = _val_indices(train.labels, val_size, seed)
    if picked is not None:
        idx_train, idx_val = picked
        train, val = train.subset(idx_train), train.subset(idx_val, train=False)
    return Dataset(name=name, train=train, val=val, test=test, num_classes=len(classes),
                   mean=NORMALIZATIONS['imagenet'][0], std=NORMALIZATIONS['imagenet'][1])
