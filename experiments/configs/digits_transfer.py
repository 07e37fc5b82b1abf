"""Transfer learning on sklearn's digits, offline: pre-train on digits 0-4, then learn digits 5-9
from 10 labelled images per class (with `data=fashion_mnist`: the same on Fashion-MNIST's classes).

    python -m experiments.digits_transfer            # the whole demo over 3 seeds: table in docs/transfer.md
    python -m experiments.digits --config=experiments/configs/digits_transfer.py:mode=pretrain
    python -m experiments.digits --config=experiments/configs/digits_transfer.py:mode=finetune,seed=1 \\
        --config.init.from_run=runs/<the pretrain run>

Config-string arguments:
  mode  pretrain  cnn_small on digits 0-4, every training image, 20 epochs
        finetune  digits 5-9, 10 images per class: start from the pretrained network (init.from_run),
                  new head (init.reinit='head'), every layer trained
        probe     the same, but only the head trains (optimizer.freeze='^(?!head/)': a linear probe
                  on frozen features, BatchNorm statistics included) at 10x the rate
        scratch   the same few-shot data, no pre-training
  seed  random seed (it also draws the 10 images per class)
  data  digits (default, offline) or fashion_mnist (real data: `apt-get install
        dataset-fashion-mnist`, then --config.dataset.manual_dir=/usr/share/datasets/fashion-mnist,
        or the driver's --manual_dir): pre-training on classes 0-4 (t-shirt, trouser, pullover,
        dress, coat; 30k images) for 3 epochs of batch 128, few-shot on 5-9 (sandal, shirt,
        sneaker, bag, ankle boot)
The few-shot stages train 30 epochs of 5 steps (batch 10), Adam 3e-3, cosine. Measured results:
docs/transfer.md.
"""

from experiments.configs import common

MODES = ("pretrain", "finetune", "probe", "scratch")


def get_config(arg=None):
    a = common.parse_arg(arg, mode="finetune", seed=0, data="digits")
    if a.mode not in MODES:
        raise ValueError(f"unknown mode {a.mode!r}; choose one of: {', '.join(MODES)}")
    if a.data not in ("digits", "fashion_mnist"):
        raise ValueError(f"unknown data {a.data!r}; choose one of: digits, fashion_mnist")
    c = common.base("ce")
    c.seed = a.seed
    c.stages = "teacher"  # one model trained from labels per run
    c.dataset.name = a.data
    c.teacher.model = "cnn_small"
    c.student.model = "mlp"  # unused (no student stage); validated like every config
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 3e-3
    c.optimizer.weight_decay = 0.0
    c.optimizer.schedule = "cosine"
    c.log_every_steps = 50
    if a.mode == "pretrain":
        c.dataset.classes = "0,1,2,3,4"
        c.batch_size = 64 if a.data == "digits" else 128
        c.teacher.epochs = 20 if a.data == "digits" else 3
        return c
    c.dataset.classes = "5,6,7,8,9"
    c.dataset.train_per_class = 10
    c.batch_size = 10
    c.teacher.epochs = 30
    if a.mode in ("finetune", "probe"):
        c.init.role = "teacher"
        c.init.stages = "teacher"
        c.init.reinit = "head"
    if a.mode == "probe":
        c.optimizer.freeze = "^(?!head/)"
        c.optimizer.head_learning_rate_scale = 10.0
    return c
