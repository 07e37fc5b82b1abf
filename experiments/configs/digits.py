"""Offline default: sklearn's 8x8 digits, small CNN teacher -> 32-unit MLP student, KD (T=4).

    python -m experiments.digits
    python -m experiments.digits --config.distill.method=dkd
    python -m experiments.digits --config=experiments/configs/digits.py:method=at

Trains the teacher, distils the student, trains the same student from scratch, and prints the
comparison table. Methods that match feature maps (fitnet, at, sp, nst, vid, reviewkd) need a
convolutional student: choose the method with the config-string argument (`:method=at`), which
also switches the student to `cnn_tiny`, or add `--config.student.model=cnn_tiny`.
Learning rates: every stage runs at 3x the optimizer's own default rate
(kdjax.optim.DEFAULT_LEARNING_RATES; Adam: 3e-3), so `--config.optimizer.name=adadelta` (or any
other optimizer) gets a rate that suits it: the KD student reaches >= 0.96 with each of the six
(tests/test_optim.py). `--config.optimizer.learning_rate=x` sets the base rate instead.
Measured results: see README.md.
Config-string arguments (``--config=experiments/configs/digits.py:method=at,seed=1``):
  method  distillation method name(s) (see kdjax.distill.METHODS)
  seed    random seed
"""

from experiments.configs import common

FEATURE_MAP_METHODS = {"fitnet", "at", "sp", "nst", "vid", "reviewkd"}


def get_config(arg=None):
    a = common.parse_arg(arg, method="kd", seed=0)
    c = common.base(a.method)
    c.seed = a.seed
    c.dataset.name = "digits"
    c.batch_size = 64
    c.log_every_steps = 100
    c.augment.crop_padding = 0  # 8x8 digits: crops hurt the MLP student; no flips (not flip-invariant)
    c.teacher.model = "cnn_small"
    c.teacher.epochs = 20
    # Methods that match feature maps need a convolutional student; the others use the MLP.
    c.student.model = "cnn_tiny" if set(a.method.split("+")) & FEATURE_MAP_METHODS else "mlp"
    c.student.epochs = 60
    # 3x the optimizer's default (Adam: 3e-3): the rate this config was tuned at for Adam, as a
    # multiple so that it carries over to other optimizers (at the earlier student rate, 10x, SGD
    # diverges: momentum 0.9 at 0.5).
    c.teacher.learning_rate_scale = 3.0
    c.student.learning_rate_scale = 3.0
    c.optimizer.name = "adam"  # learning_rate None: Adam's default 1e-3 (x the scales above)
    c.optimizer.weight_decay = 0.0
    c.optimizer.schedule = "cosine"
    c.throughput_batch = 512
    return c
