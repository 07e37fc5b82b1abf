"""Hyper-parameter search with Optuna over kdjax runs (library: kdjax/sweep.py).

    python -m experiments.sweep --config=experiments/configs/sweeps/digits_kd.py
    python -m experiments.sweep --config=experiments/configs/sweeps/digits_kd.py --config.n_trials=40
    python -m experiments.sweep --config=... --workdir=runs/sweeps/mine --storage=postgresql://user@host/db
    python -m experiments.sweep --config=... --report_only      # rewrite trials.csv, best.json, plots

Flags: --config (a sweep config file: experiments/configs/sweeps/), --workdir (the sweep folder,
default runs/sweeps/<study>), --storage (an RDB URL; default: a journal file in the sweep folder),
--report_only. The same command started in several shells (or on several hosts sharing the sweep
folder) makes several workers of one study; rerunning it after a kill continues the study.
Bad input: one line on stderr, exit status 2, nothing written.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import launch  # --workdir, and the one-line error helpers

SWEEPS_DIR = os.path.join(launch.CONFIGS_DIR, "sweeps")
DEFAULT_CONFIG = os.path.join(SWEEPS_DIR, "digits_kd.py")
_STORAGE = flags.DEFINE_string("storage", None, "Optuna RDB storage URL (e.g. sqlite:///sweep.db, "
                               "postgresql://user@host/db); default: <sweep folder>/journal.log.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Run no trial: rewrite the sweep's outputs from its study.")


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _missing_file_error(argument: str | None) -> str | None:
    path = (argument or "").partition(":")[0]
    if not path or os.path.isfile(path):
        return None
    names = sorted(n for n in os.listdir(SWEEPS_DIR) if n.endswith(".py") and not n.startswith("_"))
    return f"sweep config file {path} not found; sweep configs live in {launch._shown(SWEEPS_DIR)}{os.sep}: {', '.join(names)}"


def main() -> None:
    try:
        config_flag = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Sweep config file.", lock_config=True)
    except Exception as e:  # noqa: BLE001 - a bad override of the default config
        _error(launch.config_file_error(launch.config_argument(DEFAULT_CONFIG)) or launch._one_line(e))

    def parse_flags(argv):
        argument = launch.config_argument(DEFAULT_CONFIG)
        if missing := _missing_file_error(argument):
            _error(missing)
        try:
            return flags.FLAGS(argv)
        except Exception as e:  # noqa: BLE001 - anything raised while loading the user's config
            _error(launch.config_file_error(argument) or launch._one_line(e))

    def run(argv):
        logging.get_absl_handler().addFilter(lambda r: "/orbax/" not in r.pathname)
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        if flags.FLAGS.overwrite:
            _error("--overwrite does not apply to a sweep: trial folders are never overwritten; choose a new "
                   "--workdir to start afresh")
        if flags.FLAGS.coordinator_address or flags.FLAGS.num_processes:
            _error("a sweep worker is one process: start the command once per process (they share the study) "
                   "instead of --coordinator_address/--num_processes")
        from kdjax import sweep, train

        try:
            config = config_flag.value
        except Exception as e:  # noqa: BLE001 - the config file failed to load
            _error(launch.config_file_error(launch.config_argument(DEFAULT_CONFIG)) or launch._one_line(e))
        try:
            best = sweep.run(config, launch._WORKDIR.value, storage=_STORAGE.value, report_only=_REPORT_ONLY.value)
        except ValueError as e:  # user mistakes: one clear line, exit 2
            logging.debug("error details", exc_info=True)
            _error(str(e))
        except train.Preempted as e:  # the trial saved a checkpoint; a rerun resumes it
            print(f"preempted: {e}", file=sys.stderr)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:  # outside a training loop (e.g. waiting for a shared teacher)
            print("interrupted: rerun the same command to continue the sweep (the trial is retried)", file=sys.stderr)
            sys.exit(130)
        print(sweep.format_report(best))

    app.run(run, flags_parser=parse_flags)


if __name__ == "__main__":
    launch.relaunch()
    main()
