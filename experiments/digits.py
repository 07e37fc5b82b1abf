"""The offline default: teacher, distilled student and from-scratch student on sklearn's digits.

    python -m experiments.digits
    python -m experiments.digits --config.distill.method=dkd
"""

import os

from ml_collections import config_flags

from experiments import launch

_DEFAULT = os.path.join(os.path.dirname(__file__), "configs", "digits.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT, "Experiment config file.", lock_config=True)

if __name__ == "__main__":
    launch.run_main(_CONFIG)
