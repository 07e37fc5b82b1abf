"""CIFAR-100 benchmark pair (RepDistiller / mdistiller recipe): resnet32x4 -> resnet8x4.

    python -m experiments.cifar --config=experiments/configs/cifar100_resnet32x4_resnet8x4.py
    python -m experiments.cifar --config=experiments/configs/cifar100_resnet32x4_resnet8x4.py:method=crd
    python -m experiments.cifar --config=experiments/configs/cifar100_resnet32x4_resnet8x4.py:method=dkd,seed=1

Recipe: 240 epochs, batch 64, SGD momentum 0.9, lr 0.05 (student resnet8x4: 0.05), x0.1 at epochs
150/180/210, weight decay 5e-4, random crop (pad 4) + flip; `method=` picks any kdjax method with
the reference weights (KD 0.9 / CE 0.1 at T=4; FitNet 100 (add `init_epochs=30` for hint pre-training); AT 1000; SP 3000;
RKD 1; PKT 30000; NST 50; CRD 0.8; DKD beta 8: mdistiller res32x4_res8x4: beta 8; the methods of
2021-2026 with their reference code's weights: ICKD 2.5 (its CIFAR-100 script), SKD 1 + 1 without
CE, DIST+ 2 with beta = gamma = 2, SRD 1 (torchdistill's ImageNet configs: no CIFAR-100 setting
is published for them); resnet8x4's last stage has resnet32x4's 256 channels, as DIST+ needs).
Expected result: not measured here (no accelerator and no CIFAR-100 on the development machines).
"""

from experiments.configs import common


def get_config(arg=None):
    return common.cifar_recipe(arg, "cifar100", "resnet32x4", "resnet8x4", dkd_beta=8.0)
