"""Distil, prune, quantise and export in one command, and one table (see kdjax/compress.py).

    python -m experiments.compress                       # offline default: digits
    python -m experiments.compress --config=experiments/configs/compress_digits.py --workdir=runs/compress
    python -m experiments.compress --config=experiments/configs/compress_cifar10_resnet18_mobilenetv2.py

Writes <workdir>/compress.json, compress.md (printed) and compress.png, the exported models in
<workdir>/export/, and the trained variants' runs in <workdir>/variants/<name>/. Rerunning the
same command skips what is finished and resumes what is not.
"""

import os

from experiments import launch


def _show(report, workdir):
    from kdjax import compress

    return compress.format_table(report) + f"\n\nwritten: {os.path.join(workdir, 'compress.md')}, compress.json, compress.png"


def _run(config, workdir, overwrite=False):
    """compress.run, after refusing a --config override that no part of the command reads (e.g.
    --config.prune.sparsity, which every pruning variant sets itself)."""
    from absl import flags
    from ml_collections import config_flags

    from kdjax import compress

    compress.check_overrides(config, config_flags.get_override_values(flags.FLAGS["config"]))
    return compress.run(config, workdir, overwrite=overwrite)


if __name__ == "__main__":
    launch.run_main(os.path.join(os.path.dirname(__file__), "configs", "compress_digits.py"), runner=_run, show=_show)
