"""The evaluation report of a finished (or partly finished) run (see kdjax/evaluate.py).

    python -m experiments.evaluate --workdir=runs/digits-kd-s0-1a2b3c4d
    python -m experiments.evaluate --workdir=runs/X --latency_calls=50 --noplots

Writes <workdir>/report.json, report.md (its main table is printed) and report/*.png for every
finished stage of the run and of its compressed variants (<workdir>/variants/*). Bad input (a
folder that is not a run, a run with no finished stage) prints one line and exits 2.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory of a kdjax run with at least one finished stage.")
_LATENCY_CALLS = flags.DEFINE_integer("latency_calls", 30, "Jitted calls whose median is each latency (at least 20).")
_PLOTS = flags.DEFINE_bool("plots", True, "Draw the PNGs in <workdir>/report/.")
flags.mark_flag_as_required("workdir")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from kdjax import evaluate

    try:
        rep = evaluate.report(_WORKDIR.value, latency_calls=_LATENCY_CALLS.value, plots=_PLOTS.value)
    except ValueError as e:  # not a run, nothing finished, too few latency calls: one line
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        sys.exit(2)
    print(evaluate.main_table(rep))
    for s in rep["skipped"]:
        print(f"not reported: {s['name']} ({s['reason']})")
    pngs = sum(len(v) if isinstance(v, dict) else 1 for v in rep["plots"].values())
    print(f"\nreport: {os.path.join(_WORKDIR.value, 'report.md')}, report.json and {pngs} PNGs in "
          f"{os.path.join(_WORKDIR.value, evaluate.REPORT_DIR)} ({rep['report_seconds']:.1f} s)")


if __name__ == "__main__":
    app.run(main)
