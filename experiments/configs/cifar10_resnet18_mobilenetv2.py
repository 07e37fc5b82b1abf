"""CIFAR-10: ResNet-18 teacher -> MobileNetV2 student (CIFAR layouts), KD T=4, 0.9*KD + 0.1*CE.

    python -m experiments.cifar --config=experiments/configs/cifar10_resnet18_mobilenetv2.py
    python -m experiments.cifar --config=experiments/configs/cifar10_resnet18_mobilenetv2.py:smoke

Recipe (RepDistiller-style): 240 epochs, batch 64, SGD momentum 0.9, lr 0.05 for the teacher and
0.01 for MobileNetV2, x0.1 at epochs 150/180/210, weight decay 5e-4, random crop (pad 4) + flip.
Needs CIFAR-10 prepared by tensorflow-datasets (or `--config.dataset.manual_dir` pointing at a
folder holding cifar-10-python.tar.gz). Expected result: not measured here (no accelerator and no
CIFAR-10 on the development machines).

`:smoke` runs the same pipeline on `tfds.testing.mock_data` for a handful of steps per stage: a
check that a TPU/GPU/CPU setup compiles and runs before the real run.
"""

from experiments.configs import common


def get_config(arg=None):
    a = common.parse_arg(arg, smoke=False, method="kd", seed=0)
    c = common.base(a.method)
    c.seed = a.seed
    c.dataset.name = "cifar10"
    c.batch_size = 64
    c.augment.crop_padding = 4
    c.augment.flip = True
    c.teacher.model = "resnet18"
    c.teacher.epochs = 240
    c.teacher.learning_rate = 0.05
    c.student.model = "mobilenetv2"
    c.student.epochs = 240
    c.student.learning_rate = 0.01
    c.optimizer.name = "sgd"
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 5e-4
    c.optimizer.schedule = "multistep"
    c.optimizer.decay_epochs = (150, 180, 210)
    c.distill.temperature = 4.0
    if a.smoke:
        common.smoke(c)
    return c
