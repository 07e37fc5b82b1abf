"""kdjax.data: the data a run trains and evaluates on, and the batches its steps see.

* `kdjax.data.sources`: the in-memory data sets (digits offline; mnist, fashion_mnist, cifar10,
  cifar100 through tfds or their original archives in ``manual_dir``), their train / validation /
  test ``Split``s and normalisation statistics: ``load`` -> ``Dataset``; ``with_normalization``
  swaps in the named statistics published weights expect.
* `kdjax.data.batches`: host batches of a split, a pure function of (seed, step), in the one batch
  contract {'image' uint8 (b, H, W, C), 'label' int32 (b,), 'index' int32 (b,)} (+ 'teacher' with a
  teacher cache); fixed-shape masked evaluation batches.
* `kdjax.data.augmentation`: what runs inside the jitted step: ``normalize``, the weak and strong
  augmented views, mixup and CutMix.
* `kdjax.data.folder`: image folders (``folder``, ``imagenet2012``): ``FileSplit``s of file paths and
  labels, for data sets too large for host memory.
* `kdjax.data.records`: tfds data sets prepared as ArrayRecord (``tfds:<name>``): ``RecordSplit``s of
  record indices and labels, read by ``tfds.data_source`` without TensorFlow.
* `kdjax.data.stream`: the streamed path on Grain: ``TrainLoader`` (decode, random-resized crop and
  flip on worker processes; batch k a pure function of (seed, k)) and the eval transform.
* `kdjax.data.cache`: the frozen teacher's outputs computed once, carried by the batches.
* `kdjax.data.store`: on streamed data, the teacher's (top-k) soft labels of every (example,
  epoch-crop) computed once before the stage and joined to the batches by position (FKD).

Every public name is importable from here (``from kdjax import data; data.load(...)``). Nothing
here reads flags or configs: everything is a plain argument.
"""

from kdjax.data.sources import DATASETS
from kdjax.data.sources import IN_MEMORY_DATASETS
from kdjax.data.sources import STREAMED_DATASETS
from kdjax.data.sources import TFDS_PREFIX
from kdjax.data.sources import is_known
from kdjax.data.sources import is_streamed
from kdjax.data.sources import DIGITS_SPLIT_SEED
from kdjax.data.sources import DIGITS_TEST_FRACTION
from kdjax.data.sources import DataError
from kdjax.data.sources import Dataset
from kdjax.data.sources import Split
from kdjax.data.sources import NORMALIZATIONS
from kdjax.data.sources import load
from kdjax.data.sources import with_normalization

from kdjax.data.batches import batch_indices
from kdjax.data.batches import eval_batches
from kdjax.data.batches import num_eval_batches
from kdjax.data.batches import steps_per_epoch
from kdjax.data.batches import train_batch

from kdjax.data.augmentation import CUTOUT_FILL
from kdjax.data.augmentation import RANDAUGMENT_OPS
from kdjax.data.augmentation import augment
from kdjax.data.augmentation import cutmix
from kdjax.data.augmentation import cutout
from kdjax.data.augmentation import mixup
from kdjax.data.augmentation import normalize
from kdjax.data.augmentation import rand_augment
from kdjax.data.augmentation import strong_augment

from kdjax.data.folder import FileSplit
from kdjax.data import stream

from kdjax.data.cache import CACHE_MAX_BYTES
from kdjax.data.cache import CACHE_MODES
from kdjax.data.cache import cache_obstacle
from kdjax.data.cache import fingerprint
from kdjax.data.cache import teacher_cache
from kdjax.data import store

__all__ = [
    "DATASETS", "IN_MEMORY_DATASETS", "STREAMED_DATASETS", "TFDS_PREFIX", "is_known", "is_streamed", "FileSplit", "DIGITS_SPLIT_SEED", "DIGITS_TEST_FRACTION", "DataError", "Dataset", "Split", "NORMALIZATIONS", "load", "with_normalization",
    "batch_indices", "eval_batches", "num_eval_batches", "steps_per_epoch", "train_batch",
    "CUTOUT_FILL", "RANDAUGMENT_OPS", "augment", "cutmix", "cutout", "mixup", "normalize", "rand_augment",
    "strong_augment",
    "CACHE_MAX_BYTES", "CACHE_MODES", "cache_obstacle", "fingerprint", "teacher_cache",
]
