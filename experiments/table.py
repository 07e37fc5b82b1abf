"""The comparison table of a folder of runs (reads run folders, never trains).

    python -m experiments.table runs/digits [--out=runs/digits/table]

Reads `<folder>/<label>/seed<k>/` as `python -m experiments.compare` writes them (kdjax.table
says what each figure is) and writes `<out>.md` and `<out>.csv` (default out: `<folder>/table`),
then prints the markdown, whose last line names the command that produced it. A missing folder or
one without finished runs: one line, exit status 2.
"""

from __future__ import annotations

import shlex
import sys

from absl import app, flags

from kdjax import table

_OUT = flags.DEFINE_string("out", None, "Output path without extension (default: <folder>/table).")


def main(argv):
    if len(argv) != 2:
        print("error: give one folder of runs, e.g. python -m experiments.table runs/digits", file=sys.stderr)
        sys.exit(2)
    command = "python -m experiments.table " + shlex.join(sys.argv[1:])
    try:
        md, md_path, csv_path = table.write(argv[1], _OUT.value, command=command)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(md)
    print(f"table: {md_path} {csv_path}")


if __name__ == "__main__":
    app.run(main)
