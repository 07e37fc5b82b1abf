"""Every distillation method on sklearn's 8x8 digits, over several seeds: one comparison table.

    python -m experiments.digits_methods [--seeds=0,1,2] [--methods=all] [--workdir=runs/digits_methods]

Per seed: trains the teacher once, the two from-scratch baselines (the MLP student and the
`cnn_tiny` student of the feature-map methods), then each method's student from that teacher,
all with `experiments/configs/digits.py` (`method=<m>,seed=<s>`). Prints a markdown table of the
last-epoch student test accuracy (mean ± sample std over seeds, and min) and writes it to
`<workdir>/results.json`. Run directories are `<workdir>/seed<s>/<name>`; rerunning skips
finished runs, and a run whose config changed (e.g. a retuned weight) is moved aside and redone.
"""

import json
import os

import numpy as np
from absl import app, flags, logging

from experiments.configs import digits
from kdjax import distill, train

_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Random seeds.")
_METHODS = flags.DEFINE_list("methods", ["all"], "Methods (kdjax.distill.METHODS names), or 'all'.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/digits_methods", "Root of the run directories.")


def _run(name, seed, stages, method="kd", student=None, teacher=None):
    """Test accuracy (last epoch) of the run's last stage, or None if the run failed."""
    config = digits.get_config(f"method={method},seed={seed}")
    config.stages = stages
    if student:
        config.student.model = student
    if teacher:
        config.teacher.checkpoint = teacher
    workdir = os.path.join(_WORKDIR.value, f"seed{seed}", name)
    try:
        summary = train.run(config, workdir, overwrite=True)
    except (ValueError, train.NonFiniteError) as e:
        logging.error("%s (seed %d) failed: %s", name, seed, e)
        return config.student.model, None
    role = stages.split(",")[-1]
    return summary[role]["model"], summary[role]["test_accuracy"]


def _row(label, model, accs, baseline=None):
    if any(a is None for a in accs):
        return {"method": label, "model": model, "accuracies": accs, "failed": True}
    a = np.asarray(accs)
    row = {"method": label, "model": model, "accuracies": accs, "mean": float(a.mean()),
           "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "min": float(a.min())}
    if baseline is not None and "mean" in baseline:
        row["vs_scratch"] = row["mean"] - baseline["mean"]
    return row


def _markdown(rows, seeds):
    lines = [f"| method | student | test acc (mean ± std, {len(seeds)} seeds) | min | vs scratch |",
             "|---|---|---|---|---|"]
    for r in rows:
        if r.get("failed"):
            lines.append(f"| {r['method']} | {r['model']} | failed: {r['accuracies']} | - | - |")
            continue
        delta = f"{r['vs_scratch']:+.4f}" if "vs_scratch" in r else "-"
        lines.append(f"| {r['method']} | {r['model']} | {r['mean']:.4f} ± {r['std']:.4f} | {r['min']:.4f} | {delta} |")
    return "\n".join(lines)


def main(argv):
    del argv
    logging.get_absl_handler().addFilter(lambda r: "/orbax/" not in r.pathname)
    seeds = [int(s) for s in _SEEDS.value]
    methods = [m for m in distill.METHODS if m != "ce"] if _METHODS.value == ["all"] else _METHODS.value
    acc = {}  # (name, seed) -> test accuracy
    models = {}  # name -> model
    for s in seeds:
        teacher_dir = os.path.abspath(os.path.join(_WORKDIR.value, f"seed{s}", "teacher"))
        models["teacher"], acc["teacher", s] = _run("teacher", s, "teacher")
        for student in ("mlp", "cnn_tiny"):
            models[f"scratch_{student}"], acc[f"scratch_{student}", s] = _run(
                f"scratch_{student}", s, "student_scratch", student=student)
        for m in methods:
            models[m], acc[m, s] = _run(m, s, "student", method=m, teacher=teacher_dir)

    rows = {name: _row(name, models[name], [acc[name, s] for s in seeds])
            for name in ("teacher", "scratch_mlp", "scratch_cnn_tiny")}
    rows["teacher"]["method"] = "(teacher)"
    for student in ("mlp", "cnn_tiny"):
        rows[f"scratch_{student}"]["method"] = "(from scratch)"
    for m in methods:
        rows[m] = _row(m, models[m], [acc[m, s] for s in seeds], baseline=rows[f"scratch_{models[m]}"])
    table = _markdown(list(rows.values()), seeds)
    print(table)
    path = os.path.join(_WORKDIR.value, "results.json")
    with open(path, "w") as f:
        json.dump({"seeds": seeds, "rows": list(rows.values()), "markdown": table}, f, indent=1)
    print(f"results: {path}")


if __name__ == "__main__":
    app.run(main)
