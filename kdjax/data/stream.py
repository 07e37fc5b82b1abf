"""The streamed input path: image-folder splits (``kdjax.data.folder.FileSplit``) and tfds
ArrayRecord splits (``kdjax.data.records.RecordSplit``) decoded, cropped and batched on Grain
workers (PyPI ``grain``; TF-free), in the batch contract of the in-memory path. A split gives the
loader ``len``, ``labels``, ``image_size`` and ``encoded(i)``: a file path or the record's encoded
JPEG/PNG bytes, both decoded by the same PIL code (``train_image``, ``eval_image``).

Training batches (``TrainLoader``) are a Grain ``MapDataset`` over this process's example
*positions* in the run (position = step * b + row, b = global batch / processes):

    MapDataset.range(start_step * b, total_steps * b)
      .map(position -> (epoch, step, row) -> example index -> decode + random-resized crop + flip)
      .batch(b)
      .to_iter_dataset(ReadOptions(num_threads=1)).mp_prefetch(num_workers)

The example index of a position is ``kdjax.data.batch_indices`` (the global permutation of epoch
``e`` by ``(seed, e)``, this process's contiguous part of each global batch): the same order as an
in-memory data set, and each process reads only its own files (records). The crop and flip of an
example are drawn from ``np.random.default_rng((seed, epoch, index, CROP_STREAM))``, so they are replayable
(the same (seed, epoch, example) always gets the same crop, whichever process or worker reads it).
Batch ``k`` is therefore a pure function of (seed, k): a resumed run starts the pipeline at its
checkpoint's step and sees exactly the batches an uninterrupted run sees; no iterator state is
checkpointed. Grain slices the batches round-robin over its workers and returns them in order, so
the number of workers changes the speed, never a batch.

Images stay uint8 here; normalisation, mixup / CutMix and the strong view run inside the jitted
step. Evaluation (``eval_batches``) is resize (shorter side to ``image_size / EVAL_CROP_FRACTION``,
bilinear) + center crop, on ``threads`` threads of the main process, padded and masked as
``kdjax.data.eval_batches``.

Worker processes: a loader is closed in the trainer's ``finally``; each worker also watches its
parent (``_watch_parent``) and exits within ``PARENT_POLL_S`` once the parent is gone, so a
SIGKILLed run leaves no workers behind. Entry points that start workers need the usual
``if __name__ == '__main__':`` guard (Grain spawns them).
"""

from __future__ import annotations

import io
import math
import os
import threading
import time

import numpy as np

from kdjax.data.batches import batch_indices, num_eval_batches
from kdjax.data.sources import DataError

#: The stream of `np.random.default_rng((seed, epoch, index, CROP_STREAM))` that draws crops and flips.
CROP_STREAM = 0x6372
#: torchvision's ImageNet recipe: eval resizes to 256 and center-crops 224 (224 / 256 = 0.875).
EVAL_CROP_FRACTION = 0.875
#: RandomResizedCrop's defaults (torchvision, timm): area fraction and aspect-ratio range, attempts.
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
RRC_ATTEMPTS = 10
PARENT_POLL_S = 0.5


def crop_params(rng: np.random.Generator, height: int, width: int, scale=RRC_SCALE, ratio=RRC_RATIO):
    """(top, left, h, w) of a random-resized crop, torchvision's ``RandomResizedCrop.get_params``
    algorithm: up to 10 draws of an area fraction ~ U(scale) and a log-uniform aspect ratio, the
    first that fits; else the whole image clipped to the ratio range, centered."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(RRC_ATTEMPTS):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _open_rgb(source, what: str | None = None):
    """The RGB PIL image of `source`: a file path (an image folder) or the encoded bytes of a record
    (a tfds ArrayRecord data set); `what` names it in the refusal (default: the path)."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        image.load()
    except (OSError, ValueError, SyntaxError) as e:
        fix = 'delete or replace it' if what is None else 'prepare the data set again'
        raise DataError(f'{source if what is None else what} is not a readable JPEG/PNG image '
                        f'({type(e).__name__}: {e}); {fix}') from None
    if image.mode != 'RGB':  # grayscale, palette, RGBA, CMYK, 16-bit
        image = image.convert('RGB')
    return image


def train_view(source, size: int, rng: np.random.Generator, flip: bool, what: str | None = None) -> tuple[np.ndarray, tuple]:
    """(uint8 (size, size, 3), (top, left, h, w, flipped)): the decoded image's random-resized crop
    (bilinear) and, if `flip`, a horizontal flip with probability 1/2 (all draws from `rng`), with
    the crop's parameters (what `kdjax.data.store` checks its soft labels against). `source`: a
    file path or the encoded JPEG/PNG bytes (one code path for folders and records; `what` names it
    in a refusal)."""
    from PIL import Image

    image = _open_rgb(source, what)
    top, left, h, w = crop_params(rng, image.height, image.width)
    out = np.asarray(image.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h)), np.uint8)
    flipped = bool(flip and rng.random() < 0.5)
    if flipped:
        out = out[:, ::-1]
    return np.ascontiguousarray(out), (top, left, h, w, int(flipped))


def train_image(source, size: int, rng: np.random.Generator, flip: bool, what: str | None = None) -> np.ndarray:
    """The image of `train_view`: uint8 (size, size, 3)."""
    return train_view(source, size, rng, flip, what)[0]


def pack_crop(top: int, left: int, h: int, w: int, flipped: int) -> np.int64:
    """A crop's parameters in one int64, losslessly (15 bits each for top, left, h, w; 1 for the
    flip): sides up to 32767 pixels, a one-line DataError beyond."""
    if not all(0 <= v < 2**15 for v in (top, left, h, w)):
        raise DataError(f'an image side exceeds 32767 pixels (crop {top, left, h, w}); resize the folder\'s images')
    return np.int64((((top << 15 | left) << 15 | h) << 15 | w) << 1 | int(flipped))


def eval_image(source, size: int, what: str | None = None) -> np.ndarray:
    """uint8 (size, size, 3): shorter side resized to round(size / EVAL_CROP_FRACTION) (bilinear),
    then the center size x size crop. `source`, `what`: as `train_image`."""
    from PIL import Image

    image = _open_rgb(source, what)
    short = int(round(size / EVAL_CROP_FRACTION))
    w, h = image.size
    nw, nh = (short, max(short, int(short * h / w))) if w <= h else (max(short, int(short * w / h)), short)
    image = image.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), np.uint8)


class _TrainExample:
    """Position in this process's stream -> one decoded, augmented example (picklable for Grain's
    spawned workers; a deterministic repr, as Grain compares reprs)."""

    def __init__(self, split, global_batch: int, seed: int, steps_per_epoch: int, flip: bool,
                 process_index: int, process_count: int, crops: bool = False):
        self.split, self.labels, self.size = split, split.labels, split.image_size
        self.global_batch, self.seed, self.spe, self.flip = global_batch, seed, steps_per_epoch, flip
        self.crops = crops
        self.process_index, self.process_count = process_index, process_count
        self.per_process = global_batch // process_count

    def __call__(self, position):
        step, row = divmod(int(position), self.per_process)
        epoch, in_epoch = divmod(step, self.spe)
        index = int(batch_indices(len(self.split), self.global_batch, seed=self.seed, epoch=epoch,
                                  step_in_epoch=in_epoch, process_index=self.process_index,
                                  process_count=self.process_count)[row])
        rng = np.random.default_rng((self.seed, epoch, index, CROP_STREAM))
        source, what = self.split.encoded(index)
        image, crop = train_view(source, self.size, rng, self.flip, what)
        example = {'image': image, 'label': np.int32(self.labels[index]), 'index': np.int32(index)}
        if self.crops:
            example['crop'] = pack_crop(*crop)
        return example

    def __repr__(self):
        return (f'_TrainExample({self.split!r}, size={self.size}, batch={self.global_batch}, seed={self.seed}, '
                f'flip={self.flip}, process={self.process_index}/{self.process_count}, crops={self.crops})')


class _EvalExample:
    """Row of this process's padded eval stream -> (image, label, mask)."""

    def __init__(self, split, global_batch: int, process_index: int, process_count: int):
        self.split, self.labels, self.size = split, split.labels, split.image_size
        self.global_batch, self.per_process, self.process_index = global_batch, global_batch // process_count, process_index

    def __call__(self, k):
        b, row = divmod(int(k), self.per_process)
        i = b * self.global_batch + self.process_index * self.per_process + row
        if i >= len(self.split):
            return np.zeros((self.size, self.size, 3), np.uint8), np.int32(0), np.float32(0.0)
        source, what = self.split.encoded(i)
        return eval_image(source, self.size, what), np.int32(self.labels[i]), np.float32(1.0)

    def __repr__(self):
        return f'_EvalExample({self.split!r}, size={self.size}, batch={self.global_batch})'


def _watch_parent(worker_index: int, worker_count: int) -> None:
    """Grain's worker_init_fn: a daemon thread that ends this worker once its parent is gone (the
    parent was SIGKILLed, so no `finally` closed the loader)."""
    del worker_index, worker_count
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name='kdjax-parent-watch').start()


def _absl_flags_ready() -> None:
    """Grain's workers read an absl flag (--grain_enable_multiprocess_worker_profiling): outside
    absl.app.run (pytest, a notebook, a plain script) the flags are unparsed and reading one raises
    UnparsedFlagAccessError, so they are marked parsed (at their defaults) here."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def check_workers(workers: int) -> int:
    """`workers` if 0 <= workers <= this machine's cores, else a one-line DataError."""
    cores = os.cpu_count() or 1
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or not 0 <= workers <= cores:
        raise DataError(f'dataset.loader_workers={workers!r}: this machine has {cores} cores; choose 0 (decode in '
                        f'the training process) to {cores}')
    return int(workers)


def default_workers() -> int:
    """Loader workers when config.dataset.loader_workers is unset: all cores but one (at least 1)."""
    return max(1, (os.cpu_count() or 1) - 1)


class TrainLoader:
    """This process's training batches from `start_step` to `total_steps`, in order (see the module
    docstring); iterate it, and close it (or use it as a context manager) to end its workers.
    `crops`: each batch also carries 'crop', int64 (b,), every example's `pack_crop`."""

    def __init__(self, split, global_batch: int, *, seed: int, start_step: int, total_steps: int,
                 steps_per_epoch: int, flip: bool, workers: int, process_index: int = 0, process_count: int = 1,
                 buffer: int = 2, crops: bool = False):
        import grain

        workers = check_workers(workers)
        if global_batch % process_count:
            raise DataError(f'global batch size {global_batch} is not divisible by {process_count} processes')
        per = global_batch // process_count
        ds = grain.MapDataset.range(start_step * per, total_steps * per)
        ds = ds.map(_TrainExample(split, global_batch, seed, steps_per_epoch, flip, process_index, process_count, crops))
        ds = ds.batch(per, drop_remainder=True)
        # One read thread per worker: Grain's default 16 threads in each worker oversubscribe the cores.
        it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=buffer))
        if workers:
            _absl_flags_ready()
            it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=buffer),
                                      worker_init_fn=_watch_parent)
        self._it = iter(it_ds)
        self.workers = workers

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._it)

    def close(self) -> None:
        close = getattr(self._it, 'close', None)
        if close is not None:
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def eval_batches(split, global_batch_size: int, *, process_index: int = 0, process_count: int = 1,
                 threads: int = 1):
    """`kdjax.data.eval_batches` for a FileSplit: yields (images uint8 (b,H,W,C), labels int32 (b,),
    mask float32 (b,)), b = global_batch_size // process_count, decoded on `threads` threads."""
    import grain

    if global_batch_size <= 0 or global_batch_size % process_count:
        raise DataError(f'global batch size {global_batch_size} is not a positive multiple of {process_count} processes')
    per = global_batch_size // process_count
    ds = grain.MapDataset.range(num_eval_batches(len(split), global_batch_size) * per)
    ds = ds.map(_EvalExample(split, global_batch_size, process_index, process_count)).batch(per)
    it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, int(threads)), prefetch_buffer_size=4)))
    for images, labels, mask in it:
        yield images, labels, mask
