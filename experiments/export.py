"""Export a trained model of a run for deployment (see kdjax/export.py for the three files).

    python -m experiments.export --workdir=runs/digits-kd-s0-1a2b3c4d --model=student
    python -m experiments.export --workdir=runs/X --model=teacher --out=/tmp/deploy
    python -m experiments.export --workdir=runs/X --model=student --variant=int8
    python -m experiments.export --workdir=runs/compress-X --model=student --variant=prune70

Writes <out>/<name>.jaxexport, .npz and .json (default <out>: <workdir>/export), where <name> is
the model (`student`) or model-variant (`student-int8`, `student-prune70`). The model is the
checkpoint the stage selected (best validation epoch, else the last). Variants:

    int8          int8 weights (per-channel, symmetric), float activations (Qwix PTQ)
    int8-static   int8 weights and int8 activations calibrated on quant.calibration_batches batches
    bf16          bfloat16 weights
    <name>        a trained variant of an experiments.compress run, <workdir>/variants/<name>
                  (e.g. prune70, nm24, channel50; qat is converted to int8 with its quant.mode)

User mistakes (no such run, stage, checkpoint or variant) print one line and exit 2.
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
_VARIANT = flags.DEFINE_string("variant", "", "int8, int8-static, bf16, or a trained variant of an "
                               "experiments.compress run (<workdir>/variants/<name>); '' exports the model as trained.")
flags.mark_flag_as_required("workdir")


POST_TRAINING = {"int8": "weights", "int8-static": "static", "bf16": "bf16"}


def export_run(workdir: str, role: str, out_dir: str | None = None, variant: str = "") -> dict[str, str]:
    """Exports stage `role` of the run in `workdir` (as `variant`); returns the written paths."""
    from kdjax import paths

    paths.check_workdir(workdir)
    if out_dir:
        paths.check_workdir(out_dir)
    import kdjax
    from kdjax import compress, export, train

    if role not in train.ROLES:
        raise ValueError(f"unknown --model {role!r}; choose one of: {', '.join(train.ROLES)}")
    config_path = os.path.join(workdir, "config.json")
    if not paths.exists(config_path):
        raise ValueError(f"{workdir} is not a kdjax run directory (no config.json)")
    config = json.loads(paths.read_text(config_path))
    folder, stage, kind = ".", role, POST_TRAINING.get(variant)
    if variant and kind is None:  # a trained variant of an experiments.compress run
        variants = os.path.join(workdir, "variants")
        found = paths.listdir(variants)
        if variant not in found:
            raise ValueError(f"unknown --variant {variant!r}; choose one of: {', '.join(list(POST_TRAINING) + found)}")
        if role != "student":
            raise ValueError(f"--variant={variant} is a variant of the student: use --model=student")
        folder = os.path.join("variants", variant)
        stage = json.loads(paths.read_text(os.path.join(workdir, folder, "config.json")))["stages"]
    dataset = train.load_dataset(dict(config["dataset"], download=False), config["seed"])
    model, variables, result, info = compress.load_row(
        workdir, folder, stage, kind, dataset, config.get("quant", {}).get("calibration_batches", 4),
        config["batch_size"], config["seed"])
    metadata = {
        "kdjax_version": kdjax.__version__,
        "variant": variant or None,
        "model": result.get("model"),
        "dataset": dataset.name,
        "test_accuracy": result.get("test_accuracy"),
        "selected_test_accuracy": result.get("selected_test_accuracy"),
        "selected_epoch": result.get("selected_epoch"),
        **info,  # run, stage, weights dtype; a converted model's own test accuracy
    }
    return export.export_model(model, variables, image_shape=dataset.image_shape, mean=dataset.mean,
                               std=dataset.std, out_dir=out_dir or os.path.join(workdir, "export"),
                               name=f"{role}-{variant}" if variant else role, metadata=metadata)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        paths = export_run(_WORKDIR.value, _MODEL.value, _OUT.value, _VARIANT.value)
    except ValueError as e:  # no run, stage or checkpoint: one line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for path in paths.values():
        print(path)


if __name__ == "__main__":
    app.run(main)
