"""What the experiment configs share: the schema `base()` (kdjax/config.py, re-exported here), the
config-string argument parser, `smoke`, the CIFAR recipes and what the ImageNet recipes share
(`imagenet_pair`, `smoke_folder`).

Each config file's `get_config(arg)` starts from `base()` and changes what its experiment needs.
Every field can be overridden from the command line, e.g. ``--config.optimizer.name=adam``; the
fields, their defaults and one comment each: kdjax/config.py.
"""

from __future__ import annotations

import os
import tempfile

import ml_collections

from kdjax import distill
from kdjax.config import DEFAULT_LEARNING_RATES, base

__all__ = ["DEFAULT_LEARNING_RATES", "base", "cifar_recipe", "cifar_vit_recipe", "imagenet_pair", "parse_arg", "smoke",
           "smoke_folder"]


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """big_vision-style config-string argument: 'smoke,method=at' -> {smoke: True, method: 'at'}.

    Keys must be among `defaults`; values are converted to the default's type.
    """
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; choose from: {', '.join(sorted(defaults))}")
        default = defaults[key]
        if not sep:
            value = True
        elif isinstance(default, bool):
            value = value.strip().lower() in ("1", "true", "yes")
        elif default is not None:
            value = type(default)(value)
        out[key] = value
    return ml_collections.ConfigDict(out)


def smoke(c: ml_collections.ConfigDict) -> None:
    """Shrinks a config in place to a few steps per stage on `tfds.testing.mock_data`.

    Same models, same pipeline (tfds loading, augmentation, distillation, checkpoints, summary);
    only the data (random mock examples) and the run length change.
    """
    c.dataset.mock_examples = 64
    c.batch_size = 16
    c.eval_batch_size = 32
    c.throughput_batch = 16
    c.log_every_steps = 1
    for role in ("teacher", "student"):
        c[role].epochs = 1
    if c.student_init.epochs:
        c.student_init.epochs = 1
    c.optimizer.schedule = "constant"


def _cifar_pair(a, dataset: str, teacher: str, student: str, *, batch_size: int, epochs: int):
    """What both CIFAR recipes share: `base(a.method)` with the seed, data set, batch, random crop
    (pad 4) + flip, and teacher and student models trained for `epochs` each."""
    c = base(a.method)
    c.seed = a.seed
    c.dataset.name = dataset
    c.batch_size = batch_size
    c.augment.crop_padding = 4
    c.augment.flip = True
    c.teacher.model = teacher
    c.teacher.epochs = epochs
    c.student.model = student
    c.student.epochs = epochs
    return c


def cifar_recipe(arg, dataset: str, teacher: str, student: str, *, student_lr_scale: float = 1.0,
                 dkd_beta: float = 8.0) -> ml_collections.ConfigDict:
    """The RepDistiller / mdistiller CIFAR recipe for one teacher -> student pair.

    240 epochs, batch 64, SGD momentum 0.9, lr 0.05 (0.01 for MobileNetV2/ShuffleNet students:
    `student_lr_scale=0.2`), x0.1 at epochs 150/180/210, weight decay 5e-4, random crop (pad 4) +
    flip. The rate is SGD's default (optimizer.learning_rate=None), so
    `--config.optimizer.learning_rate=0.1` sets the teachers' rate and scales the students' with
    it, and `--config.optimizer.name=adam` gives Adam's own default. Each method keeps
    the weights of the reference code (kdjax.distill.METHODS); DKD's beta is per pair.
    Config-string arguments: `method=<name>` (default kd), `seed=<int>`, `smoke`, and
    `init_epochs=<n>`: first train the student for n epochs on the method's own terms alone (the
    `student_init` stage: FitNet's hint pre-training; RepDistiller uses 30 init epochs for AB/FSP).
    The two-stage methods fsp, ab and ft (`kdjax.distill.init_terms`) always get that stage, with
    RepDistiller's 30 init epochs unless `init_epochs` says otherwise.
    """
    a = parse_arg(arg, smoke=False, method="kd", seed=0, init_epochs=0)
    c = _cifar_pair(a, dataset, teacher, student, batch_size=64, epochs=240)
    c.student.learning_rate_scale = student_lr_scale
    c.optimizer.name = "sgd"  # learning rate: None = sgd's default, 0.05 (RepDistiller's)
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 5e-4
    c.optimizer.schedule = "multistep"
    c.optimizer.decay_epochs = (150, 180, 210)
    c.distill.temperature = 4.0
    c.distill.dkd.beta = dkd_beta
    init_epochs = a.init_epochs or (30 if distill.init_terms(a.method) else 0)  # RepDistiller --init_epochs 30
    if init_epochs:
        c.stages = "teacher,student_init,student,student_scratch"
        c.student_init.epochs = init_epochs
        c.student_init.terms = ",".join(n for n in a.method.split("+") if n != "kd")
    if a.smoke:
        smoke(c)
    return c


def cifar_vit_recipe(arg, dataset: str, teacher: str, student: str, *, method: str = "kd") -> ml_collections.ConfigDict:
    """A CIFAR recipe for pairs with a ViT (kdjax.models.ViT, patch 4 on 32x32), teacher or student.

    Transformers do not train with the CNN recipe's SGD at 0.05; this one is DeiT's optimiser
    scaled to CIFAR: AdamW at 1e-3 (DeiT: 5e-4 per 512 images), weight decay 0.05, cosine
    schedule after 5 warm-up epochs, 200 epochs for each stage, batch 128, label smoothing 0.1,
    random crop (pad 4) + flip. Teacher and student share it (one optimizer per run).
    Config-string arguments: `method=<name>` (default `method`), `seed=<int>`, `smoke`.
    """
    a = parse_arg(arg, smoke=False, method=method, seed=0)
    c = _cifar_pair(a, dataset, teacher, student, batch_size=128, epochs=200)
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.weight_decay = 0.05
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_epochs = 5.0
    c.loss.label_smoothing = 0.1
    c.distill.temperature = 4.0
    if a.smoke:
        smoke(c)
        c.optimizer.warmup_epochs = 0.0
    return c


def smoke_folder(root: str, train_per_class: int = 4, val_per_class: int = 2, classes: int = 3) -> str:
    """A tiny generated image folder (`classes` classes of 40x40 JPEGs, each class one bright colour
    channel), written once; returns `root`."""
    import numpy as np
    from PIL import Image

    done = os.path.join(root, ".complete")
    if os.path.exists(done):
        return root
    rng = np.random.default_rng(0)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for label in range(classes):
            folder = os.path.join(root, split, f"class{label}")
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                image = rng.integers(0, 80, (40, 40, 3)).astype(np.uint8)
                image[..., label % 3] += 150
                Image.fromarray(image).save(os.path.join(folder, f"{i:03d}.jpg"))
    open(done, "w").close()
    return root


def imagenet_pair(arg, teacher: str, student: str, *, method: str = "kd", extra_args: dict | None = None):
    """What the ImageNet recipes share: (config, parsed arguments).

    `base(method)` on `imagenet2012` (an extracted ImageNet in the folder layout, streamed: docs/data.md)
    at 224 with flip on the loader workers, the two models, and the config-string arguments
    `data_dir=<ROOT>` (default ~/imagenet), `teacher_weights=<file>` (torchvision / timm weights:
    the teacher used as it is, teacher.epochs=0; docs/pretrained.md), `method=<name>`, `seed=<int>`
    and `smoke` (plus `extra_args`, {name: default}). The recipe file sets the optimizer, the schedule
    and the epochs, then calls `imagenet_smoke`.
    """
    a = parse_arg(arg, smoke=False, method=method, seed=0, data_dir="", teacher_weights="", **(extra_args or {}))
    c = base(a.method)
    c.seed = a.seed
    c.dataset.name = "imagenet2012"
    c.dataset.data_dir = a.data_dir or "~/imagenet"
    c.dataset.image_size = 224
    c.augment.flip = True
    c.eval_batch_size = 500
    c.teacher.model = teacher
    c.student.model = student
    return c, a


def imagenet_smoke(c: ml_collections.ConfigDict, a) -> ml_collections.ConfigDict:
    """`teacher_weights` and `smoke` of an ImageNet recipe, applied last. Smoke: the real models at
    the real resolution (224) for one epoch of 3 steps of 4 images per stage, teacher and student,
    on a tiny generated folder (3 classes of 40x40 JPEGs under the temp folder, unless `data_dir`
    names one); a check that the pipeline runs before the real run."""
    if a.teacher_weights:
        c.teacher.weights = a.teacher_weights
        c.teacher.epochs = 0
    if a.smoke:
        smoke(c)
        if a.teacher_weights:
            c.teacher.epochs = 0
        c.stages = "teacher,student"
        c.dataset.mock_examples = 0  # a real (tiny) folder instead of tfds mock data
        c.dataset.name = "folder"
        c.dataset.data_dir = a.data_dir or smoke_folder(os.path.join(tempfile.gettempdir(), "kdjax-smoke-folder-4"))
        c.dataset.loader_workers = 1
        c.batch_size = c.eval_batch_size = c.throughput_batch = 4
        c.optimizer.warmup_epochs = 0.0
        c.optimizer.schedule = "constant"
    return c
