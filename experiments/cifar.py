"""CIFAR experiments from config files.

    python -m experiments.cifar --config=experiments/configs/cifar10_resnet18_mobilenetv2.py
    python -m experiments.cifar --config=experiments/configs/cifar10_resnet18_mobilenetv2.py:smoke
"""

from ml_collections import config_flags

from experiments import launch

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (required).", lock_config=True)

if __name__ == "__main__":
    launch.run_main(_CONFIG)
