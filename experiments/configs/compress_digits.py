"""Compression pipeline, offline default: digits, cnn_small teacher -> 512-256 MLP student (KD).

    python -m experiments.compress
    python -m experiments.compress --config=experiments/configs/compress_digits.py:seed=1

Trains the teacher, the KD student and the scratch baseline (as experiments/configs/digits.py, but
with a 167k-parameter student so that compression means something), then: magnitude pruning to
50%, 70% and 90% (90%: gradual, Zhu & Gupta) and 2:4, channel pruning of half the hidden units,
each fine-tuned with KD; int8 post-training quantisation (weights only, and static with calibrated
int8 activations) and bf16 weights; quantisation-aware training with KD (static int8). Exports
every model and writes compress.json / compress.md / compress.png (kdjax/compress.py).
Measured results: see docs/compression.md.
Config-string arguments: method (distillation method, default kd), seed. Methods that match
feature maps (digits.FEATURE_MAP_METHODS) need a convolutional student: they get a cnn_small
student (the teacher's architecture, 65,834 parameters) and no weight-only int8 row, which Qwix
cannot make for convolutions.
"""

import ml_collections

from experiments.configs import common, digits


def get_config(arg=None):
    c = digits.get_config(arg)
    conv = bool(set(common.parse_arg(arg, method="kd", seed=0).method.split("+")) & digits.FEATURE_MAP_METHODS)
    c.student.model = "cnn_small" if conv else "mlp"
    if not conv:
        c.student.kwargs.hidden = (512, 256)
    c.student.learning_rate_scale = 1.0  # Adam 3e-3: the wider MLP is unstable at digits' 1e-2
    # Fine-tuning after pruning or for QAT: 10 epochs at a tenth of the student's rate.
    c.prune.epochs = 10
    c.prune.learning_rate_scale = 0.1
    c.quant.epochs = 10
    c.quant.learning_rate_scale = 0.1
    c.quant.mode = "static"
    c.quant.calibration_batches = 4

    c.compress = ml_collections.ConfigDict()
    c.compress.ptq = "static,bf16" if conv else "weights,static,bf16"  # post-training rows of the float student
    c.compress.latency_calls = 30
    v = c.compress.variants = ml_collections.ConfigDict()
    for pct in (50, 70):
        v[f"prune{pct}"] = {"stage": "prune", "prune": {"method": "magnitude", "sparsity": pct / 100}}
    v.prune90 = {"stage": "prune", "prune": {"method": "magnitude", "sparsity": 0.9, "end_epoch": 5.0}}
    v.nm24 = {"stage": "prune", "prune": {"method": "nm", "n": 2, "m": 4}}
    v.channel50 = {"stage": "prune", "prune": {"method": "channel", "sparsity": 0.5, "criterion": "l1"}}
    v.qat = {"stage": "qat", "quant": {"mode": "static"}}
    return c
