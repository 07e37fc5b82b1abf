"""Byte-level language-model distillation end to end (kdjax.lm): teacher, from-scratch student and
one distilled student per method, then a table of held-out bits per byte and teacher agreement.

    python -m experiments.lm
    python -m experiments.lm --config=experiments/configs/lm/stdlib_bytes.py:smoke --workdir=/tmp/lm
    python -m experiments.lm --config.methods=kd,reverse_kl --config.student.steps=400

The same command again resumes an interrupted run (a finished stage is skipped). The default
workdir is runs/lm-<hash of the config's identity>.
"""

import os

from experiments import launch


def _workdir(config, config_path: str) -> str:
    from kdjax import lm

    return os.path.join("runs", f"{os.path.splitext(os.path.basename(config_path.split(':')[0]))[0]}-"
                                f"{lm.digest(config)}")


def _show(summary, workdir: str) -> str:
    from kdjax import lm

    return f"{lm.format_table(summary)}\ntable: {os.path.join(workdir, 'lm.md')}"


def _run(config, workdir: str, overwrite: bool = False):
    from kdjax import lm

    return lm.run(config, workdir, overwrite=overwrite)


if __name__ == "__main__":
    launch.run_main(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "lm", "stdlib_bytes.py"),
                    runner=_run, show=_show, workdir_of=_workdir, report=False)
