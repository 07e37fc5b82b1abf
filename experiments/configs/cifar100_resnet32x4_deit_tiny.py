"""CIFAR-100, a CNN teacher distilled into a ViT student through DeiT's distillation token (as
DeiT's RegNet -> ViT): resnet32x4 -> deit_tiny_distilled_patch4_32 (ViT-Ti, patch 4 on 32x32,
with a distillation token and a second head), `distill.method=deit` (hard distillation:
1/2 CE(class head, y) + 1/2 CE(distillation head, the teacher's argmax)).

    python -m experiments.cifar --config=experiments/configs/cifar100_resnet32x4_deit_tiny.py
    python -m experiments.cifar --config=experiments/configs/cifar100_resnet32x4_deit_tiny.py --config.distill.deit.mode=soft
    python -m experiments.cifar --config=experiments/configs/cifar100_resnet32x4_deit_tiny.py:method=kd

Recipe: experiments/configs/common.py `cifar_vit_recipe` (AdamW 1e-3, weight decay 0.05, cosine
after 5 warm-up epochs, 200 epochs per stage, batch 128, label smoothing 0.1, crop + flip). The
student's report gives the class head's, the distillation head's and both heads' test accuracy
(test_accuracy_cls, test_accuracy_dist, test_accuracy_heads_*). `:smoke` runs a few steps on
mock data.
Expected result: not measured here (no accelerator and no CIFAR-100 on the development machines).
"""

from experiments.configs import common


def get_config(arg=None):
    return common.cifar_vit_recipe(arg, "cifar100", "resnet32x4", "deit_tiny_distilled_patch4_32", method="deit")
