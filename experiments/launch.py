"""Shared command-line plumbing of the experiment entry points (cifar.py, digits.py).

Flags: --config (a config file, with an optional ':arg' string and --config.x.y=value overrides),
--workdir (default: runs/<config name>-<method>-s<seed>-<hash of what determines the run>, so the
same command resumes and a changed config never lands in an old run's directory), and the
multi-host flags.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, summary.json).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "If --workdir holds a run of another config, move it aside "
                               "(to <workdir>.replaced-<time>) and start afresh, instead of refusing.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "jax.distributed coordinator host:port.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")


def default_workdir(config, config_path: str) -> str:
    """runs/<config name>-<method>-s<seed>-<hash>: readable, and the same command resumes.

    The hash covers the run's identity (`kdjax.runs.run_identity`: no runtime fields, no unused
    methods) where it differs from kdjax's defaults (`common.base`), so a new kdjax field or method
    with its default value moves no existing run, while any change that alters results does."""
    from experiments.configs import common
    from kdjax import runs

    name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
    if "compress" in config:  # the compression plan's runs live inside: not part of the identity
        from kdjax import compress

        config = compress.experiment_config(config)
    method = str(config.distill.method)
    ident, base = runs.run_identity(config), runs.run_identity(common.base(method))
    diff = {k: v for k, v in ident.items() if k not in base or base[k] != v}
    digest = hashlib.sha256(json.dumps(diff, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return os.path.join("runs", f"{name}-{method}-s{config.seed}-{digest}")


def _init_distributed() -> None:
    import jax

    if _COORDINATOR.value or _NUM_PROCESSES.value:
        # Cross-process collectives on CPU (the default in recent JAX). Set unconditionally: asking
        # for the backend here (jax.default_backend()) would initialise it, and initialize() must
        # come before that. The setting only concerns the CPU client; GPUs/TPUs are unaffected.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
    elif any(k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")):
        jax.distributed.initialize()  # TPU pods: everything comes from the environment


def _one_line(error: BaseException) -> str:
    """The informative last line of an error whose text may hold a whole traceback."""
    if isinstance(error, (AttributeError, KeyError)):
        return f"--config override names a field that does not exist: {str(error).strip(chr(34) + chr(39))}"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__




CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def config_argument(default_config: str | None) -> str | None:
    """The --config value of this command line ('path[:arg]'), else the entry point's default."""
    argv = list(sys.argv[1:])
    value = default_config
    for i, arg in enumerate(argv):
        if arg in ("--config", "-config") and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(("--config=", "-config=")):
            value = arg.split("=", 1)[1]
    return value


def _shown(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def config_file_error(argument: str | None) -> str | None:
    """One line if the config file of `argument` ('path[:arg]') is missing or fails to load
    (raises on import, lacks get_config, or get_config raises); None if it loads."""
    if not argument:
        return None
    path = argument.partition(":")[0]
    if not os.path.isfile(path):
        names = sorted(n for n in os.listdir(CONFIGS_DIR)
                       if n.endswith(".py") and not n.startswith(("_", "common")))
        return (f"config file {path} not found; configs live in {_shown(CONFIGS_DIR)}{os.sep}: "
                f"{', '.join(names)}")
    from kdjax import config as kconfig

    try:
        kconfig.load_config_file(argument)
    except ValueError as e:
        return str(e)
    return None


def _fail(error: BaseException, default_config: str | None = None) -> None:
    """Exit 2 with one line: the config file's own failure if it has one, else `error`'s."""
    print(f"error: {config_file_error(config_argument(default_config)) or _one_line(error)}", file=sys.stderr)
    sys.exit(2)


def _report(workdir: str) -> None:
    """The evaluation report (kdjax.evaluate) of a finished run; a failure there is a warning, not
    a failed run. Multi-process runs skip it: its checkpoint reads are collectives in Orbax, and
    the report is one process's job (run experiments.evaluate afterwards)."""
    import jax

    if jax.process_count() > 1:
        logging.info("multi-process run: no evaluation report; run python -m experiments.evaluate --workdir=%s", workdir)
        return
    try:
        from kdjax import evaluate

        if evaluate.report(workdir) is not None:
            print(f"report: {os.path.join(workdir, 'report.md')}")
    except Exception as e:  # noqa: BLE001 - the run itself succeeded
        logging.warning("the evaluation report failed (%s: %s); rerun python -m experiments.evaluate "
                        "--workdir=%s", type(e).__name__, e, workdir)


def relaunch() -> None:
    """First thing in a command: re-executes it with tcmalloc preloaded when installed
    (`kdjax.runtime.relaunch_with_allocator`, ``KDJAX_MALLOC``); a bad ``KDJAX_MALLOC`` -> one
    line, exit 2."""
    from kdjax import runtime

    try:
        runtime.relaunch_with_allocator()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run_main(default_config: str | None = None, runner=None, show=None, workdir_of=None, report: bool = True) -> None:
    """absl main of an entry point: defines --config (a config file, `default_config` if given),
    runs `runner(config, workdir, overwrite=...)` (default kdjax.train.run) and prints `show(result,
    workdir)` (default: the comparison table). The default workdir is `workdir_of(config, config
    path)` (default: `default_workdir`); `report`: the end-of-run evaluation report where the config
    asks for it. User errors -> one line, exit 2."""
    relaunch()
    try:  # config_flags applies --config.* overrides while defining the flag
        config_flag = config_flags.DEFINE_config_file(
            "config", default_config, "Experiment config file, with an optional ':arg' string.", lock_config=True)
    except Exception as e:  # noqa: BLE001 - a bad override of the default config
        _fail(e, default_config)
    if default_config is None:
        flags.mark_flag_as_required("config")

    def parse_flags(argv):
        """absl flag parsing, but a bad --config (missing file, file that fails to load, bad
        ':arg', unknown field, bad value) gives one line and exit status 2, not a traceback."""
        path = config_argument(default_config)
        if path and not os.path.isfile(path.partition(":")[0]):
            print(f"error: {config_file_error(path)}", file=sys.stderr)
            sys.exit(2)
        try:
            return flags.FLAGS(argv)
        except Exception as e:  # noqa: BLE001 - anything raised while loading the user's config
            _fail(e, default_config)

    def main(argv):
        # Orbax logs every save at INFO; keep the run's own log readable.
        logging.get_absl_handler().addFilter(lambda r: "/orbax/" not in r.pathname)
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        from kdjax import train

        try:  # the config file is loaded lazily: its errors surface on first use
            config = config_flag.value
            workdir = _WORKDIR.value or (workdir_of or default_workdir)(config, flags.FLAGS["config"].config_filename)
        except Exception as e:  # noqa: BLE001 - the config file failed to load
            _fail(e, default_config)
        try:
            from kdjax import paths

            _init_distributed()
            logging.info("workdir: %s", paths.absolute(workdir))
            summary = (runner or train.run)(config, workdir, overwrite=_OVERWRITE.value)
        except ValueError as e:  # user mistakes: one clear line, non-zero exit
            logging.debug("error details", exc_info=True)
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except train.NonFiniteError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        except train.Preempted as e:  # SIGTERM/SIGINT: checkpoint saved; 128 + signal, as a killed job
            print(f"preempted: {e}", file=sys.stderr)
            sys.exit(e.exit_code)
        if show is not None:
            print(show(summary, workdir))
        else:
            print(train.format_table(summary))
            print(f"summary: {os.path.join(workdir, 'cv.json' if config.dataset.get('folds') else 'summary.json')}")
        if report and config.get("log", {}).get("report", True) and not config.dataset.get("folds"):
            _report(workdir)

    app.run(main, flags_parser=parse_flags)
