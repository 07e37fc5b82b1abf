"""Comparison tables read from run folders (never trains): the library part of `experiments.table`.

Layout read (what `python -m experiments.compare` writes)::

    <root>/<label>/seed<k>/{config.json, summary.json, <stage>/result.json}

`<label>` is ``teacher``, ``scratch`` (or ``scratch-<model>``, one per student architecture) or a
method name (``kd``, ``dkd``, ``kd+at``, ...). What a run contributes is decided by its own
config.json, not by its folder name: the result of stage ``student`` if the run has one, else of
``student_scratch``, else of ``teacher``. A run counts once that stage's ``result.json`` exists
(unfinished runs are listed under the table, not averaged).

Per row (one label): mean and sample standard deviation (ddof=1; "n=1" for one seed) over seeds of
the last-epoch and the best-epoch test accuracy (``test_accuracy``, ``best_test_accuracy`` of
result.json); for distilled students, the *paired* difference to the from-scratch baseline: per
seed, student minus the scratch run of the same seed with the same ``config.student`` block (same
model, kwargs, epochs and learning rate; kdjax starts that baseline from the student's own
initialisation and feeds it the same data order), then mean and std of those differences; the
parameter count; and the training seconds summed over seeds (``train_seconds_this_session`` plus
``teacher_cache_seconds_this_session``: a resumed stage counts only its last session).

Rows: the teacher first, then one group per student architecture (its scratch row, then its
methods by mean last-epoch accuracy, best first; ties by name). Only json, csv and numpy are used:
reading a table needs no JAX.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re

import numpy as np

from kdjax import paths

SEED_DIR = re.compile(r"^seed(\d+)$")


@dataclasses.dataclass
class Run:
    """One finished run folder: what it trained (`kind`), for which seed, and its result."""

    label: str  # the folder under the root: 'teacher', 'scratch', 'scratch-cnn_tiny', 'kd', ...
    seed: int
    path: str
    kind: str  # 'teacher', 'scratch' or 'student'
    result: dict  # summary.json's entry of the tabulated stage (= <stage>/result.json)
    config: dict  # config.json

    @property
    def student_key(self) -> str:
        """What a student and its scratch baseline must share to be paired (besides the seed)."""
        return json.dumps(self.config.get("student", {}), sort_keys=True)

    @property
    def train_seconds(self) -> float:
        r = self.result
        return float(r.get("train_seconds_this_session") or 0.0) + float(r.get("teacher_cache_seconds_this_session") or 0.0)


_STAGE_OF_KIND = {"student": "student", "scratch": "student_scratch", "teacher": "teacher"}


def _read_json(path: str):
    try:
        return json.loads(paths.read_text(path))
    except (OSError, ValueError):
        return None


def _kind(config: dict) -> str | None:
    stages = [s.strip() for s in str(config.get("stages", "")).split(",")]
    for kind, stage in _STAGE_OF_KIND.items():  # student before scratch before teacher
        if stage in stages:
            return kind
    return None


def read_runs(root: str) -> tuple[list[Run], list[str]]:
    """(finished runs, the folders under `root` that hold an unfinished run). Raises ValueError
    (one line) if `root` is not a folder."""
    if not paths.isdir(root):
        raise ValueError(f"{root} is not a folder; give the comparison folder that python -m experiments.compare "
                         "wrote, e.g. runs/digits")
    runs, unfinished = [], []
    for label in paths.listdir(root):
        label_dir = os.path.join(root, label)
        if not paths.isdir(label_dir):
            continue
        for name in sorted(paths.listdir(label_dir), key=lambda n: (len(n), n)):
            path = os.path.join(label_dir, name)
            if not (SEED_DIR.match(name) and paths.isdir(path)):
                continue
            config = _read_json(os.path.join(path, "config.json"))
            kind = _kind(config) if isinstance(config, dict) else None
            if kind is None:
                unfinished.append(os.path.join(label, name))
                continue
            stage = _STAGE_OF_KIND[kind]
            result = _read_json(os.path.join(path, stage, "result.json"))
            if not isinstance(result, dict) or "test_accuracy" not in result:
                unfinished.append(os.path.join(label, name))
                continue
            seed = int(config.get("seed", SEED_DIR.match(name).group(1)))
            runs.append(Run(label=label, seed=seed, path=path, kind=kind, result=result, config=config))
    return runs, unfinished


def mean_std(values) -> tuple[float | None, float | None]:
    """(mean, sample std with ddof=1); std None for one value, both None for none."""
    a = np.asarray(list(values), dtype=np.float64)
    if a.size == 0:
        return None, None
    return float(a.mean()), (float(a.std(ddof=1)) if a.size > 1 else None)


def rows(runs: list[Run]) -> list[dict]:
    """One dict per label (see the module docstring for the order and the figures)."""
    by_label: dict[str, list[Run]] = {}
    for r in runs:
        by_label.setdefault(r.label, []).append(r)
    scratch = {(r.seed, r.student_key): r for r in runs if r.kind == "scratch"}
    out = []
    for label, group in by_label.items():
        group = sorted(group, key=lambda r: r.seed)
        kinds = {r.kind for r in group}
        if len(kinds) > 1:
            raise ValueError(f"{label}: its runs train different things ({', '.join(sorted(kinds))}); "
                             "a folder holds one method's runs")
        kind = group[0].kind
        last = [float(r.result["test_accuracy"]) for r in group]
        best = [float(r.result.get("best_test_accuracy", r.result["test_accuracy"])) for r in group]
        row = {
            "label": label, "kind": kind, "model": "/".join(sorted({str(r.result.get("model", "?")) for r in group})),
            "seeds": [r.seed for r in group], "last": last, "best": best,
            "params": sorted({int(r.result["num_params"]) for r in group if "num_params" in r.result}),
            "train_seconds": float(sum(r.train_seconds for r in group)),
            "student_key": group[0].student_key if kind != "teacher" else None,
            "paired_with": None, "delta_seeds": [], "delta_last": [], "delta_best": [],
        }
        if kind == "student":
            partners = {r.seed: scratch.get((r.seed, r.student_key)) for r in group}
            labels = sorted({p.label for p in partners.values() if p is not None})
            row["paired_with"] = ",".join(labels) or None
            for r, la, be in zip(group, last, best):
                p = partners[r.seed]
                if p is None:
                    continue
                row["delta_seeds"].append(r.seed)
                row["delta_last"].append(la - float(p.result["test_accuracy"]))
                row["delta_best"].append(be - float(p.result.get("best_test_accuracy", p.result["test_accuracy"])))
        for key in ("last", "best", "delta_last", "delta_best"):
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std(row[key])
        out.append(row)
    return _ordered(out)


def _ordered(rows_: list[dict]) -> list[dict]:
    teachers = sorted((r for r in rows_ if r["kind"] == "teacher"), key=lambda r: r["label"])
    scratches = sorted((r for r in rows_ if r["kind"] == "scratch"), key=lambda r: (r["label"] != "scratch", r["label"]))
    students = sorted((r for r in rows_ if r["kind"] == "student"),
                      key=lambda r: (-(r["last_mean"] if r["last_mean"] is not None else -1.0), r["label"]))
    out = list(teachers)
    for s in scratches:
        out.append(s)
        out.extend(r for r in students if r["student_key"] == s["student_key"])
    placed = {id(r) for r in out}
    out.extend(r for r in students if id(r) not in placed)  # no baseline of their architecture
    return out


def _acc(mean, std, n) -> str:
    if mean is None:
        return "-"
    return f"{mean:.4f} (n=1)" if n == 1 else f"{mean:.4f} ± {std:.4f}"


def _delta(mean, std, n) -> str:
    if mean is None:
        return "-"
    return f"{mean:+.4f} (n=1)" if n == 1 else f"{mean:+.4f} ± {std:.4f}"


def _params(values) -> str:
    return "-" if not values else "/".join(f"{v:,}" for v in values)


def _name(row: dict) -> str:
    return {"teacher": "teacher", "scratch": "from scratch"}.get(row["kind"], f"`{row['label']}`") + (
        f" ({row['label']})" if row["kind"] == "scratch" and row["label"] != "scratch" else "")


def markdown(rows_: list[dict], footer: list[str] = ()) -> str:
    lines = ["| run | model | seeds | test acc, last epoch | test acc, best epoch | Δ last vs scratch (paired) "
             "| Δ best vs scratch (paired) | params | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows_:
        n, nd = len(r["seeds"]), len(r["delta_seeds"])
        seeds = ",".join(map(str, r["seeds"]))
        if r["kind"] == "student" and nd != n:  # some seeds have no baseline of the same student
            seeds += f" (Δ: {','.join(map(str, r['delta_seeds'])) or 'none'})"
        lines.append(
            f"| {_name(r)} | {r['model']} | {seeds} | {_acc(r['last_mean'], r['last_std'], n)} "
            f"| {_acc(r['best_mean'], r['best_std'], n)} | {_delta(r['delta_last_mean'], r['delta_last_std'], nd)} "
            f"| {_delta(r['delta_best_mean'], r['delta_best_std'], nd)} | {_params(r['params'])} "
            f"| {r['train_seconds']:.1f} |")
    return "\n".join(lines + ([""] + list(footer) if footer else []))


CSV_FIELDS = ("label", "kind", "model", "n", "seeds", "last_mean", "last_std", "best_mean", "best_std",
              "delta_n", "delta_seeds", "delta_last_mean", "delta_last_std", "delta_best_mean", "delta_best_std",
              "paired_with", "params", "train_seconds")


def to_csv(rows_: list[dict]) -> str:
    """The rows at full float precision (repr); empty cells where a figure does not exist."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for r in rows_:
        cell = {**r, "n": len(r["seeds"]), "seeds": " ".join(map(str, r["seeds"])), "delta_n": len(r["delta_seeds"]),
                "delta_seeds": " ".join(map(str, r["delta_seeds"])), "params": " ".join(map(str, r["params"]))}
        w.writerow(["" if cell.get(k) is None else repr(cell[k]) if isinstance(cell[k], float) else cell[k]
                    for k in CSV_FIELDS])
    return buf.getvalue()


def footer(unfinished: list[str], command: str | None, root: str) -> list[str]:
    lines = ["Test accuracy: mean ± sample std (ddof=1) over the seeds listed. Δ: per seed, the distilled "
             "student minus the from-scratch run of the same seed and student architecture (same "
             "initialisation and data order), then mean ± std. Train s: training seconds summed over seeds."]
    made = _read_json(os.path.join(root, "compare.json")) or {}
    for cmd in made.get("commands", []):
        lines.append(f"Runs: {cmd}")
    if unfinished:
        lines.append(f"Not finished (left out): {', '.join(unfinished)}")
    if command:
        lines.append(f"Produced by: {command}")
    return lines


def write(root: str, out: str | None = None, command: str | None = None) -> tuple[str, str, str]:
    """Reads `root`, writes `<out>.md` and `<out>.csv` (default out: `<root>/table`); returns
    (markdown, md path, csv path). ValueError (one line) if there is nothing to tabulate."""
    runs, unfinished = read_runs(root)
    if not runs:
        raise ValueError(f"no finished runs in {root}: expected <label>/seed<k>/ run folders as "
                         "python -m experiments.compare writes them" +
                         (f" (unfinished: {', '.join(unfinished)})" if unfinished else ""))
    table_rows = rows(runs)
    md = markdown(table_rows, footer(unfinished, command, root))
    out = out or os.path.join(root, "table")
    md_path, csv_path = out + ".md", out + ".csv"
    paths.write_text(md_path, md + "\n")
    paths.write_text(csv_path, to_csv(table_rows))
    return md, md_path, csv_path
