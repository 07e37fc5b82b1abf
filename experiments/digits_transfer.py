"""The transfer-learning demo on digits over several seeds: one table.

    python -m experiments.digits_transfer [--seeds=0,1,2] [--workdir=runs/digits_transfer]
    python -m experiments.digits_transfer --data=fashion_mnist \
        --manual_dir=/usr/share/datasets/fashion-mnist --workdir=runs/fashion_transfer

Pre-trains once on digits 0-4 (experiments/configs/digits_transfer.py, mode=pretrain), then per
seed learns digits 5-9 from 10 images per class three ways: fine-tuning the pretrained network
with a new head, a linear probe on its frozen features, and from scratch. Prints a markdown table
of test accuracy (last epoch; mean +- sample std over seeds) and writes <workdir>/results.json.
Finished runs are skipped when rerun.
"""

import json
import os

import numpy as np
from absl import app, flags

from experiments.configs import digits_transfer
from kdjax import train

_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Random seeds.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/digits_transfer", "Root of the run directories.")
_DATA = flags.DEFINE_enum("data", "digits", ["digits", "fashion_mnist"], "Data set (classes 0-4, then 5-9).")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Folder of the Fashion-MNIST IDX archives.")


def _config(arg: str):
    config = digits_transfer.get_config(f"{arg},data={_DATA.value}")
    if _MANUAL_DIR.value:
        config.dataset.manual_dir = _MANUAL_DIR.value
    return config


def main(argv):
    del argv
    root = _WORKDIR.value
    pretrain_dir = os.path.join(root, "pretrain")
    pre = train.run(_config("mode=pretrain"), pretrain_dir)["teacher"]
    results = {"pretrain (classes 0-4, all labels)": [pre["test_accuracy"]]}
    for seed in map(int, _SEEDS.value):
        for mode in ("finetune", "probe", "scratch"):
            config = _config(f"mode={mode},seed={seed}")
            if mode != "scratch":
                config.init.from_run = pretrain_dir
            summary = train.run(config, os.path.join(root, f"seed{seed}", mode))
            results.setdefault(f"{mode} (classes 5-9, 10 per class)", []).append(summary["teacher"]["test_accuracy"])
    lines = ["| run | test accuracy (mean +- std) | seeds |", "|---|---|---|"]
    for name, accs in results.items():
        std = f" +- {np.std(accs, ddof=1):.4f}" if len(accs) > 1 else ""
        lines.append(f"| {name} | {np.mean(accs):.4f}{std} | {len(accs)} |")
    print("\n".join(lines))
    with open(os.path.join(root, "results.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
