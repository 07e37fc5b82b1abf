"""CIFAR-100 benchmark pair (RepDistiller / mdistiller recipe): resnet32x4 -> shufflev2.

    python -m experiments.cifar --config=experiments/configs/cifar100_resnet32x4_shufflev2.py
    python -m experiments.cifar --config=experiments/configs/cifar100_resnet32x4_shufflev2.py:method=crd
    python -m experiments.cifar --config=experiments/configs/cifar100_resnet32x4_shufflev2.py:method=dkd,seed=1

Recipe: 240 epochs, batch 64, SGD momentum 0.9, lr 0.05 (student shufflev2: 0.01), x0.1 at epochs
150/180/210, weight decay 5e-4, random crop (pad 4) + flip; `method=` picks any kdjax method with
the reference weights (KD 0.9 / CE 0.1 at T=4; FitNet 100 (add `init_epochs=30` for hint pre-training); AT 1000; SP 3000;
RKD 1; PKT 30000; NST 50; CRD 0.8; DKD beta 8: mdistiller res32x4_shuv2: beta 8 (its default)).
Expected result: not measured here (no accelerator and no CIFAR-100 on the development machines).
"""

from experiments.configs import common


def get_config(arg=None):
    return common.cifar_recipe(arg, "cifar100", "resnet32x4", "shufflev2", student_lr_scale=0.2, dkd_beta=8.0)
