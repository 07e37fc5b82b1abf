"""CIFAR-100 benchmark pair (RepDistiller / mdistiller recipe): resnet50 -> vgg8.

    python -m experiments.cifar --config=experiments/configs/cifar100_resnet50_vgg8.py
    python -m experiments.cifar --config=experiments/configs/cifar100_resnet50_vgg8.py:method=crd
    python -m experiments.cifar --config=experiments/configs/cifar100_resnet50_vgg8.py:method=dkd,seed=1

Recipe: 240 epochs, batch 64, SGD momentum 0.9, lr 0.05 (student vgg8: 0.05), x0.1 at epochs
150/180/210, weight decay 5e-4, random crop (pad 4) + flip; `method=` picks any kdjax method with
the reference weights (KD 0.9 / CE 0.1 at T=4; FitNet 100 (add `init_epochs=30` for hint pre-training); AT 1000; SP 3000;
RKD 1; PKT 30000; NST 50; CRD 0.8; DKD beta 8: no mdistiller config for this pair; its default 8 (not tuned here)).
Expected result: not measured here (no accelerator and no CIFAR-100 on the development machines).
"""

from experiments.configs import common


def get_config(arg=None):
    c = common.cifar_recipe(arg, "cifar100", "resnet50", "vgg8", dkd_beta=8.0)
    # kdjax's VGG sows all five blocks (RepDistiller's f0..f4); RepDistiller pairs feat[1:-1], i.e.
    # VGG blocks 1..4 with the teacher's four stages f1..f4.
    for method in ("at", "nst", "vid"):
        c.distill[method].student = "stage2,stage3,stage4,stage5"
    c.distill.reviewkd.student = "stage2,stage3,stage4,stage5,embedding"
    return c
