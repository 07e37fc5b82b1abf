"""Export a trained model of a run for deployment (see kdjax/export.py for the three files).

    python -m experiments.export --workdir=runs/digits-kd-s0-1a2b3c4d --model=student
    python -m experiments.export --workdir=runs/X --model=teacher --out=/tmp/deploy

Writes <out>/<model>.jaxexport, .npz and .json (default <out>: <workdir>/export). The model is the
checkpoint the stage selected (best validation epoch, else the last). User mistakes (no such run,
stage or checkpoint) print one line and exit 2.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory of a finished (or checkpointed) kdjax run.")
_MODEL = flags.DEFINE_string("model", "student", "Which stage's model to export: one of the stages of "
                             "kdjax.train.ROLES (teacher, student_init, student, student_scratch, prune).")
_OUT = flags.DEFINE_string("out", None, "Output folder (default: <workdir>/export).")
flags.mark_flag_as_required("workdir")


def export_run(workdir: str, role: str, out_dir: str | None = None) -> dict[str, str]:
    """Exports stage `role` of the run in `workdir`; returns the written paths."""
    import jax.numpy as jnp

    import kdjax
    from kdjax import export, train

    if role not in train.ROLES:
        raise ValueError(f"unknown --model {role!r}; choose one of: {', '.join(train.ROLES)}")
    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        raise ValueError(f"{workdir} is not a kdjax run directory (no config.json)")
    with open(config_path) as f:
        config = json.load(f)
    dataset = train.load_dataset(dict(config["dataset"], download=False), config["seed"])
    model, variables, result = train.load_trained_model(workdir, role, dataset, jnp.float32)
    metadata = {
        "kdjax_version": kdjax.__version__,
        "run": os.path.abspath(workdir),
        "stage": role,
        "model": result.get("model"),
        "dataset": dataset.name,
        "test_accuracy": result.get("test_accuracy"),
        "selected_test_accuracy": result.get("selected_test_accuracy"),
        "selected_epoch": result.get("selected_epoch"),
    }
    return export.export_model(model, variables, image_shape=dataset.image_shape, mean=dataset.mean,
                               std=dataset.std, out_dir=out_dir or os.path.join(workdir, "export"),
                               name=role, metadata=metadata)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        paths = export_run(_WORKDIR.value, _MODEL.value, _OUT.value)
    except ValueError as e:  # no run, stage or checkpoint: one line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for path in paths.values():
        print(path)


if __name__ == "__main__":
    app.run(main)
