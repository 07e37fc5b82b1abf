"""CIFAR-10: ResNet-18 teacher -> MobileNetV2 student (CIFAR layouts), KD T=4, 0.9*KD + 0.1*CE.

    python -m experiments.cifar --config=experiments/configs/cifar10_resnet18_mobilenetv2.py
    python -m experiments.cifar --config=experiments/configs/cifar10_resnet18_mobilenetv2.py:smoke

Recipe (RepDistiller-style): 240 epochs, batch 64, SGD momentum 0.9, lr 0.05 for the teacher and
0.01 for MobileNetV2, x0.1 at epochs 150/180/210, weight decay 5e-4, random crop (pad 4) + flip.
Needs CIFAR-10 prepared by tensorflow-datasets (or `--config.dataset.manual_dir` pointing at a
folder holding cifar-10-python.tar.gz). Expected result: not measured here (no accelerator and no
CIFAR-10 on the development machines).

Config-string arguments as the CIFAR-100 pairs (`method=`, `seed=`, `init_epochs=`, `smoke`).
`:smoke` runs the same pipeline on `tfds.testing.mock_data` for a handful of steps per stage: a
check that a TPU/GPU/CPU setup compiles and runs before the real run.
"""

from experiments.configs import common


def get_config(arg=None):
    return common.cifar_recipe(arg, "cifar10", "resnet18", "mobilenetv2", student_lr_scale=0.2)
