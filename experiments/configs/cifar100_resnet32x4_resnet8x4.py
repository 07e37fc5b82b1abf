"""CIFAR-100 benchmark pair (RepDistiller / mdistiller recipe): resnet32x4 -> resnet8x4.

    python -m experiments.cifar --config=experiments/configs/cifar100_resnet32x4_resnet8x4.py

Recipe: 240 epochs, batch 64, SGD lr 0.05 momentum 0.9, x0.1 at epochs 150/180/210, weight decay
5e-4, random crop (pad 4) + flip, KD at T=4 with 0.1*CE + 0.9*KD. Expected result: not measured
here (no accelerator and no CIFAR-100 on the development machines). Reference papers report
about 73.3% top-1 for KD on this pair.
Config-string arguments: `smoke`, `method=<name>`, `seed=<int>`.
"""

from experiments.configs import common


def get_config(arg=None):
    a = common.parse_arg(arg, smoke=False, method="kd", seed=0)
    c = common.base(a.method)
    c.seed = a.seed
    c.dataset.name = "cifar100"
    c.batch_size = 64
    c.augment.crop_padding = 4
    c.augment.flip = True
    c.teacher.model = "resnet32x4"
    c.teacher.epochs = 240
    c.student.model = "resnet8x4"
    c.student.epochs = 240
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.05
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 5e-4
    c.optimizer.schedule = "multistep"
    c.optimizer.decay_epochs = (150, 180, 210)
    c.distill.temperature = 4.0
    if a.smoke:
        common.smoke(c)
    return c
