"""Distil -> prune -> quantise -> export in one command, and one table comparing every model.

`run(config, workdir)` (entry point: ``python -m experiments.compress``) does, in `workdir`:

1. the experiment itself (`config.stages`: teacher, KD student, scratch baseline) as
   ``kdjax.train.run`` does it, in `workdir`;
2. every trained variant of ``config.compress.variants`` (pruning, QAT), each a normal kdjax run in
   ``<workdir>/variants/<name>`` whose one stage ('prune' or 'qat') starts from the distilled
   student and fine-tunes it with the student's distillation objective, the teacher reused from
   step 1 (`teacher.checkpoint`);
3. post-training variants of the float student (``config.compress.ptq``: int8 'weights', int8
   'static', 'bf16' weights), which need no training;
4. the export of every model (kdjax.export) into ``<workdir>/export/<name>.{jaxexport,npz,json}``;
5. ``compress.json``, ``compress.md`` and ``compress.png`` in `workdir`: one row per model.

Finished stages are skipped and unfinished ones resume, as in every kdjax run, so rerunning the
command after an interruption continues where it stopped.

Every figure of a row is measured on the exported artifact, the file one would deploy: its test
accuracy, its size, its FLOPs per image (XLA's cost analysis of the compiled artifact), its latency
(median of `latency_calls` jitted calls at batch 1 and 256 on the first local device) and its top-1
agreement with the teacher's artifact. The accuracies at the last and the best epoch come from the
training history of the rows that were trained.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from kdjax import config as kconfig
from kdjax import data as kdata
from kdjax import export as kexport
from kdjax import inference, models, paths, prune, quantize, runs, train

VARIANT_STAGES = ("prune", "qat")
PTQ = {"weights": "int8", "static": "int8-static", "bf16": "bf16"}  # compress.ptq entry -> variant name
BASE_ROWS = {"teacher": "teacher", "student": "student", "student_scratch": "scratch"}


def experiment_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` without its `compress` block: the compression plan does not change what the
    experiment's stages compute, so editing it never invalidates (or moves) a finished run."""
    out = copy.deepcopy(config)
    with out.unlocked():
        if "compress" in out:
            del out["compress"]
    return out


def variant_config(config: ml_collections.ConfigDict, name: str, workdir: str) -> ml_collections.ConfigDict:
    """The config of trained variant `name`: the experiment's config with the variant's `prune` or
    `quant` fields, one stage (its `stage`) that starts from `workdir`'s student, and the teacher
    of `workdir`."""
    spec = config.compress.variants[name]
    stage = spec.stage
    if stage not in VARIANT_STAGES:
        raise ValueError(f"config.compress.variants.{name}.stage={stage!r}; choose one of: {', '.join(VARIANT_STAGES)}")
    out = experiment_config(config)
    with out.unlocked():
        for section in ("prune", "quant"):
            for key, value in (spec.get(section) or {}).items():
                if key not in out[section]:
                    raise ValueError(f"config.compress.variants.{name}.{section}.{key} is not a field of "
                                     f"config.{section} ({', '.join(sorted(out[section]))})")
                out[section][key] = value
        out.stages = stage
        source = paths.absolute(workdir)
        if not out.teacher.checkpoint:  # else the experiment's own reused teacher
            out.teacher.checkpoint = source
            out.teacher.checkpoint_role = "teacher"
        out.init.from_run = source
        out.init.role = "student"
        out.init.stages = stage
        out.init.reinit = ""
    return out


# The config block each variant stage reads, and the fields of it compress itself reads from the
# base config whatever the variants set (the calibration of every int8 row, the layers kept float).
VARIANT_BLOCKS = {"prune": "prune", "qat": "quant"}
READ_FROM_BASE = {"quant": ("calibration_batches", "exclude")}
_METHOD_SPECIFIC = {f for fields in prune.METHOD_FIELDS.values() for f in fields}  # read by some methods only


def unread_fields(config) -> dict[str, str]:
    """Fields of the base `prune` and `quant` blocks that no part of the compression command reads,
    each with a one-line reason: every variant that reads the block sets its own value, or no
    variant (and no stage of the experiment) reads the block at all. An override of one of them
    would be accepted and ignored."""
    variants = config.compress.variants
    stages = set(kconfig.planned_stages(experiment_config(config)))
    out = {}
    for stage, block in VARIANT_BLOCKS.items():
        if stage in stages:
            continue  # the experiment's own stage reads the whole block
        readers = [n for n in variants if variants[n].stage == stage]
        for field in config[block]:
            if field in READ_FROM_BASE.get(block, ()):
                continue
            if not readers:
                out[f"{block}.{field}"] = (f"no variant of config.compress.variants has stage {stage!r}, so nothing "
                                           f"reads config.{block}; add a variant with stage={stage!r}")
                continue
            own = [n for n in readers if field in (variants[n].get(block) or {})]
            # A variant reads the base value unless it sets its own or its method ignores the field.
            if all(n in own or not _reads(config, variants[n], block, field) for n in readers):
                where = own or readers
                out[f"{block}.{field}"] = (
                    f"every {stage!r} variant sets its own {block}.{field} or ignores it; set it in a variant, e.g. "
                    f"--config.compress.variants.{where[0]}.{block}.{field}=...")
    return out


def _reads(config, variant, block: str, field: str) -> bool:
    """Whether `variant`'s method reads `block`.`field` at all (kdjax.prune.METHOD_FIELDS)."""
    if block != "prune":
        return True
    method = (variant.get("prune") or {}).get("method", config.prune.method)
    return field not in _METHOD_SPECIFIC or field in prune.METHOD_FIELDS.get(method, ())


def check_overrides(config, overrides) -> None:
    """One-line ValueError if a command-line override (`--config.<key>`) names a field that
    `unread_fields` says no part of the command reads."""
    unread = unread_fields(config)
    for key in sorted(overrides):
        if key in unread:
            raise ValueError(f"--config.{key} is not read by experiments.compress: {unread[key]}")


def plan(config) -> list[tuple[str, str, str | None, str | None]]:
    """The rows, in order: (name, run folder relative to the workdir, stage, post-training kind)."""
    c = config.compress
    rows = [(BASE_ROWS[r], ".", r, None) for r in BASE_ROWS if r in kconfig.planned_stages(experiment_config(config))]
    if "student" not in [r[2] for r in rows]:
        raise ValueError("experiments.compress compresses the distilled student: keep 'student' in config.stages")
    for kind in filter(None, (k.strip() for k in str(c.ptq).split(","))):
        if kind not in PTQ:
            raise ValueError(f"unknown config.compress.ptq entry {kind!r}; choose from: {', '.join(PTQ)}")
        rows.append((f"student-{PTQ[kind]}", ".", "student", kind))
    for name in c.variants:
        stage = c.variants[name].stage
        rows.append((f"student-{name}", os.path.join("variants", name), stage, None))
    return rows


def load_row(workdir: str, folder: str, stage: str, kind: str | None, dataset: kdata.Dataset,
             calibration_batches: int, batch_size: int, seed: int):
    """(model, variables, result of the trained stage, description) of one row: a stage's selected
    checkpoint, converted to int8 for a 'qat' stage (with that run's quant.mode) and for the
    post-training kinds 'weights'/'static' (int8), or cast for 'bf16'."""
    run_dir = os.path.join(workdir, folder)
    model, variables, result = runs.load_trained_model(run_dir, stage, dataset, jnp.float32)
    saved = json.loads(paths.read_text(os.path.join(run_dir, "config.json")))
    quant = saved.get("quant", {})
    mode = "bf16" if kind == "bf16" else kind if kind else quant.get("mode") if stage == "qat" else None
    info = {"run": paths.absolute(run_dir), "stage": stage, "weights_dtype": "float32"}
    if mode == "bf16":
        variables = quantize.bf16(variables)
        info["weights_dtype"] = "bfloat16"
    elif mode is not None:
        calibration = calibration_images(dataset, calibration_batches, batch_size, seed) if mode == "static" else ()
        model, variables = quantize.ptq(model, variables, mode, calibration, exclude=quant.get("exclude", ""),
                                       input_shape=dataset.image_shape)
        info.update(weights_dtype="int8", quantization=mode)
    if mode is not None:  # the converted model's own accuracy (the stage's is the float one's)
        info.update(test_accuracy=accuracy(model, variables, dataset), selected_test_accuracy=None,
                    source_test_accuracy=result.get("selected_test_accuracy", result.get("test_accuracy")))
    return model, variables, result, info


def accuracy(model, variables, dataset: kdata.Dataset, batch: int = 512) -> float:
    """Test accuracy of an eval-mode forward pass (float, bf16 or Qwix-quantised variables)."""
    logits = inference.predict_logits(model, variables, dataset.test.images, dataset.mean, dataset.std, batch)
    return float(np.mean(logits.argmax(-1) == dataset.test.labels))


def calibration_images(dataset: kdata.Dataset, batches: int, batch_size: int, seed: int) -> list:
    """`batches` batches of normalised training images in a seeded order (static quantisation)."""
    order = np.random.default_rng(seed).permutation(len(dataset.train.labels))[:batches * batch_size]
    images = kdata.normalize(dataset.train.images[order], dataset.mean, dataset.std)
    return [images[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _predict(call, images: np.ndarray, batch: int = 512) -> np.ndarray:
    return np.concatenate([np.asarray(call(images[i:i + batch])) for i in range(0, len(images), batch)])


def median_seconds(fn, args: tuple, calls: int) -> float:
    """Median wall time of `calls` calls of ``fn(*args)`` (each waited for), after one warm-up."""
    fn(*args).block_until_ready()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(artifact: str, dataset: kdata.Dataset, latency_calls: int) -> dict[str, Any]:
    """Test accuracy, FLOPs per image and latency (batch 1 and 256) of a `.jaxexport` file, and
    its test-set predictions (for agreement)."""
    exported = jax.export.deserialize(bytearray(paths.read_bytes(artifact)))
    call = jax.jit(exported.call)
    test = dataset.test
    logits = _predict(call, test.images)
    preds = logits.argmax(-1)
    one = np.asarray(test.images[:1])
    cost = call.lower(one).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    big = np.asarray(np.resize(test.images, (256,) + test.images.shape[1:]))
    return {
        "accuracy": float(np.mean(preds == test.labels)),
        "flops_per_image": float(cost.get("flops", float("nan"))) if cost else None,
        "latency_ms_batch1": 1e3 * median_seconds(call, (one,), latency_calls),
        "latency_ms_batch256": 1e3 * median_seconds(call, (big,), latency_calls),
        "predictions": preds,
    }


def _counts(variables) -> tuple[int, int]:
    """(parameters, non-zero parameters) of a float or quantised params tree (int8 kernels count
    their int8 values, not their scales)."""
    flat = quantize.storage({"params": variables["params"]})
    arrays = [a for k, a in flat.items() if not k.endswith(".scale") and "_scale" not in k.rsplit("/", 1)[-1]]
    return int(sum(a.size for a in arrays)), int(sum(np.count_nonzero(a) for a in arrays))


def run(config: ml_collections.ConfigDict, workdir: str, overwrite: bool = False) -> dict:
    """Every step of the module docstring; returns {'rows': [...], 'device': ...} (compress.json)."""
    rows_plan = plan(config)
    dataset = train.load_dataset(config.dataset, config.seed)
    if dataset.streamed:  # calibration and the PTQ evaluation read the splits' arrays
        raise ValueError(f"experiments.compress needs an in-memory data set; {dataset.name!r} is streamed from files "
                         "(train and distil it with the training commands)")
    # One-line errors before any training: each variant's settings, and every quantisation mode
    # against the student's layers.
    student = models.get_model(config.student.model, num_classes=dataset.num_classes, **config.student.kwargs.to_dict())
    modes = {k for _, _, _, k in rows_plan if k in quantize.MODES}
    for name in config.compress.variants:
        variant = variant_config(config, name, workdir)
        kconfig.validate(variant)
        if variant.stages == "qat":
            modes.add(variant.quant.mode)
    for mode in sorted(modes):
        quantize.check(student, dataset.image_shape, mode, config.quant.exclude)
    summary = train.run(experiment_config(config), workdir, overwrite=overwrite)
    for name in config.compress.variants:
        logging.info("compress: variant %s", name)
        train.run(variant_config(config, name, workdir), os.path.join(workdir, "variants", name), overwrite=overwrite)
    out_dir = os.path.join(workdir, "export")
    rows, teacher_preds = [], None
    for name, folder, stage, kind in rows_plan:
        model, variables, result, info = load_row(workdir, folder, stage, kind, dataset,
                                                  config.quant.calibration_batches, config.batch_size, config.seed)
        files = kexport.export_model(model, variables, image_shape=dataset.image_shape, mean=dataset.mean,
                                     std=dataset.std, out_dir=out_dir, name=name,
                                     metadata={**info, "dataset": dataset.name, "model": result.get("model")})
        m = measure(files["jaxexport"], dataset, config.compress.latency_calls)
        params, nonzero = _counts(variables)
        preds = m.pop("predictions")
        if name == "teacher":
            teacher_preds = preds
        trained = kind is None
        rows.append({
            "name": name, "model": result.get("model"), "stage": stage, "run": info["run"],
            "weights_dtype": info["weights_dtype"], "test_accuracy": m["accuracy"],
            "last_epoch_accuracy": result.get("test_accuracy") if trained else None,
            "best_epoch_accuracy": result.get("best_test_accuracy") if trained else None,
            "params": params, "nonzero_params": nonzero, "artifact_bytes": paths.getsize(files["jaxexport"]),
            "npz_bytes": paths.getsize(files["npz"]), "flops_per_image": m["flops_per_image"],
            "latency_ms_batch1": m["latency_ms_batch1"], "latency_ms_batch256": m["latency_ms_batch256"],
            "teacher_agreement": float(np.mean(preds == teacher_preds)) if teacher_preds is not None else None,
        })
    student = next(r for r in rows if r["name"] == "student")
    for r in rows:
        r["delta_vs_student"] = r["test_accuracy"] - student["test_accuracy"]
    report = {"rows": rows, "device": f"{device_name()}, latency: median of {config.compress.latency_calls} calls",
              "dataset": dataset.name,
              "jax_version": jax.__version__, "summary": summary}
    paths.write_text(os.path.join(workdir, "compress.json"), json.dumps(report, indent=2, default=float))
    paths.write_text(os.path.join(workdir, "compress.md"), format_table(report) + "\n")
    plot(report, os.path.join(workdir, "compress.png"))
    return report


def device_name() -> str:
    """The device latencies are measured on: its kind, and the processor's model name on CPU."""
    device = jax.local_devices()[0]
    name = f"{device.platform} {device.device_kind}"
    if device.platform == "cpu" and os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            models_ = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if models_:
            name = f"cpu: {models_[0]}, {len(models_)} cores"
    return name


def format_table(report: dict) -> str:
    """compress.md: one markdown row per model."""
    head = ["model", "dtype", "test acc", "last ep", "best ep", "Δ vs student", "params", "non-zero",
            ".jaxexport bytes", "MFLOPs/img", "ms @1", "ms @256", "agree w/ teacher"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        cells = [f"{r['name']} ({r['model']})", r["weights_dtype"], fmt(r["test_accuracy"], ".4f"),
                 fmt(r["last_epoch_accuracy"], ".4f"), fmt(r["best_epoch_accuracy"], ".4f"),
                 fmt(r["delta_vs_student"], "+.4f"), f"{r['params']:,}", f"{r['nonzero_params']:,}",
                 f"{r['artifact_bytes']:,}", fmt(r["flops_per_image"] and r["flops_per_image"] / 1e6, ".3f"),
                 fmt(r["latency_ms_batch1"], ".3f"), fmt(r["latency_ms_batch256"], ".3f"),
                 fmt(r["teacher_agreement"], ".4f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nData set: {report['dataset']}. Device: {report['device']}."


def plot(report: dict, path: str) -> None:
    """compress.png: accuracy vs artifact bytes and accuracy vs batch-256 latency, one labelled
    point per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in ((axes[0], "artifact_bytes", ".jaxexport bytes"),
                           (axes[1], "latency_ms_batch256", "latency at batch 256 (ms)")):
        for i, r in enumerate(report["rows"]):  # staggered labels: many points share a size or accuracy
            ax.scatter(r[key], r["test_accuracy"])
            ax.annotate(r["name"], (r[key], r["test_accuracy"]), fontsize=7, xytext=(4, 4 - 9 * (i % 3)),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{report['dataset']}: accuracy vs size and latency ({report['device']})", fontsize=9)
    fig.tight_layout()
    paths.save_figure(fig, path, dpi=120)
    plt.close(fig)
