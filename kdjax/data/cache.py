"""The frozen teacher's outputs for every training example, computed once.

When a frozen teacher's output for an example cannot change from epoch to epoch (no random
augmentation, no strong view, not the Mean Teacher: `cache_obstacle`), `teacher_cache` computes
what it says about every training example once; the training batches then carry those outputs
('teacher', `kdjax.data.batches.train_batch`) and the step runs no teacher (for an MLP student of a
conv teacher, most of the step's work).
"""

from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from kdjax import paths
from kdjax.data.augmentation import normalize

if TYPE_CHECKING:
    from kdjax import distill

CACHE_MODES = ("auto", "on", "off")
CACHE_MAX_BYTES = 2 * 2**30  # 'auto' caches at most this much


def cache_obstacle(*, crop_padding: int, flip: bool, mixup_alpha: float, cutmix_alpha: float,
                   teacher_source: str, views: str = "") -> str | None:
    """Why the teacher's output for an example can change from epoch to epoch (then it cannot be
    cached), or None. `views`: config.augment.views (the strong view is random every epoch)."""
    if crop_padding or flip or mixup_alpha or cutmix_alpha:
        return "augmentation (crop, flip, mixup or cutmix) changes the teacher's input every epoch"
    if views:
        return "the strong augmented view (augment.views) changes the teacher's input every epoch"
    if teacher_source == "ema":
        return "the Mean Teacher (teacher.source='ema') changes every step"
    return None


def fingerprint(*trees) -> str:
    """sha256 of the bytes, shapes and dtypes of every leaf: identifies a teacher and its inputs."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(trees):
        a = np.asarray(leaf)
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def teacher_cache(mode: str, teachers: tuple, teacher_vars: tuple, terms: Sequence[distill.Term],
                  images: np.ndarray, *, mean, std, dtype, obstacle: str | None, path: str,
                  chunk: int = 500, write: bool = True, label: str = "") -> dict | None:
    """The frozen teacher's outputs for every image, or None to run the teacher in the step.

    `mode` is ``config.distill.cache_teacher``: 'off'; 'auto' (cache when valid and at most
    `CACHE_MAX_BYTES`); 'on' (a ValueError naming the `obstacle` when invalid). Only the features
    the terms read are kept, computed with the step's own normalisation and dtype in fixed-size
    chunks (one compile). They are stored in `path` (an .npz) with a fingerprint of the teacher and
    the images, so a resumed stage reads them back instead of recomputing; `write` False (processes
    other than 0) only reads.
    """
    if mode == "off" or not teachers:
        return None
    # Imported here: kdjax.step imports kdjax.data, which stays free of Flax and the method layer.
    from kdjax import distill
    from kdjax import step as kstep

    reason = obstacle
    abstract = jax.ShapeDtypeStruct((1,) + images.shape[1:], jnp.float32)
    extra = kstep.extras(terms)[1]
    feats = jax.eval_shape(lambda tv, x: kstep.teacher_features(teachers, tv, x, extra), tuple(teacher_vars),
                           abstract)
    if distill.reads_strong_view(terms)[1]:  # named here, never cached (the views are an `obstacle`)
        feats = distill.with_strong_view(feats, feats)
    names = sorted({n for t in terms if t.teacher for n in distill.resolve_features(t.teacher, feats)})
    for t in terms:  # patterns such as 'stage[-1]' must pick the same features from the subset
        if t.teacher and distill.resolve_features(t.teacher, names) != distill.resolve_features(t.teacher, feats):
            reason = reason or f"term {t.name!r} selects teacher features by a pattern the cache cannot keep"
    n = len(images)
    nbytes = n * sum(int(np.prod(feats[k].shape[1:])) * feats[k].dtype.itemsize for k in names)
    if mode == "auto" and nbytes > CACHE_MAX_BYTES:
        reason = reason or f"the teacher's outputs need {nbytes / 2**30:.1f} GiB"
    if reason:
        if mode == "on":
            raise ValueError(f"config.distill.cache_teacher='on' is invalid here: {reason}; use 'auto' or 'off'")
        logging.info("%s teacher outputs not cached: %s", label, reason)
        return None

    print_ = fingerprint(teacher_vars, images, str(np.dtype(dtype)))
    if paths.exists(path):
        with paths.load_npz(path) as f:
            if str(f["fingerprint"]) == print_ and all(k in f for k in names):
                logging.info("%s teacher outputs read from %s", label, path)
                return {k: f[k] for k in names}
    start_time = time.time()
    fn = jax.jit(lambda tv, x: {k: v for k, v in kstep.teacher_features(
        teachers, tv, normalize(x, mean, std, dtype=dtype), extra).items() if k in names})
    parts = []
    for start in range(0, n, chunk):  # a fixed chunk shape (the last one padded): one compile
        idx = np.minimum(np.arange(start, start + chunk), n - 1)
        parts.append(jax.device_get(fn(tuple(teacher_vars), images[idx])))
    cache = {k: np.concatenate([p[k] for p in parts])[:n] for k in names}
    if write:
        paths.save_npz(path, fingerprint=np.array(print_), **cache)
    logging.info("%s teacher outputs (%s) of %d examples computed in %.1f s, kept in %s", label,
                 ", ".join(names), n, time.time() - start_time, path)
    return cache
