"""Compression pipeline for the headline pair: CIFAR-10, ResNet-18 teacher -> MobileNetV2 student.

    python -m experiments.compress --config=experiments/configs/compress_cifar10_resnet18_mobilenetv2.py
    python -m experiments.compress --config=experiments/configs/compress_cifar10_resnet18_mobilenetv2.py:smoke

The experiment of experiments/configs/cifar10_resnet18_mobilenetv2.py (same recipe and arguments),
then: magnitude pruning to 50%, 70% and 90% (gradual) and 2:4, each fine-tuned with KD for 20
epochs at a tenth of the student's rate; static int8 post-training quantisation and bf16 weights;
QAT with KD (static int8). Left out, because they cannot apply to MobileNetV2: channel pruning
(kdjax.prune.channel_prune handles MLP and plain-CNN students; MobileNetV2's residual additions tie
channels) and weight-only int8 (Qwix 0.1.8 quantises a convolution's weights only together with its
activations). The depthwise 3x3 kernels (one input channel) are left out of 2:4. Expected results:
not measured here (no accelerator and no CIFAR-10 on the development machines); `:smoke` runs the
whole pipeline on tfds mock data.
"""

import ml_collections

from experiments.configs import cifar10_resnet18_mobilenetv2, common


def get_config(arg=None):
    c = cifar10_resnet18_mobilenetv2.get_config(arg)
    smoke = common.parse_arg(arg, smoke=False, method="kd", seed=0, init_epochs=0).smoke
    c.prune.epochs = 1 if smoke else 20
    c.prune.learning_rate_scale = 0.1
    c.quant.epochs = 1 if smoke else 20
    c.quant.learning_rate_scale = 0.1
    c.quant.mode = "static"
    c.quant.calibration_batches = 2 if smoke else 8

    c.compress = ml_collections.ConfigDict()
    c.compress.ptq = "static,bf16"
    c.compress.latency_calls = 3 if smoke else 30
    v = c.compress.variants = ml_collections.ConfigDict()
    for pct in (50, 70):
        v[f"prune{pct}"] = {"stage": "prune", "prune": {"method": "magnitude", "sparsity": pct / 100}}
    v.prune90 = {"stage": "prune", "prune": {"method": "magnitude", "sparsity": 0.9,
                                             "end_epoch": 0.5 if smoke else 10.0}}
    v.nm24 = {"stage": "prune", "prune": {"method": "nm", "n": 2, "m": 4, "exclude": r"block\d+_\d+/conv2/"}}
    v.qat = {"stage": "qat", "quant": {"mode": "static"}}
    return c
