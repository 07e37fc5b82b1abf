"""The whole Fashion-MNIST recipe in kdjax and in PyTorch, back to back: wall times and accuracies.

    python experiments/torch_reference/compare_fashion_mnist.py --torch-python /path/to/python-with-torch \
        [--data /usr/share/datasets/fashion-mnist] [--order kdjax,torch,kdjax] \
        [--teacher-epochs N] [--student-epochs N] [--cache-teacher-torch] [--out compare.json]

Run it with kdjax's Python from the repository root. It resolves experiments/configs/fashion_mnist.py
(the learning rate of each stage through kdjax.optim.resolve_learning_rate, the CE/KD weights
through kdjax.distill.build_terms, the temperature, batch, eval batch, seed, Adam's betas and eps,
weight decay) and passes those numbers to torch_reference/fashion_mnist.py, so both run the same
recipe even when kdjax's defaults change. Then it runs the recipes in `--order` (default kdjax,
torch, kdjax: the two kdjax runs bracket PyTorch's, so drifting load shows), each in a fresh
process and, for kdjax, a fresh workdir:

    kdjax: python -m experiments.cifar --config=experiments/configs/fashion_mnist.py \
               --config.dataset.manual_dir=DATA --workdir=<fresh> --config.compile_cache_dir=<cache>
    torch: <torch-python> experiments/torch_reference/fashion_mnist.py --data DATA <resolved values>

The kdjax runs share one compilation cache, new unless `--compile-cache` names one, so the first
compiles cold and later ones start warm (both are reported). Per run it prints the process's wall
time and each stage's seconds and test accuracies (last epoch, best epoch). A stage's seconds are
its training loop with the per-epoch test evaluation (the first step's compilation included) plus,
for kdjax's student, computing the cached teacher logits (train_seconds_this_session of
summary.json plus the cache time the run's log reports); PyTorch's are the same span. What the
stages leave out (imports, data loading, init, kdjax's inference-throughput figure) is in the wall
time.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
CONFIG = os.path.join("experiments", "configs", "fashion_mnist.py")
TORCH_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fashion_mnist.py")
STAGES = ("teacher", "student", "student_scratch")


def resolve(teacher_epochs: int | None, student_epochs: int | None) -> tuple[dict, list[str]]:
    """(the recipe's numbers, the kdjax --config overrides that go with them)."""
    from kdjax import distill, optim

    from experiments.configs import fashion_mnist

    c = fashion_mnist.get_config()
    overrides = []
    if teacher_epochs is not None:
        c.teacher.epochs = teacher_epochs
        overrides.append(f"--config.teacher.epochs={teacher_epochs}")
    if student_epochs is not None:
        c.student.epochs = student_epochs
        overrides.append(f"--config.student.epochs={student_epochs}")
    o, a = c.optimizer, c.augment
    unsupported = {
        "optimizer.name (adam)": o.name != "adam", "optimizer.schedule (cosine)": o.schedule != "cosine",
        "optimizer.warmup_epochs (0)": o.warmup_epochs != 0, "optimizer.decay_all (False)": o.decay_all,
        "optimizer.grad_clip_norm (None)": o.grad_clip_norm is not None,
        "augment (none)": bool(a.crop_padding or a.flip or a.mixup_alpha or a.cutmix_alpha),
        "loss (plain CE)": bool(c.loss.label_smoothing or c.loss.l1 or c.loss.l2),
        "distill.method (kd)": c.distill.method != "kd", "stages": c.stages != ",".join(STAGES),
        "dataset.val_size (0)": bool(c.dataset.val_size),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise SystemExit(f"error: the PyTorch reference implements the recipe as shipped; this config differs in: "
                         f"{', '.join(bad)}")
    terms = {t.name: t.weight for t in distill.build_terms(c.distill.to_dict())}
    kd_t = c.distill.kd.get("temperature")
    tuned = o.get("tuned_learning_rates")  # as kdjax.train resolves a stage's rate
    tuned = tuned.to_dict() if hasattr(tuned, "to_dict") else dict(tuned or {})
    lr = lambda role: optim.resolve_learning_rate(o.name, o.learning_rate, c[role].learning_rate_scale, tuned)  # noqa: E731
    recipe = {
        "teacher_model": c.teacher.model, "student_model": c.student.model,
        "teacher_epochs": c.teacher.epochs, "student_epochs": c.student.epochs,
        "batch": c.batch_size, "eval_batch": c.eval_batch_size, "seed": c.seed,
        "teacher_lr": lr("teacher"), "student_lr": lr("student"), "weight_decay": o.weight_decay,
        "b1": o.b1, "b2": o.b2, "eps": 1e-8 if o.eps is None else o.eps,
        "temperature": float(c.distill.temperature if kd_t is None else kd_t),
        "ce_weight": terms.get("ce", 0.0), "kd_weight": terms["kd"],
    }
    return recipe, overrides


def teacher_cache_seconds(log_path: str) -> dict:
    """Seconds each kdjax stage spent computing its teacher cache, from the run's log: the trainer
    computes the cache before its train_seconds_this_session clock starts (stage -> seconds)."""
    pattern = re.compile(r"\[(\w+)\] teacher outputs \(.*?\) of \d+ examples computed in ([\d.]+) s")
    with open(log_path) as f:
        return {m.group(1): float(m.group(2)) for m in map(pattern.search, f) if m}


def run_logged(cmd: list[str], log_path: str, cwd: str) -> float:
    """Runs `cmd` with its output in `log_path`; returns its wall seconds (exits on failure)."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        with open(log_path) as f:
            tail = f.read().splitlines()[-20:]
        raise SystemExit(f"error: {' '.join(cmd[:4])} ... exited with {proc.returncode}; last lines of {log_path}:\n"
                         + "\n".join(tail))
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--torch-python", required=True, help="a Python that can import torch")
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--order", default="kdjax,torch,kdjax")
    p.add_argument("--teacher-epochs", type=int, default=None, help="override the config's (e.g. 1 for a smoke test)")
    p.add_argument("--student-epochs", type=int, default=None)
    p.add_argument("--cache-teacher-torch", action="store_true",
                   help="PyTorch computes the teacher's logits once (kdjax does so by default)")
    p.add_argument("--workdir", default=None, help="folder for run dirs and logs (default: a new temporary one)")
    p.add_argument("--compile-cache", default=None, help="kdjax compilation cache (default: a new one in --workdir)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args()

    recipe, overrides = resolve(a.teacher_epochs, a.student_epochs)
    base = a.workdir or tempfile.mkdtemp(prefix="fm_compare_")
    os.makedirs(base, exist_ok=True)
    cache = a.compile_cache or os.path.join(base, "jax_cache")
    print("recipe (resolved from " + CONFIG + "): " + ", ".join(f"{k}={v}" for k, v in recipe.items()))
    print(f"logs and run folders in {base}", flush=True)
    torch_args = [f"--{k.replace('_', '-')}={v}" for k, v in recipe.items()]
    if a.cache_teacher_torch:
        torch_args.append("--cache-teacher")

    runs = []
    for i, which in enumerate(x.strip() for x in a.order.split(",") if x.strip()):
        label = f"{i + 1}:{which}"
        log = os.path.join(base, f"run{i + 1}_{which}.log")
        if which == "kdjax":
            workdir = os.path.join(base, f"run{i + 1}_kdjax")
            cold = not os.path.isdir(cache) or not os.listdir(cache)
            cmd = [sys.executable, "-m", "experiments.cifar", f"--config={CONFIG}",
                   f"--config.dataset.manual_dir={a.data}", f"--workdir={workdir}",
                   f"--config.compile_cache_dir={cache}", *overrides]
            print(f"[{label}] {' '.join(cmd)}", flush=True)
            wall = run_logged(cmd, log, ROOT)
            with open(os.path.join(workdir, "summary.json")) as f:
                summary = json.load(f)
            cache_s = teacher_cache_seconds(log)
            stages = {}
            for r in STAGES:
                if r in summary:
                    s = summary[r]
                    stages[r] = {"seconds": s["train_seconds_this_session"] + (cache_s.get(r) or 0.0),
                                 "train_seconds_this_session": s["train_seconds_this_session"],
                                 "teacher_cache_seconds": cache_s.get(r),
                                 "test_accuracy": s["test_accuracy"], "best_test_accuracy": s["best_test_accuracy"]}
            label += " (cold compile cache)" if cold else " (warm compile cache)"
        elif which == "torch":
            out = os.path.join(base, f"run{i + 1}_torch.json")
            cmd = [a.torch_python, TORCH_SCRIPT, f"--data={a.data}", *torch_args, f"--json={out}"]
            print(f"[{label}] {' '.join(cmd)}", flush=True)
            wall = run_logged(cmd, log, ROOT)
            with open(out) as f:
                res = json.load(f)
            stages = {r: {k: res["stages"][r][k] for k in ("seconds", "test_accuracy", "best_test_accuracy")}
                      for r in STAGES if r in res["stages"]}
            if a.cache_teacher_torch:
                label += " (teacher logits cached)"
        else:
            raise SystemExit(f"error: --order names kdjax or torch, not {which!r}")
        runs.append({"run": label, "wall_seconds": wall, "stages": stages, "log": log})
        print(f"[{label}] wall {wall:.1f} s; " + "; ".join(
            f"{r} {s['seconds']:.1f} s acc {s['test_accuracy']:.4f}" for r, s in stages.items()), flush=True)

    print()
    head = ["run", "wall s"] + [f"{r} {c}" for r in STAGES for c in ("s", "acc (last/best)")]
    rows = [head]
    for r in runs:
        row = [r["run"], f"{r['wall_seconds']:.1f}"]
        for s in STAGES:
            st = r["stages"].get(s)
            row += [f"{st['seconds']:.1f}", f"{st['test_accuracy']:.4f}/{st['best_test_accuracy']:.4f}"] if st else ["-", "-"]
        rows.append(row)
    widths = [max(len(x[i]) for x in rows) for i in range(len(head))]
    for j, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"recipe": recipe, "data": a.data, "load": os.getloadavg(), "runs": runs}, f, indent=2)
        print(f"\nwritten to {a.out}")


if __name__ == "__main__":
    main()
