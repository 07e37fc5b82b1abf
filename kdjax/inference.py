"""Forward passes of a trained model outside the training step: accuracy on a split, test-set
logits, and inference throughput (used by the trainer, the evaluation report, compression and
export)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import data as kdata
from kdjax import models
from kdjax import step as kstep


def evaluate_split(eval_fn, par: kstep.DataParallel, variables, split: kdata.Split, batch_size: int,
                   threads: int = 1) -> dict:
    """Accuracy and mean cross-entropy of `variables` on a whole split (all processes); a streamed
    split is decoded on `threads` threads.

    `batch_size` is rounded up to a multiple of the device count; the padding (and the padded
    last batch) is masked out of the metrics, so any eval batch size works on any device count."""
    batch_size = -(-batch_size // par.num_devices) * par.num_devices
    totals = {"correct": 0.0, "count": 0.0, "loss_sum": 0.0}
    for images, labels, mask in kdata.eval_batches(
        split, batch_size, process_index=jax.process_index(), process_count=jax.process_count(), threads=threads
    ):
        out = par.unreplicate(eval_fn(variables, par.shard({"image": images, "label": labels, "mask": mask})))
        for k in totals:
            totals[k] += float(out[k])
    return {"accuracy": totals["correct"] / totals["count"], "loss": totals["loss_sum"] / totals["count"]}


def eval_forward(model, mean, std):
    """The jitted eval-mode forward pass fn(variables, uint8 images) -> float32 logits, with the
    normalisation inside (what the trainer evaluates and kdjax.export ships)."""
    return jax.jit(lambda v, x: models.apply_model(model, v, kdata.normalize(x, mean, std), train=False)[0])


def predict_logits(model, variables, images, mean, std, batch: int = 512) -> np.ndarray:
    """Eval-mode float32 logits of uint8 `images` on one device, in batches."""
    fwd = eval_forward(model, mean, std)
    return np.concatenate([np.asarray(fwd(variables, images[i:i + batch]), np.float32)
                           for i in range(0, len(images), batch)])


def head_accuracies(model, variables, split, mean, std, batch: int = 512, threads: int = 1) -> dict | None:
    """A model with two heads (a distilled ViT: features ``logits_cls`` and ``logits_dist``) -> the
    test accuracy of each head alone and of the two together, both ways DeiT's work combines them:
    ``test_accuracy_cls``, ``test_accuracy_dist``, ``test_accuracy_heads_logit_mean`` (the argmax of
    the mean of the two heads' logits: the model's ``logits``, what facebookresearch/deit's and timm's
    models return at inference) and ``test_accuracy_heads_softmax_mean`` (of the mean of their
    softmax outputs, as the DeiT paper describes its evaluation). None for a one-head model.
    `split`: the test split, in memory or streamed (`kdjax.data.eval_batches` reads either)."""
    if not getattr(model, "distilled", False):
        return None
    fwd = jax.jit(lambda v, x: {k: f for k, f in models.apply_model(model, v, kdata.normalize(x, mean, std),
                                                                    train=False)[1].items()
                                if k in ("logits_cls", "logits_dist")})
    outs = [(jax.device_get(fwd(variables, images)), mask > 0)
            for images, _, mask in kdata.eval_batches(split, batch, threads=threads)]
    cls = np.concatenate([o["logits_cls"][keep] for o, keep in outs]).astype(np.float32)
    dist = np.concatenate([o["logits_dist"][keep] for o, keep in outs]).astype(np.float32)
    labels = np.asarray(split.labels)
    soft = lambda z: np.exp(z - z.max(-1, keepdims=True)) / np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)  # noqa: E731
    acc = lambda z: float(np.mean(np.argmax(z, -1) == labels))  # noqa: E731
    return {"test_accuracy_cls": acc(cls), "test_accuracy_dist": acc(dist),
            "test_accuracy_heads_logit_mean": acc((cls + dist) / 2),
            "test_accuracy_heads_softmax_mean": acc(soft(cls) + soft(dist))}


def predict_split_logits(model, variables, split, mean, std, batch: int = 512, threads: int = 1) -> np.ndarray:
    """Eval-mode float32 logits of every example of a split (streamed or in memory), one device."""
    fwd = eval_forward(model, mean, std)
    out = [np.asarray(fwd(variables, images), np.float32)[mask > 0]
           for images, _, mask in kdata.eval_batches(split, batch, threads=threads)]
    return np.concatenate(out)


def inference_throughput(model, variables, image_shape, mean, std, batch: int = 256, seconds: float = 1.0) -> float:
    """Images per second of the jitted eval-mode forward pass on one device.

    After one warm-up call, repeats the forward pass for at least `seconds` (and 3 calls) and
    divides the images processed by the time taken.
    """
    fwd = eval_forward(model, mean, std)
    x = jax.device_put(jnp.zeros((batch,) + tuple(image_shape), jnp.uint8))
    variables = jax.device_put(variables)
    fwd(variables, x).block_until_ready()
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        fwd(variables, x).block_until_ready()
        calls += 1
    return batch * calls / (time.perf_counter() - start)
