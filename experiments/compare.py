"""Several distillation methods over several seeds, for any teacher/student config: one folder of
runs that `python -m experiments.table` turns into a table.

    python -m experiments.compare --config=experiments/configs/digits.py --methods=kd,dkd,at --seeds=0,1,2
    python -m experiments.compare --config=experiments/configs/cifar10_resnet18_mobilenetv2.py:smoke --methods=kd,crd --seeds=0
    python -m experiments.compare --config=experiments/configs/digits.py --methods=all --config.student.epochs=30

Runs go to `<root>/<name>/` (default root `runs`; name: the config file's name, plus its ':arg'
string if any, e.g. `runs/cifar10_resnet18_mobilenetv2-smoke`). For each seed k:

- `teacher/seed<k>/`: the teacher, trained once (stages='teacher'), from the config with its
  default method;
- `<method>/seed<k>/`: each method's student (stages='student', plus 'student_init' if the config
  has it), taught by that teacher (teacher.checkpoint). The method goes through the config's own
  ':method=<m>' argument when the config takes one, so each method gets the student its config
  intends (digits: cnn_tiny for feature-map methods, the MLP otherwise); a config without a
  'method' argument gets `config.distill.method=<m>`;
- `scratch/seed<k>/`: the from-scratch baseline (stages='student_scratch'), once per seed and
  per distinct student: `scratch/` for the student of the config's default method, and
  `scratch-<model>/` for any other (e.g. `scratch-cnn_tiny/`). kdjax starts it from the same
  initialisation as the student of the same seed and feeds it the same data order, so student
  minus scratch of the same seed is a paired difference. Its config is the method's config with
  the default method's `distill` and `student_init` blocks and `augment.views` (the baseline
  never reads them), so
  methods sharing a student share one baseline, whichever methods a command lists.

`--config.x=y` overrides reach every run (not `seed`, `stages`, `distill.method`,
`teacher.checkpoint`: compare sets those). Finished runs are skipped without loading anything, an
interrupted one resumes from its checkpoint; a folder that holds a run of another config (e.g. other
overrides) stops the command before anything trains. Before training, every planned run's stages
are traced on the data (kdjax's pre-flight), so e.g. a feature-map method on an MLP student fails
at once. Bad input (unknown method or config, no seeds, ...): one line, exit status 2. A run that
stops on a NaN/Inf is reported and the others go on; the exit status is then 1.

At the end the table of the whole folder (kdjax.table) is printed and written to
`<root>/<name>/table.{md,csv}`; the commands that filled the folder are kept in `compare.json`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import shlex
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import launch

_METHODS = flags.DEFINE_list("methods", None, "Methods (kdjax.distill.METHODS names, 'a+b' combinations), or 'all'.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Random seeds.")
_ROOT = flags.DEFINE_string("root", "runs", "Parent of the comparison folder <root>/<config name>.")

CONTROLLED = ("seed", "stages", "distill.method", "teacher.checkpoint")  # set per run by compare


@dataclasses.dataclass
class Planned:
    label: str  # folder under the comparison folder: 'teacher', 'scratch', 'scratch-<model>', method
    seed: int
    workdir: str
    config: object  # ml_collections.ConfigDict


def comparison_name(config_argument: str) -> str:
    """'experiments/configs/digits.py' -> 'digits'; '...cifar10_resnet18_mobilenetv2.py:smoke' ->
    'cifar10_resnet18_mobilenetv2-smoke'."""
    path, _, arg = config_argument.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    arg = re.sub(r"[^A-Za-z0-9_.+]+", "-", arg).strip("-")
    return f"{name}-{arg}" if arg else name


def _arg_items(arg: str) -> list[str]:
    return [item.strip() for item in arg.split(",") if item.strip()]


def _load_module(path: str):
    spec = importlib.util.spec_from_file_location("_kdjax_compare_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _get_config(module, items: list[str]):
    arg = ",".join(items)
    return module.get_config(arg) if arg else module.get_config()


def _config_for(module, items, overrides, method, seed):
    """The config of one run before its stages are set: the config file with `items` (+ method and
    seed through its ':arg' when it takes them), `config.seed`, the method, then the overrides."""
    extra = ([f"method={method}"] if method is not None else []) + [f"seed={seed}"]
    while True:
        try:
            c = _get_config(module, items + extra)
            break
        except ValueError as e:  # a config without a 'method' or 'seed' argument
            missing = [x for x in extra if f"unknown config argument {x.split('=')[0]!r}" in str(e)]
            if not missing:
                raise
            extra = [x for x in extra if x not in missing]
    c.seed = seed
    if method is not None and not any(x.startswith("method=") for x in extra):
        c.distill.method = method
    if "compress" in c:  # a compression plan: only its experiment is compared
        from kdjax import compress

        c = compress.experiment_config(c)
    c.update_from_flattened_dict(overrides)
    return c


def _student_stages(config) -> str:
    stages = [s.strip() for s in str(config.stages).split(",") if s.strip() not in ("", "teacher", "student_scratch")]
    return ",".join(stages if "student" in stages else stages + ["student"])


def plan(config_argument: str, methods: list[str], seeds: list[int], root: str, overrides: dict) -> tuple[str, list[Planned]]:
    """(the comparison folder, every run in the order they train). ValueError: one line."""
    from kdjax import runs as kruns

    path, _, arg = config_argument.partition(":")
    items = _arg_items(arg)
    for item in items:
        key = item.partition("=")[0].strip()
        if key in ("method", "seed"):
            raise ValueError(f"the config argument sets {key!r}, which compare sets per run: use --{key}s instead")
    module = _load_module(path)
    folder = os.path.join(root, comparison_name(config_argument))
    runs: list[Planned] = []
    for seed in seeds:
        default = _config_for(module, items, overrides, None, seed)
        if default.teacher.source != "trained" or default.teacher.ensemble:
            raise ValueError("compare trains one teacher per seed: the config's teacher.source must be 'trained', "
                             "without teacher.ensemble")
        if default.teacher.get("weights") and default.teacher.epochs == 0:
            raise ValueError("compare trains one teacher per seed, and teacher.weights with teacher.epochs=0 is an "
                             "imported teacher used as it is, with no stage to train: give teacher.epochs > 0 (the "
                             "teacher run fine-tunes the weights once per seed) or run the methods one by one")
        teacher = copy.deepcopy(default)
        teacher.stages = "teacher"
        teacher_dir = os.path.join(folder, "teacher", f"seed{seed}")
        runs.append(Planned("teacher", seed, teacher_dir, teacher))
        base_scratch = copy.deepcopy(default)
        base_scratch.stages = "student_scratch"
        scratch_seen: set[str] = set()  # identities of this seed's baselines
        students = []
        for m in methods:
            c = _config_for(module, items, overrides, m, seed)
            t_m, t_d = dict(c.teacher.to_dict(), checkpoint=None), dict(default.teacher.to_dict(), checkpoint=None)
            if t_m != t_d:
                diff = ", ".join(sorted(k for k in set(t_m) | set(t_d) if t_m.get(k) != t_d.get(k)))
                raise ValueError(f"method {m!r} changes the config's teacher (teacher.{diff}); compare trains one "
                                 "teacher per seed for every method")
            scratch = copy.deepcopy(c)
            scratch.distill = copy.deepcopy(default.distill)
            scratch.augment.views = default.augment.views  # (the labels-only baseline reads no strong view)
            scratch.student_init = copy.deepcopy(default.student_init)
            scratch.stages = "student_scratch"
            ident = json.dumps(kruns.run_identity(scratch), sort_keys=True, default=str)
            if ident not in scratch_seen:
                scratch_seen.add(ident)
                label = _baseline_label(scratch, base_scratch)
                runs.append(Planned(label, seed, os.path.join(folder, label, f"seed{seed}"), scratch))
            c.stages = _student_stages(c)
            c.teacher.checkpoint = teacher_dir
            c.teacher.weights = None  # a teacher fine-tuned from weights: the teacher run has started from them
            students.append(Planned(m, seed, os.path.join(folder, m, f"seed{seed}"), c))
        runs.extend(students)
    return folder, runs


def _baseline_label(scratch, base_scratch) -> str:
    """The folder of a from-scratch baseline, a function of its config alone (not of the seed or of
    the other methods of a command): 'scratch' for the config's own student, 'scratch-<model>' for
    another model with the config's settings, 'scratch-<model>-<hash of its config>' otherwise
    (e.g. digits' fsp/kdsvd student: cnn_tiny at the teacher's widths)."""
    from kdjax import runs as kruns

    ident = kruns.run_identity(scratch)
    if ident == kruns.run_identity(base_scratch):
        return "scratch"
    label = f"scratch-{scratch.student.model}"
    plain = copy.deepcopy(base_scratch)
    plain.student.model = scratch.student.model
    if ident == kruns.run_identity(plain):
        return label
    unseeded = copy.deepcopy(scratch)
    unseeded.seed = 0
    key = json.dumps(kruns.run_identity(unseeded), sort_keys=True, default=str)
    return label + "-" + hashlib.sha256(key.encode()).hexdigest()[:8]


def _finished(run: Planned) -> bool | None:
    """True: finished with this config; False: not (yet) run or unfinished; ValueError: the folder
    holds a run of another config."""
    from kdjax import runs as kruns

    from kdjax import paths

    path = os.path.join(run.workdir, "config.json")
    if not paths.exists(path):
        return False
    saved = json.loads(paths.read_text(path))
    old, new = kruns.run_identity(saved), kruns.run_identity(run.config)
    changed = sorted(k for k in set(old) & set(new) if old[k] != new[k])
    # A model's constructor arguments exist on one side only when they differ (an empty kwargs
    # dict flattens to nothing), unlike a config field added to kdjax since the run.
    changed += sorted(k for k in set(old) ^ set(new) if k.startswith(("student.kwargs.", "teacher.kwargs.")))
    if changed:
        raise ValueError(f"{run.workdir} holds a run of another config (differs in: {', '.join(changed[:8])}); "
                         "choose another --root, or move that folder away")
    stages = [s.strip() for s in str(run.config.stages).split(",") if s.strip()]
    return all(paths.exists(os.path.join(run.workdir, s, "result.json")) for s in stages)


def preflight(runs: list[Planned]) -> None:
    """kdjax's pre-flight of every distinct run (one seed's data): every stage's models and
    distillation terms are traced without compute, so a method that cannot run fails now."""
    from kdjax import config as kconfig
    from kdjax import step as kstep
    from kdjax import train

    if not runs:
        return
    first = runs[0]
    dataset = train.load_dataset(first.config.dataset, first.seed)
    par = kstep.DataParallel(first.config.parallel, num_devices=first.config.num_devices)
    teacher_model = train.Stage("teacher", first.config, dataset, par, first.workdir).model
    seen = set()
    for run in runs:
        if run.label in seen:
            continue
        seen.add(run.label)
        kconfig.validate(run.config)
        for role in kconfig.planned_stages(run.config):  # the same stage list the run will use
            planned = [teacher_model] if role != "teacher" else []
            train.Stage(role, run.config, dataset, par, run.workdir).preflight(planned)


def _record_command(folder: str) -> None:
    from kdjax import paths

    path = os.path.join(folder, "compare.json")
    try:
        record = json.loads(paths.read_text(path))
    except (OSError, ValueError):
        record = {"commands": []}
    command = "python -m experiments.compare " + shlex.join(sys.argv[1:])
    if command not in record["commands"]:
        record["commands"].append(command)
    paths.write_text(path, json.dumps(record, indent=1))


def _parse_methods(values) -> list[str]:
    from kdjax import distill

    if not values:
        raise ValueError("no methods: pass e.g. --methods=kd,dkd,at (or --methods=all)")
    if [v.strip() for v in values] == ["all"]:
        return [m for m in distill.METHODS if m != "ce"]
    out = []
    for v in values:
        name = "+".join(distill.method_names(v))  # one line for an unknown name
        if name not in out:
            out.append(name)
    return out


def _parse_seeds(values) -> list[int]:
    seeds = []
    for v in values or []:
        try:
            s = int(v)
        except ValueError:
            raise ValueError(f"--seeds takes integers, e.g. --seeds=0,1,2; got {v!r}") from None
        if s < 0:
            raise ValueError(f"--seeds must be >= 0, got {s}")
        if s not in seeds:
            seeds.append(s)
    if not seeds:
        raise ValueError("no seeds: pass e.g. --seeds=0,1,2")
    return seeds


def _error(message: str, status: int = 2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


_CONFIG = config_flags.DEFINE_config_file("config", None, "Teacher/student config file, with an optional ':arg'.")


def parse_flags(argv):
    """absl parsing; a missing or broken --config, a bad override or unknown flag: one line, exit 2."""
    argument = launch.config_argument(None)
    if not argument:
        _error("--config is required, e.g. --config=experiments/configs/digits.py")
    if problem := launch.config_file_error(argument):
        _error(problem)
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - flag errors and whatever the config file raises
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        if isinstance(e, (AttributeError, KeyError)):
            _error(f"--config override names a field that does not exist: {str(e).strip(chr(34) + chr(39))}")
        _error(lines[-1] if lines else type(e).__name__)


def main(argv):
    logging.get_absl_handler().addFilter(lambda r: "/orbax/" not in r.pathname)
    if len(argv) > 1:
        _error(f"unexpected arguments: {' '.join(argv[1:])}")
    t0 = time.time()
    try:
        overrides = dict(config_flags.get_override_values(flags.FLAGS["config"]))
        bad = sorted(k for k in overrides if any(k == c or k.startswith(c + ".") for c in CONTROLLED))
        if bad:
            raise ValueError(f"--config.{bad[0]} is set per run by compare (seeds: --seeds, methods: --methods)")
        from kdjax import paths

        paths.check_workdir(_ROOT.value)
        methods = _parse_methods(_METHODS.value)
        seeds = _parse_seeds(_SEEDS.value)
        folder, runs = plan(flags.FLAGS["config"].config_filename, methods, seeds, _ROOT.value, overrides)
        done = [_finished(r) for r in runs]
        preflight([r for r, d in zip(runs, done) if not d])
    except ValueError as e:
        _error(str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
    except Exception as e:  # noqa: BLE001 - a config file that fails for one method's argument
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        _error(f"{type(e).__name__}" + (f": {lines[-1]}" if lines else ""))

    from kdjax import train

    _record_command(folder)
    failed, trained = [], 0
    for i, (run, finished) in enumerate(zip(runs, done), 1):
        where = f"[{i}/{len(runs)}] {run.label} seed{run.seed}"
        if finished:
            print(f"{where}: already finished ({run.workdir}); skipped", flush=True)
            continue
        print(f"{where}: training -> {run.workdir}", flush=True)
        try:
            train.run(run.config, run.workdir)
            trained += 1
        except ValueError as e:
            _error(f"{run.workdir}: {e}")
        except train.NonFiniteError as e:
            print(f"{where}: failed: {e}", file=sys.stderr, flush=True)
            failed.append(run.workdir)
        except train.Preempted as e:
            print(f"preempted: {e}", file=sys.stderr)
            sys.exit(e.exit_code)

    from kdjax import table

    try:
        md, md_path, csv_path = table.write(folder, command=f"python -m experiments.table {shlex.quote(folder)}")
        print(md)
        print(f"table: {md_path} {csv_path}")
    except ValueError as e:
        print(f"no table: {e}", file=sys.stderr)
    print(f"compare: {len(runs)} runs ({trained} trained, {sum(done)} already finished, "
          f"{len(failed)} failed) in {time.time() - t0:.1f} s", flush=True)
    if failed:
        print(f"error: {len(failed)} run(s) stopped on a non-finite loss: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    launch.relaunch()
    app.run(main, flags_parser=parse_flags)
