"""CIFAR-100, a ViT teacher distilled into a CNN student (the cross-architecture direction OFAKD
studies): vit_tiny_patch4_32 (ViT-Ti, patch 4 on 32x32) -> resnet8x4, KD (T = 4, CE 0.1 / KD 0.9).

    python -m experiments.cifar --config=experiments/configs/cifar100_vit_tiny_resnet8x4.py
    python -m experiments.cifar --config=experiments/configs/cifar100_vit_tiny_resnet8x4.py:method=dkd

Recipe: experiments/configs/common.py `cifar_vit_recipe` (AdamW 1e-3, weight decay 0.05, cosine
after 5 warm-up epochs, 200 epochs per stage, batch 128, label smoothing 0.1, crop + flip), for
the CNN student too (one optimizer per run). The ViT's features are tokens (block1..block12,
(B, 65, 192)), not maps: feature methods that pair maps with the CNN's do not apply; logit
methods do. `:smoke` runs a few steps on mock data.
Expected result: not measured here (no accelerator and no CIFAR-100 on the development machines).
"""

from experiments.configs import common


def get_config(arg=None):
    return common.cifar_vit_recipe(arg, "cifar100", "vit_tiny_patch4_32", "resnet8x4")
