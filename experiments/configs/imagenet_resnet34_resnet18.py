"""ImageNet-1k: ResNet-34 teacher -> ResNet-18 student (torchvision layouts), KD T=1, 0.5*CE + 0.5*KD.

    python -m experiments.cifar --config=experiments/configs/imagenet_resnet34_resnet18.py:data_dir=/data/imagenet
    python -m experiments.cifar --config=experiments/configs/imagenet_resnet34_resnet18.py:smoke

Recipe (torchdistill's and mdistiller's ImageNet ResNet-34 -> ResNet-18): 100 epochs, batch 256,
SGD momentum 0.9, lr 0.1, x0.1 at epochs 30/60/90, weight decay 1e-4, random-resized crop 224 +
flip on the loader workers, eval resize 256 + center crop 224; KD with T=1 and CE and KD weighted
0.5 each (mdistiller configs/imagenet/r34_r18/kd.yaml). Both references start from torchvision's
pretrained ResNet-34 teacher; here the teacher stage trains it from labels unless
`--config.teacher.checkpoint` names an earlier run's. The data: an extracted ImageNet in the folder
layout (`data_dir`/train/<wnid>/*.JPEG, `data_dir`/val/<wnid>/*.JPEG; docs/data.md), streamed
through Grain. Expected result: not measured here (no ImageNet and no accelerator on the
development machines).

Config-string arguments: `data_dir=<ROOT>` (default ~/imagenet), `method=<name>` (default kd),
`seed=<int>`, `smoke`: one epoch (3 steps of 16) per stage at 32x32 on a tiny generated folder (3 classes of 40x40
JPEGs, written once under the temp folder unless `data_dir` is given), a check that the streamed
pipeline runs before the real run.
"""

import os
import tempfile

from experiments.configs import common


def smoke_folder(root: str) -> str:
    """A tiny image folder (3 classes, 16 train / 4 val 40x40 JPEGs each), written once."""
    import numpy as np
    from PIL import Image

    done = os.path.join(root, ".complete")
    if os.path.exists(done):
        return root
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 4)):
        for label in range(3):
            folder = os.path.join(root, split, f"class{label}")
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                image = rng.integers(0, 80, (40, 40, 3)).astype(np.uint8)
                image[..., label] += 150
                Image.fromarray(image).save(os.path.join(folder, f"{i:03d}.jpg"))
    open(done, "w").close()
    return root


def get_config(arg=None):
    a = common.parse_arg(arg, smoke=False, method="kd", seed=0, data_dir="")
    c = common.base(a.method)
    c.seed = a.seed
    c.dataset.name = "imagenet2012"
    c.dataset.data_dir = a.data_dir or "~/imagenet"
    c.dataset.image_size = 224
    c.augment.flip = True
    c.batch_size = 256
    c.eval_batch_size = 500
    c.teacher.model = "resnet34_imagenet"
    c.student.model = "resnet18_imagenet"
    c.teacher.epochs = c.student.epochs = 100
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.1
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 1e-4
    c.optimizer.schedule = "multistep"
    c.optimizer.decay_epochs = (30, 60, 90)
    c.optimizer.decay_factor = 0.1
    if a.method == "kd":
        c.distill.temperature = 1.0
        c.distill.ce_weight = 0.5
        c.distill.kd.weight = 0.5
    if a.smoke:
        common.smoke(c)
        c.dataset.mock_examples = 0  # a real (tiny) folder instead of tfds mock data
        c.dataset.name = "folder"
        c.dataset.data_dir = a.data_dir or smoke_folder(os.path.join(tempfile.gettempdir(), "kdjax-smoke-imagefolder"))
        c.dataset.image_size = 32
        c.dataset.loader_workers = 1
        c.batch_size = 16
    return c
