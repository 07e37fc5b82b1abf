"""The sweep's outputs: trials.csv, best.json, the generated best_config.py, the PNGs of
optuna.visualization.matplotlib, and the lines printed at the end of a sweep command."""

from __future__ import annotations

import csv
import datetime
import io
import json
import math
import os
import warnings

from absl import logging

from kdjax import paths, runs
from kdjax.sweep import space, workers


def write_text(path: str, text: str) -> None:
    """Replaces the sweep folder's file `path` atomically (the temporary file is this process's own:
    every worker writes the outputs, under the sweep lock); in a bucket, one object write."""
    if paths.is_remote(path):
        paths.write_text(path, text)
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _best_config_text(p: space.Sweep, trial, workdir: str) -> str:
    params = dict(trial.params)
    _, _, teacher_dir = p.configs(params, workdir)
    overrides = dict(p.overrides)
    lines = ["OVERRIDES = {"]
    if p.overrides:
        lines.append("    # the sweep's fixed overrides")
        lines += [f"    {k!r}: {v!r}," for k, v in p.overrides.items()]
    lines.append(f"    # the best parameters (trial {trial.number})")
    lines += [f"    {k!r}: {v!r}," for k, v in params.items()]
    overrides.update(params)
    if teacher_dir:
        lines.append("    # the teacher this trial used, trained once by the sweep")
        lines.append(f"    'teacher.checkpoint': {teacher_dir!r},")
        overrides["teacher.checkpoint"] = teacher_dir
    lines.append("}")
    run_dir = os.path.join(workdir, trial.user_attrs.get("run_dir", f"trials/{workers.root_number(trial)}"))
    trial_config = paths.absolute(os.path.join(run_dir, "config.json"))
    doc = (f'"""Best trial of the sweep {p.study!r}: trial {trial.number}, {p.objective} validation accuracy {trial.value:.4f}\n'
           f"(the accuracy of its selected, best-validation epoch). Written by kdjax.sweep.\n\n"
           f"    python -m experiments.digits --config={os.path.join(workdir, 'best_config.py')}\n\n"
           f"reproduces the trial's {p.objective} stage exactly (any experiment entry point works: the config is\n"
           f"complete). The trial's run: {run_dir}\n"
           + ("" if p.trial_stages() == ",".join(p.stages) else
              f"It runs the base config's stages ({','.join(p.stages)}); the trial ran only {p.trial_stages()}\n"
              f"(later stages do not change earlier ones; --config.stages={p.trial_stages()} gives its exact config).\n")
           + "get_config() refuses to run if the result no longer matches the trial's config.json (e.g. the base\n"
           "config file was edited since); fields kdjax added or removed since are not compared.\n"
           + '"""\n\n')
    check = f"TRIAL_CONFIG = {trial_config!r}  # checked against, where it still exists\n\n\n"
    if p.base_ref is not None:
        body = (f"BASE = {p.base_ref!r}\n" + "\n".join(lines) + "\n" + check +
                "def get_config(arg=None):\n"
                "    from kdjax import sweep\n\n"
                "    return sweep.build_config(BASE, OVERRIDES, check_against=TRIAL_CONFIG)\n")
    else:
        full = space.config_json(space.apply(p.base, {k: v for k, v in overrides.items() if k not in p.overrides}))
        body = ("import json\n\n"
                f"CONFIG = json.loads({json.dumps(json.dumps(full, sort_keys=True))})  # the base config was a ConfigDict\n"
                + "\n".join(lines) + "  # (already in CONFIG)\n" + check +
                "def get_config(arg=None):\n"
                "    from kdjax import sweep\n\n"
                "    return sweep.build_config(CONFIG, {}, check_against=TRIAL_CONFIG)\n")
    return doc + body


def _rows(p: space.Sweep, study) -> list[dict]:
    retried = workers.retried_numbers(study.get_trials(deepcopy=False))
    rows = []
    for t in study.get_trials(deepcopy=False):
        duration = t.duration.total_seconds() if t.duration is not None else (
            (datetime.datetime.now() - t.datetime_start).total_seconds() if t.datetime_start else None)
        note = t.user_attrs.get("error") or t.user_attrs.get("note") or ""
        if "interrupted" in t.user_attrs:
            note = f"interrupted ({t.user_attrs['interrupted']})" + ("; retried" if t.number in retried else "")
        elif t.state.name == "PRUNED" and not note and t.intermediate_values:
            note = f"pruned after step {max(t.intermediate_values)}" if p.base.dataset.get("folds") else \
                f"pruned after epoch {max(t.intermediate_values)}"
        rows.append({"number": t.number, "state": t.state.name,
                     "value": "" if t.value is None or (isinstance(t.value, float) and math.isnan(t.value)) else t.value,
                     **{q.field: t.params.get(q.field, "") for q in p.params},
                     "run_dir": t.user_attrs.get("run_dir", ""), "teacher_dir": t.user_attrs.get("teacher_dir", ""),
                     "duration_s": round(duration, 1) if duration is not None else "",
                     "retry_of": t.system_attrs.get("failed_trial", ""), "note": note})
    return rows


def write_report(p: space.Sweep, study, workdir: str, plots: bool, report_only: bool = False) -> dict:
    """trials.csv, best.json, best_config.py and (with `plots`, once the sweep has finished or
    with `report_only`) the PNGs. Called under the sweep lock; every file is replaced atomically.
    Returns the content of best.json."""
    rows = _rows(p, study)
    buf = io.StringIO()
    header = ["number", "state", "value", *[q.field for q in p.params], "run_dir", "teacher_dir", "duration_s",
              "retry_of", "note"]
    writer = csv.DictWriter(buf, fieldnames=header)
    writer.writeheader()
    writer.writerows(rows)
    write_text(os.path.join(workdir, "trials.csv"), buf.getvalue())

    state = workers.progress(p, study)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    best = {"study": p.study, "workdir": workdir, "objective": f"{p.objective}: selected_val_accuracy (the validation "
            "accuracy of the epoch the stage selects; mean over folds with dataset.folds; maximised)", "n_trials": p.n_trials, "trials": state["states"],
            "finished": state["finished"], "best_trial": None}
    if complete:
        t = max(complete, key=lambda t: (t.value, -t.number))  # ties: the earliest trial
        run_dir = os.path.join(workdir, t.user_attrs.get("run_dir", f"trials/{workers.root_number(t)}"))
        summary = runs.read_json(os.path.join(run_dir, "summary.json"), {}).get(p.objective, {})
        best.update(best_trial=t.number, val_accuracy=t.value, params=t.params, run_dir=run_dir,
                    teacher_dir=os.path.join(workdir, t.user_attrs["teacher_dir"]) if "teacher_dir" in t.user_attrs else None,
                    selected_epoch=summary.get("selected_epoch"),
                    best_config=os.path.join(workdir, "best_config.py"),
                    command=f"python -m experiments.digits --config={os.path.join(workdir, 'best_config.py')}")
        if state["finished"]:
            best["test_accuracy_of_best_trial"] = summary.get("selected_test_accuracy")
            best["test_accuracy_note"] = ("TEST accuracy of the best trial's selected checkpoint, read once after the "
                                          "search ended; it played no part in choosing the trial")
        else:
            best["test_accuracy_of_best_trial"] = None
            best["test_accuracy_note"] = "reported once the sweep has finished"
        write_text(os.path.join(workdir, "best_config.py"), _best_config_text(p, t, workdir))
    if state["finished"] and len(complete) >= 2 and len(p.params) >= 2:
        import optuna

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                best["param_importances"] = {k: round(v, 4) for k, v in optuna.importance.get_param_importances(
                    study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)).items()}
        except Exception as e:  # noqa: BLE001 - e.g. every complete trial has the same value
            logging.info("parameter importances not computed: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
    write_text(os.path.join(workdir, "best.json"), json.dumps(best, indent=2, sort_keys=True, default=str) + "\n")
    if plots and (state["finished"] or report_only):
        best["plots"] = write_plots(p, study, workdir, len(complete))
    elif plots:
        logging.info("plots not drawn: trials of other workers are still running (the worker that ends the sweep "
                     "draws them; --report_only draws them any time)")
    return best


def write_plots(p: space.Sweep, study, workdir: str, n_complete: int) -> list[str]:
    """The PNGs of optuna.visualization.matplotlib; a plot that cannot be drawn is a logged line."""
    import matplotlib

    if "matplotlib.pyplot" not in __import__("sys").modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    wanted = [("history.png", ovm.plot_optimization_history, None)]
    if n_complete < 2 or len(p.params) < 2:
        logging.info("importances.png not drawn: it needs >= 2 complete trials and >= 2 searched fields "
                     "(%d complete, %d searched)", n_complete, len(p.params))
    else:
        # fANOVA with a fixed seed: the same study gives the same importances
        wanted.append(("importances.png", ovm.plot_param_importances,
                       {"evaluator": optuna.importance.FanovaImportanceEvaluator(seed=0)}))
    wanted.append(("slice.png", ovm.plot_slice, None))
    if len(p.params) >= 2:
        wanted.append(("parallel_coordinate.png", ovm.plot_parallel_coordinate, None))
    if p.pruner["name"] != "none":
        wanted.append(("intermediate.png", ovm.plot_intermediate_values, None))
    written = []
    for name, fn, kwargs in wanted:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                previous = optuna.logging.get_verbosity()
                optuna.logging.set_verbosity(optuna.logging.ERROR)
                try:
                    axes = fn(study, **(kwargs or {}))
                finally:
                    optuna.logging.set_verbosity(previous)
            ax = axes.flat[0] if hasattr(axes, "flat") else axes
            fig = ax.figure
            if name in ("history.png", "slice.png"):
                ax.set_ylabel(f"{p.objective} val accuracy (selected epoch)")
            if name == "slice.png":
                fig.set_size_inches(1.5 + 4.0 * len(p.params), 4.8)
            # not tight_layout: it clashes with colour bars
            paths.save_figure(fig, os.path.join(workdir, name), dpi=100, bbox_inches="tight")
            plt.close(fig)
            written.append(name)
        except Exception as e:  # noqa: BLE001 - a plot must never fail the sweep
            logging.info("%s not drawn: %s", name, str(e).splitlines()[0] if str(e) else type(e).__name__)
    return written


def format_report(best: dict) -> str:
    """The lines printed at the end of a sweep command."""
    lines = [f"sweep {best['study']}: {best['n_trials']} trials, states "
             + ", ".join(f"{k.lower()} {v}" for k, v in sorted(best["trials"].items()))
             + ("" if best["finished"] else " (not finished: rerun the command, or other workers are still running)")]
    if best.get("best_trial") is None:
        lines.append("no complete trial yet")
    else:
        lines.append(f"best trial {best['best_trial']}: {best['objective'].split(':')[0]} val accuracy "
                     f"{best['val_accuracy']:.4f} (epoch {best.get('selected_epoch')})  "
                     + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items()))
        if best.get("test_accuracy_of_best_trial") is not None:
            lines.append(f"its TEST accuracy (read once, not used for selection): {best['test_accuracy_of_best_trial']:.4f}")
        if best.get("param_importances"):
            lines.append("parameter importances (fANOVA): " + ", ".join(
                f"{k} {v:.2f}" for k, v in sorted(best["param_importances"].items(), key=lambda kv: -kv[1])))
        lines.append(f"reproduce: {best['command']}")
    lines.append(f"outputs: {best['workdir']}/{{trials.csv,best.json,best_config.py}}"
                 + (f" and {', '.join(best['plots'])}" if best.get("plots") else ""))
    return "\n".join(lines)
