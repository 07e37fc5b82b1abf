"""The teacher's soft labels under the random crops of a streamed run, computed once (FKD).

Shen & Xing, "A Fast Knowledge Distillation Framework for Visual Recognition" (ECCV 2022): a
frozen teacher's output for a crop does not change, and the crops of a streamed run are replayable
(`kdjax.data.stream`: example ``i``'s crop and flip in epoch ``e`` come from
``np.random.default_rng((seed, e, i, CROP_STREAM))``), so its (top-k) logits for every (example,
epoch-crop) of a stage can be computed in one pass before the stage (`build`) and read back by
position in every step (`SoftLabelStore.teacher`); the step then runs no teacher.

What is stored, per position (step * b + row, this process's b rows of each global batch): the
teacher's k largest logits (float32) and their class indices (int16, int32 beyond 32767 classes),
``rest`` (float32, below), the crop's parameters (`stream.pack_crop`, int64: checked against the
loader's crop in every step) and the example index (int32, checked too). With an ensemble the
logits are (n, K) per example and each teacher keeps its own top k.

The other K - k classes (FKD's "marginal smoothing", `soft_logits`): they share the teacher's
remaining probability mass ``1 - sum(top-k softmax)`` equally, exactly as FKD's soft labels; here in
logit space, as every class gets the logit ``rest = logsumexp(the other logits) - log(K - k)``, so
``softmax(soft_logits) == `` the top-k probabilities exactly and ``(1 - their sum) / (K - k)``
for each other class, at temperature 1. A term at temperature T != 1 softens these reconstructed
logits (not the teacher's), and a term that reads logit values (mse_logits, logit standardisation)
sees the filled value: only k = K (the default, ``distill.cache_top_k`` unset) gives exactly the
teacher's logits, and then the run equals the teacher-in-the-step run to float tolerance (the
store's teacher pass is its own XLA program, not the step's).

When: only with ``distill.cache_teacher='on'``. The store runs the teacher once per (example,
epoch-crop), as many forward passes as the teacher in the step, plus one more decode of every crop:
a single run gains nothing, a store reused (several students of one teacher, reruns, a sweep, through
``distill.cache_dir``) skips the teacher in all of them. So 'auto' runs the teacher in the step on
streamed data (an info log says why).

Size: positions x (n x (k x (4 + index bytes) + 4) + 12) bytes, positions = total steps x global
batch (`store_bytes`), logged before computing; 'on' refuses more than `STORE_MAX_BYTES` or more
than the local disk's free space.

Layout: ``<root>/<key>/p<process>_s<first step>.npz`` (root: ``<stage dir>/soft_labels``, or
``distill.cache_dir`` to share stores between runs), one file per piece of
`piece_steps` consecutive steps, each written whole (`paths.save_npz`: tmp + rename, one object on
GCS). `key` hashes everything a stored value depends on (the teacher's variables, the files and
labels, seed, image size, flip, batch, processes, k, dtype, piece size), so a changed run never reads a stale
store. A run killed while computing keeps its finished pieces and computes only the missing ones
when rerun; a resumed stage computes only the pieces from its checkpoint's step on.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from kdjax import paths
from kdjax.data import stream
from kdjax.data.augmentation import normalize
from kdjax.data.cache import fingerprint
from kdjax.data.sources import DataError

STORE_MAX_BYTES = 256 * 2**30  # 'on' refuses a store larger than this
PIECE_BYTES = 64 * 2**20  # one piece file holds at most about this much (at least one step)
STORE_VERSION = 1  # part of the key: a change in what is stored makes old stores unreadable by design


def index_bytes(num_classes: int) -> int:
    """Bytes of one stored class index: 2 (int16) up to 32767 classes, else 4."""
    return 2 if num_classes <= 2**15 - 1 else 4


def example_bytes(top_k: int, num_classes: int, teachers: int = 1) -> int:
    """Stored bytes per (example, epoch-crop): teachers x (k x (4 + index bytes) + 4) + 8 + 4."""
    return teachers * (top_k * (4 + index_bytes(num_classes)) + 4) + 8 + 4


def store_bytes(positions: int, top_k: int, num_classes: int, teachers: int = 1) -> int:
    """The whole store's size in bytes: positions (total steps x global batch) x `example_bytes`."""
    return int(positions) * example_bytes(top_k, num_classes, teachers)


def check_top_k(top_k, num_classes: int) -> int:
    """`top_k` (None: all classes) as an int in 1..num_classes, else a one-line ValueError."""
    if top_k is None:
        return int(num_classes)
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= num_classes:
        raise ValueError(f"config.distill.cache_top_k={top_k!r}: choose 1..{num_classes} (the data set's classes; "
                         "unset: all of them, the exact logits)")
    return int(top_k)


def top_k_logits(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(values, indices, rest) of logits (..., K): the k largest logits (float32, descending) and
    their classes (int32) along the last axis, and rest (...,) float32, the logit that gives each of
    the K - k other classes an equal share of the remaining softmax mass: logsumexp(other logits) -
    log(K - k) (0 when k == K, where nothing is left). Pure; k static."""
    logits = logits.astype(jnp.float32)
    num_classes = logits.shape[-1]
    values, indices = jax.lax.top_k(logits, k)
    if k == num_classes:
        return values, indices, jnp.zeros(logits.shape[:-1], jnp.float32)
    kept = jnp.sum(jax.nn.one_hot(indices, num_classes, dtype=jnp.int32), axis=-2) > 0
    others = jnp.where(kept, -jnp.inf, logits)
    rest = jax.nn.logsumexp(others, axis=-1) - jnp.log(jnp.float32(num_classes - k))
    return values, indices, rest


def soft_logits(values: np.ndarray, indices: np.ndarray, rest: np.ndarray, num_classes: int) -> np.ndarray:
    """float32 (..., num_classes): `values` at `indices`, `rest` in every other class (see the
    module docstring: softmax of it is FKD's marginally smoothed soft label). With k = num_classes
    it is exactly the stored logits. Pure (numpy, on the host)."""
    out = np.repeat(np.asarray(rest, np.float32)[..., None], num_classes, axis=-1)
    np.put_along_axis(out, np.asarray(indices, np.int64), np.asarray(values, np.float32), axis=-1)
    return out


class SoftLabelStore:
    """One stage's store (see the module docstring): where its pieces are, and the teacher's
    soft labels of any step's batch (`teacher`), read piece by piece."""

    def __init__(self, directory: str, *, top_k: int, num_classes: int, teachers: int, per_process: int,
                 total_steps: int, process_index: int, dtype):
        self.directory, self.top_k, self.num_classes, self.teachers = directory, top_k, num_classes, teachers
        self.per_process, self.total_steps, self.process_index = per_process, total_steps, process_index
        self.dtype = np.dtype(dtype)
        self.piece_steps = max(1, min(total_steps, PIECE_BYTES // (per_process * example_bytes(top_k, num_classes,
                                                                                                teachers))))
        self.num_pieces = -(-total_steps // self.piece_steps)
        self._piece, self._arrays = None, None

    def piece_path(self, piece: int) -> str:
        return os.path.join(self.directory, f"p{self.process_index:03d}_s{piece * self.piece_steps:08d}.npz")

    def piece_range(self, piece: int) -> tuple[int, int]:
        return piece * self.piece_steps, min((piece + 1) * self.piece_steps, self.total_steps)

    def missing(self, start_step: int) -> list[int]:
        """The pieces from the one holding `start_step` on that are not written yet."""
        return [j for j in range(start_step // self.piece_steps, self.num_pieces) if not paths.exists(self.piece_path(j))]

    def teacher(self, step: int, index: np.ndarray, crop: np.ndarray) -> dict:
        """{'logits': (b, [n,] K)} of step `step`'s batch, whose example indices and packed crops
        (the loader's) must be the stored ones (else a one-line DataError: the store is not this
        run's)."""
        piece = step // self.piece_steps
        if piece != self._piece:
            path = self.piece_path(piece)
            if not paths.exists(path):
                raise DataError(f"the soft-label store {self.directory} lacks {path}; rerun the command to compute it")
            with paths.load_npz(path) as f:
                self._arrays = {k: f[k] for k in f.files}
            self._piece = piece
        a = self._arrays
        rows = slice((step - self.piece_range(piece)[0]) * self.per_process,
                     (step - self.piece_range(piece)[0] + 1) * self.per_process)
        if not (np.array_equal(a["index"][rows], index) and np.array_equal(a["crop"][rows], crop)):
            raise DataError(f"the soft labels of step {step} in {self.directory} were computed for other crops than this "
                            "run's loader makes; delete that folder to recompute them")
        logits = soft_logits(a["values"][rows], a["indices"][rows], a["rest"][rows], self.num_classes)
        return {"logits": logits.astype(self.dtype)}


def store_obstacle(terms: Sequence, feats: dict) -> str | None:
    """Why the store cannot serve these terms (it keeps the teacher's logits only), or None."""
    from kdjax import distill

    for t in terms:
        if t.teacher and set(distill.resolve_features(t.teacher, feats)) - {"logits"}:
            return f"term {t.name!r} reads teacher features other than the logits, which the soft-label store lacks"
    if distill.reads_strong_view(terms)[1]:
        return "a term reads the teacher's strong view, which the soft-label store lacks"
    return None


def _free_bytes(directory: str) -> int | None:
    if paths.is_remote(directory):
        return None
    probe = os.path.abspath(directory)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    return shutil.disk_usage(probe).free


def open_store(mode: str, teachers: tuple, teacher_vars: tuple, terms: Sequence, split, *, top_k, num_classes: int,
               global_batch: int, total_steps: int, steps_per_epoch: int, seed: int, flip: bool, dtype,
               obstacle: str | None, root: str, process_index: int = 0, process_count: int = 1,
               label: str = "") -> SoftLabelStore | None:
    """The stage's `SoftLabelStore` (not computed yet: `build`), or None to run the teacher in
    the step. `mode` is config.distill.cache_teacher: 'off'; 'auto' (None, with an info log: on
    streamed data the store runs the teacher as often as the steps would, plus one more decode
    pass, so it pays off only when it is reused, which 'on' asks for); 'on' (a one-line ValueError
    naming the reason when invalid, or larger than `STORE_MAX_BYTES` or the free disk). The size
    is logged before anything is computed. `root`: the folder of stores (the stage's
    soft_labels/, or config.distill.cache_dir shared between runs); this one is `root`/<key>."""
    if mode == "off" or not teachers:
        return None
    from kdjax import step as kstep

    k = check_top_k(top_k, num_classes)  # a bad k is refused whatever the mode
    if mode == "auto":
        logging.info("%s teacher soft labels not stored: on a streamed data set the store runs the teacher once per "
                     "step as well (and decodes every crop once more); it pays off when reused, e.g. by several "
                     "students: set distill.cache_teacher='on' (and distill.cache_dir to share it)", label)
        return None
    abstract = jax.ShapeDtypeStruct((1, split.image_size, split.image_size, 3), jnp.float32)
    feats = jax.eval_shape(lambda tv, x: kstep.teacher_features(teachers, tv, x), tuple(teacher_vars), abstract)
    reason = obstacle or store_obstacle(terms, feats)
    n_teachers = len(teachers)
    nbytes = store_bytes(total_steps * global_batch, k, num_classes, n_teachers)
    if not reason:
        logging.info("%s soft-label store: %d steps x batch %d x %d bytes (top %d of %d classes, %d teacher(s)) = "
                     "%.3f GiB", label, total_steps, global_batch, example_bytes(k, num_classes, n_teachers), k,
                     num_classes, n_teachers, nbytes / 2**30)
        free = _free_bytes(root)
        if nbytes > STORE_MAX_BYTES:
            reason = (f"the soft-label store would need {nbytes / 2**30:.1f} GiB, more than "
                      f"{STORE_MAX_BYTES / 2**30:.0f} GiB: set distill.cache_top_k lower or train fewer epochs")
        elif free is not None and nbytes > free:
            reason = (f"the soft-label store would need {nbytes / 2**30:.1f} GiB and {root} has "
                      f"{free / 2**30:.1f} GiB free: set distill.cache_top_k lower or free disk space")
    if reason:
        raise ValueError(f"config.distill.cache_teacher='on' is invalid here: {reason}; use 'auto' or 'off'")
    h = hashlib.sha256()
    files = ("\n".join(split.files) if hasattr(split, "files")  # an image folder's files, a tfds split's records
             else f"{split!r} {fingerprint(np.asarray(split.indices))}").encode()
    for part in (STORE_VERSION, PIECE_BYTES, fingerprint(teacher_vars), hashlib.sha256(files).hexdigest(),
                 fingerprint(np.asarray(split.labels)), split.image_size, seed, flip, global_batch, steps_per_epoch,
                 total_steps, process_count, k, str(np.dtype(dtype))):
        h.update(f"{part};".encode())
    return SoftLabelStore(os.path.join(root, h.hexdigest()[:16]), top_k=k, num_classes=num_classes,
                          teachers=n_teachers, per_process=global_batch // process_count, total_steps=total_steps,
                          process_index=process_index, dtype=dtype)


def build(store: SoftLabelStore, teachers: tuple, teacher_vars: tuple, split, *, global_batch: int, seed: int,
          steps_per_epoch: int, flip: bool, workers: int, mean, std, dtype, start_step: int = 0,
          process_index: int = 0, process_count: int = 1, label: str = "") -> float:
    """Computes the store's missing pieces from `start_step` on: one pass of a `stream.TrainLoader`
    (the stage's own batches, in order) through the teacher (eval mode, the step's normalisation and
    dtype), each piece written whole as soon as its steps are done. Returns the seconds it took."""
    from kdjax import step as kstep

    missing = store.missing(start_step)
    if not missing:
        logging.info("%s teacher soft labels read from %s", label, store.directory)
        return 0.0
    t0 = time.time()
    k = store.top_k
    fn = jax.jit(lambda tv, x: top_k_logits(
        kstep.teacher_features(teachers, tv, normalize(x, mean, std, dtype=dtype))["logits"], k))
    first = store.piece_range(missing[0])[0]
    todo = set(missing)
    with stream.TrainLoader(split, global_batch, seed=seed, start_step=first, total_steps=store.total_steps,
                            steps_per_epoch=steps_per_epoch, flip=flip, workers=workers, process_index=process_index,
                            process_count=process_count, crops=True) as loader:
        for piece in range(missing[0], store.num_pieces):
            begin, end = store.piece_range(piece)
            outs, crops, indices = [], [], []
            for _ in range(begin, end):
                batch = next(loader)
                if piece in todo:  # dispatched asynchronously: the loader decodes the next batch meanwhile
                    outs.append(fn(tuple(teacher_vars), batch["image"]))
                    crops.append(batch["crop"])
                    indices.append(batch["index"])
            if piece not in todo:
                continue
            values, classes, rest = (np.concatenate(p) for p in zip(*jax.device_get(outs)))
            paths.save_npz(store.piece_path(piece), values=values, rest=rest, crop=np.concatenate(crops),
                           indices=classes.astype(np.int16 if index_bytes(store.num_classes) == 2 else np.int32),
                           index=np.concatenate(indices).astype(np.int32))
            logging.info("%s soft labels of steps %d..%d stored (%d of %d pieces)", label, begin, end - 1,
                         piece + 1, store.num_pieces)
    seconds = time.time() - t0
    logging.info("%s teacher soft labels (top %d) of steps %d..%d computed in %.1f s, kept in %s", label, k, first,
                 store.total_steps - 1, seconds, store.directory)
    return seconds
