"""Host batches of the in-memory splits, in the one batch contract of the train and eval steps.

A training batch is a dict {'image': uint8 (b, H, W, C), 'label': int32 (b,), 'index': int32 (b,)}
(each example's index in the training split), plus 'teacher' when the frozen teacher's outputs
are cached (``kdjax.data.cache``). Batching is index-based and stateless: ``batch_indices``
returns the example indices of any (epoch, step) directly, so ``train_batch`` is a pure function of
(seed, step) and a resumed run sees exactly the batches it would have seen; multi-process runs
split each global batch into contiguous per-process parts. ``eval_batches`` walks a whole split
in fixed-shape, padded and masked batches.
"""

from __future__ import annotations

import functools
from typing import Iterator

import jax
import numpy as np

from kdjax.data.sources import DataError, Split


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Number of full global batches in one epoch (the remainder is dropped)."""
    if global_batch_size <= 0:
        raise DataError(f'global batch size must be positive, got {global_batch_size}')
    return int(num_examples) // int(global_batch_size)


@functools.lru_cache(maxsize=4)
def _epoch_order(num_examples: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    order = np.random.default_rng((seed, epoch)).permutation(num_examples) if shuffle else np.arange(num_examples)
    order.flags.writeable = False
    return order


def batch_indices(
    num_examples: int,
    global_batch_size: int,
    *,
    seed: int,
    epoch: int,
    step_in_epoch: int,
    process_index: int = 0,
    process_count: int = 1,
    shuffle: bool = True,
) -> np.ndarray:
    """Example indices of this process's part of one global training batch.

    The epoch's order is ``np.random.default_rng((seed, epoch)).permutation(num_examples)``
    (``arange`` if not ``shuffle``); global batch ``step_in_epoch`` is the slice
    ``[step * B, (step + 1) * B)`` of it, and process ``p`` of ``P`` gets the ``p``-th of
    ``P`` contiguous equal parts. Deterministic and stateless, so a resumed run at any
    step sees exactly the same batches; the remainder of each epoch is dropped.

    Returns:
      int64 array of shape (global_batch_size // process_count,).
    """
    steps = steps_per_epoch(num_examples, global_batch_size)
    if steps == 0:
        raise DataError(f'global batch size {global_batch_size} exceeds the {num_examples} training examples')
    if not 0 <= step_in_epoch < steps:
        raise DataError(f'step_in_epoch {step_in_epoch} outside [0, {steps})')
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise DataError(f'process_index {process_index} outside [0, {process_count})')
    if global_batch_size % process_count:
        raise DataError(f'global batch size {global_batch_size} is not divisible by {process_count} processes')
    if seed < 0 or epoch < 0:
        raise DataError(f'seed and epoch must be >= 0, got seed={seed} epoch={epoch}')
    order = _epoch_order(int(num_examples), int(seed), int(epoch), bool(shuffle))
    per_process = global_batch_size // process_count
    start = step_in_epoch * global_batch_size + process_index * per_process
    return np.array(order[start : start + per_process])


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
    """Number of batches ``eval_batches`` yields (the last one padded)."""
    if global_batch_size <= 0:
        raise DataError(f'global batch size must be positive, got {global_batch_size}')
    return -(-int(num_examples) // int(global_batch_size))


def eval_batches(
    split: Split,
    global_batch_size: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
    threads: int = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Iterates over a whole split in order, in fixed-shape batches.

    The last global batch is padded to full size with zero images, label 0 and mask 0,
    so a jitted eval step sees one shape. Each yielded triple is this process's
    contiguous part (``global_batch_size // process_count`` rows) of a global batch.

    Yields:
      (images uint8 (b,H,W,C), labels int32 (b,), mask float32 (b,) with 1 for real
      examples and 0 for padding), b = global_batch_size // process_count.

    A streamed split (kdjax.data.folder.FileSplit) is decoded on `threads` threads
    (kdjax.data.stream.eval_batches); `threads` is unused for an in-memory split.
    """
    if not isinstance(split, Split):
        from kdjax.data import stream

        yield from stream.eval_batches(split, global_batch_size, process_index=process_index,
                                       process_count=process_count, threads=threads)
        return
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise DataError(f'process_index {process_index} outside [0, {process_count})')
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise DataError(f'global batch size {global_batch_size} is not a positive multiple of {process_count} processes')
    n = len(split)
    per_process = global_batch_size // process_count
    for b in range(num_eval_batches(n, global_batch_size)):
        start = b * global_batch_size + process_index * per_process
        idx = np.arange(start, start + per_process)
        valid = idx < n
        take = np.where(valid, idx, 0)
        images = split.images[take]
        labels = split.labels[take]
        images[~valid] = 0
        labels[~valid] = 0
        yield images, labels, valid.astype(np.float32)


def train_batch(split: Split, batch_size: int, *, seed: int, step: int, steps_per_epoch: int,
                cache: dict | None = None) -> dict:
    """This process's part of global training batch `step` (see `batch_indices`): 'image',
    'label', 'index' and, with a teacher cache, 'teacher' (its outputs for these examples)."""
    epoch, i = divmod(step, steps_per_epoch)
    idx = batch_indices(len(split.labels), batch_size, seed=seed, epoch=epoch, step_in_epoch=i,
                        process_index=jax.process_index(), process_count=jax.process_count())
    batch = {"image": split.images[idx], "label": split.labels[idx], "index": idx.astype(np.int32)}
    if cache is not None:
        batch["teacher"] = {name: values[idx] for name, values in cache.items()}
    return batch
