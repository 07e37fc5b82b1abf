"""The run folder and identity of every shipped config are pinned, with the values computed on
main at 4052a98 (before the package split of issue 20): a refactor that moved a run folder would
strand every run made before it (a rerun would start afresh instead of resuming).

If a change is *meant* to alter what a config trains, update the pin in the same commit and say so
in its message; adding a field with a default leaves the folder names alone (they hash only what
differs from kdjax's defaults) but changes the identity digest.
"""

import hashlib
import importlib
import json
import os

import pytest

from experiments import launch
from kdjax import distill, runs

# config -> (default workdir name, sha256[:12] of its run identity)
PINNED = {
    "cifar100_resnet32x4_deit_tiny": ("cifar100_resnet32x4_deit_tiny-deit-s0-0e9c409c", "40b84b10441e"),
    "cifar100_vit_tiny_resnet8x4": ("cifar100_vit_tiny_resnet8x4-kd-s0-2d3a48a2", "044c428b1fdb"),
    "cifar100_resnet32x4_mobilenetv2_half": ("cifar100_resnet32x4_mobilenetv2_half-kd-s0-a1352424", "f2c48cc6e0e9"),
    "cifar100_resnet32x4_resnet8x4": ("cifar100_resnet32x4_resnet8x4-kd-s0-4ef0dbbb", "8ed25c8db002"),
    "cifar100_resnet32x4_shufflev1": ("cifar100_resnet32x4_shufflev1-kd-s0-486a30fa", "8a2b2dc2d733"),
    "cifar100_resnet32x4_shufflev2": ("cifar100_resnet32x4_shufflev2-kd-s0-4419c81c", "535b82875e4f"),
    "cifar100_resnet50_mobilenetv2_half": ("cifar100_resnet50_mobilenetv2_half-kd-s0-4c4c90f6", "ebc017a2e7a5"),
    "cifar100_resnet50_vgg8": ("cifar100_resnet50_vgg8-kd-s0-9366a18b", "63717ab03534"),
    "cifar100_vgg13_mobilenetv2_half": ("cifar100_vgg13_mobilenetv2_half-kd-s0-e33f0252", "dad1802d0fb1"),
    "cifar100_vgg13_vgg8": ("cifar100_vgg13_vgg8-kd-s0-6adbbb3e", "5dfbeba3a534"),
    "cifar100_wrn_40_2_shufflev1": ("cifar100_wrn_40_2_shufflev1-kd-s0-f4bfaaec", "ae453a1f4eb1"),
    "cifar100_wrn_40_2_wrn_16_2": ("cifar100_wrn_40_2_wrn_16_2-kd-s0-477a13fc", "3825a83209e1"),
    "cifar10_resnet18_mobilenetv2": ("cifar10_resnet18_mobilenetv2-kd-s0-2128baa6", "b6360b8016ec"),
    "compress_cifar10_resnet18_mobilenetv2": ("compress_cifar10_resnet18_mobilenetv2-kd-s0-8cf49c58", "5ee6d5e1cf0f"),
    "compress_digits": ("compress_digits-kd-s0-d6ef9e91", "418484b02cff"),
    "digits": ("digits-kd-s0-c35795b4", "714de890c5db"),
    "digits_transfer": ("digits_transfer-ce-s0-de13ca35", "5fa2a9c015df"),
    "fashion_mnist": ("fashion_mnist-kd-s0-22026656", "bb0351d39a3b"),
    "imagenet_resnet34_resnet18": ("imagenet_resnet34_resnet18-kd-s0-dd03c7d3", "b67c5e11a893"),
    # added with issue 23's ImageNet pairs
    "folder_finetune": ("folder_finetune-kd-s0-8889abc2", "2795dcb7ee7c"),
    "imagenet_function_matching": ("imagenet_function_matching-kd-s0-5c1d5bbb", "30dc19d230c5"),
    "imagenet_resnet50_deit": ("imagenet_resnet50_deit-deit-s0-afacacad", "9ccf376c9b0f"),
    "imagenet_resnet50_mobilenetv2": ("imagenet_resnet50_mobilenetv2-kd-s0-56469f27", "dbccc198222e"),
}

# experiments/configs/digits.py:method=<m> -> its default workdir's hash
DIGITS_METHODS = {
    "kd": "c35795b4", "dkd": "c35795b4", "dist": "c35795b4", "lskd": "c35795b4", "wttm": "c35795b4",
    "mlkd": "c35795b4", "nkd": "c35795b4", "sdd": "1388925d", "mse_logits": "c35795b4", "fm": "c35795b4",
    "fitnet": "1388925d", "ofd": "1388925d", "at": "1388925d", "sp": "1388925d", "nst": "1388925d",
    "vid": "1388925d", "reviewkd": "1388925d", "kdsvd": "07005106", "fsp": "fb33107b", "ab": "9610a502",
    "ft": "cf00f91f", "rkd": "c35795b4", "pkt": "c35795b4", "cc": "c35795b4", "crd": "c35795b4",
    "adv": "c35795b4", "ce": "c35795b4",
    "deit": "55c3baf4",  # a small distilled ViT student (Method.vit_student)
    # appended after 'ce' (issue 24): the language-model divergences
    "reverse_kl": "c35795b4", "generalized_jsd": "c35795b4", "skew_kl": "c35795b4", "skew_reverse_kl": "c35795b4",
    "taid": "c35795b4", "ab_divergence": "c35795b4", "topk_kd": "c35795b4", "ickd": "1388925d",
    "skd": "c35795b4", "dist_plus": "07005106", "srd": "c35795b4",
}


def _path(name):
    return os.path.join("experiments", "configs", f"{name}.py")


def test_every_shipped_config_is_pinned():
    here = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs")
    shipped = {os.path.splitext(f)[0] for f in os.listdir(here)
               if f.endswith(".py") and not f.startswith(("_", "common"))}
    assert shipped == set(PINNED), "pin the workdir and identity of a new config here"


@pytest.mark.parametrize("name", sorted(PINNED))
def test_run_folder_and_identity_unchanged(name):
    config = importlib.import_module(f"experiments.configs.{name}").get_config()
    folder, digest = PINNED[name]
    assert os.path.basename(launch.default_workdir(config, _path(name))) == folder
    ident = json.dumps(runs.run_identity(config), sort_keys=True, default=str)
    assert hashlib.sha256(ident.encode()).hexdigest()[:12] == digest


def test_digits_run_folder_of_every_method_unchanged():
    assert list(distill.METHODS) == list(DIGITS_METHODS)  # the registry's order is part of the contract
    module = importlib.import_module("experiments.configs.digits")
    for method, digest in DIGITS_METHODS.items():
        got = launch.default_workdir(module.get_config(f"method={method}"), _path("digits"))
        assert os.path.basename(got) == f"digits-{method}-s0-{digest}", method
