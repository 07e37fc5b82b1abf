"""CIFAR-100 benchmark pair (RepDistiller / mdistiller recipe): vgg13 -> mobilenetv2_half.

    python -m experiments.cifar --config=experiments/configs/cifar100_vgg13_mobilenetv2_half.py
    python -m experiments.cifar --config=experiments/configs/cifar100_vgg13_mobilenetv2_half.py:method=crd
    python -m experiments.cifar --config=experiments/configs/cifar100_vgg13_mobilenetv2_half.py:method=dkd,seed=1

Recipe: 240 epochs, batch 64, SGD momentum 0.9, lr 0.05 (student mobilenetv2_half: 0.01), x0.1 at epochs
150/180/210, weight decay 5e-4, random crop (pad 4) + flip; `method=` picks any kdjax method with
the reference weights (KD 0.9 / CE 0.1 at T=4; FitNet 100 (add `init_epochs=30` for hint pre-training); AT 1000; SP 3000;
RKD 1; PKT 30000; NST 50; CRD 0.8; DKD beta 6: mdistiller vgg13_mv2: beta 6).
Expected result: not measured here (no accelerator and no CIFAR-100 on the development machines).
"""

from experiments.configs import common


def get_config(arg=None):
    c = common.cifar_recipe(arg, "cifar100", "vgg13", "mobilenetv2_half", student_lr_scale=0.2, dkd_beta=6.0)
    # kdjax's VGG sows all five blocks (RepDistiller's f0..f4); RepDistiller pairs feat[1:-1], i.e.
    # VGG blocks 1..4 with the student's four stages f1..f4.
    for method in ("at", "nst", "vid"):
        c.distill[method].teacher = "stage2,stage3,stage4,stage5"
    c.distill.reviewkd.teacher = "stage2,stage3,stage4,stage5,embedding"
    return c
