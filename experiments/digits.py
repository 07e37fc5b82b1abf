"""The offline default: teacher, distilled student and from-scratch student on sklearn's digits.

    python -m experiments.digits
    python -m experiments.digits --config.distill.method=dkd
"""

import os

from experiments import launch

if __name__ == "__main__":
    launch.run_main(os.path.join(os.path.dirname(__file__), "configs", "digits.py"))
