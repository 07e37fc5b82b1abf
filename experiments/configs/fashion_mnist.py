"""Fashion-MNIST (real, 60k train / 10k test, 28x28x1): the whole-run speed comparison with PyTorch.

    apt-get install dataset-fashion-mnist     # Debian: the four IDX archives, offline
    python -m experiments.cifar --config=experiments/configs/fashion_mnist.py \
        --config.dataset.manual_dir=/usr/share/datasets/fashion-mnist

Recipe: cnn_small teacher for 3 epochs, then the 32-unit MLP student distilled for 5 epochs (KD,
T = 4, 0.9 * KD + 0.1 * CE, kdjax.distill.METHODS['kd']) and the same student from scratch for 5
epochs; batch 128, Adam at Adam's default rate (`optimizer.learning_rate=None`, resolved by
kdjax.optim.resolve_learning_rate), cosine decay to 0 over each stage, no weight decay, no
augmentation (so the frozen teacher's logits are computed once: `distill.cache_teacher='auto'`).
`experiments/torch_reference/fashion_mnist.py` is the same recipe in PyTorch and
`experiments/torch_reference/compare_fashion_mnist.py` runs both back to back (it reads the resolved
learning rates, temperature and weights from this file). Runtime and accuracies: see
docs/benchmarks.md (the whole Fashion-MNIST recipe against PyTorch).

Config-string arguments (``--config=experiments/configs/fashion_mnist.py:method=dkd,seed=1``):
  method  distillation method name(s) (kdjax.distill.METHODS); feature-map methods switch the
          student to cnn_tiny, as in digits.py
  seed    random seed
"""

from experiments.configs import common
from experiments.configs.digits import FEATURE_MAP_METHODS


def get_config(arg=None):
    a = common.parse_arg(arg, method="kd", seed=0)
    c = common.base(a.method)
    c.seed = a.seed
    c.dataset.name = "fashion_mnist"  # read from the IDX archives in --config.dataset.manual_dir
    c.batch_size = 128
    c.log_every_steps = 100
    c.teacher.model = "cnn_small"
    c.teacher.epochs = 3
    c.student.model = "cnn_tiny" if set(a.method.split("+")) & FEATURE_MAP_METHODS else "mlp"
    c.student.epochs = 5
    c.optimizer.name = "adam"  # learning rate: None = Adam's default (kdjax.optim.DEFAULT_LEARNING_RATES)
    c.optimizer.weight_decay = 0.0
    c.optimizer.schedule = "cosine"
    c.distill.temperature = 4.0
    return c
