"""CIFAR experiments from config files.

    python -m experiments.cifar --config=experiments/configs/cifar10_resnet18_mobilenetv2.py
    python -m experiments.cifar --config=experiments/configs/cifar10_resnet18_mobilenetv2.py:smoke
"""

from experiments import launch

if __name__ == "__main__":
    launch.run_main()
