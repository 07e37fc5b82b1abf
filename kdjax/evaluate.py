"""The evaluation report of a run: every finished model's test-set figures, tables and plots.

`report(workdir)` (entry point: ``python -m experiments.evaluate --workdir=runs/X``) reads a kdjax
run folder and writes

    <workdir>/report.json    every figure below, per model
    <workdir>/report.md      the main table, per-class tables, confusion matrices, links to the plots
    <workdir>/report/*.png   per model: confusion matrix (<name>_confusion.png), reliability diagram
                             (<name>_reliability.png), training curves (<name>_curves.png); and
                             comparison.png (accuracy, parameters, latency of every model)

for each finished stage of the run (``<stage>/result.json``: teacher, student_init, student,
student_scratch, prune, qat) and of every compressed variant run in ``<workdir>/variants/<name>/``
(kdjax.compress; named ``student-<name>`` as in compress.md).

Where the figures come from:

- Every accuracy-type figure (top-1, top-5, per-class precision/recall/F1 and their macro and
  weighted means, confusion matrix, one-vs-rest ROC-AUC, NLL, ECE, agreement with the teacher,
  KL(teacher || model)) is computed from ``<stage>/predictions.npz`` alone (``logits`` (N, C)
  float32 test logits of the stage's selected model, ``labels`` (N,)), so anyone can recompute it
  from that file. sklearn.metrics computes what it provides; ECE and KL are written here (numpy).
  A stage written before predictions.npz existed gets its logits recomputed from the checkpoint
  (the report says so in ``logits_source``).
- Parameters, FLOPs per image and latency come from the selected checkpoint, loaded with
  ``kdjax.runs.load_trained_model(run, stage, dataset, float32)``: FLOPs are XLA's cost analysis
  of the jitted eval-mode forward (uint8 images -> normalisation -> logits) compiled for batch 1;
  latency is the median of `latency_calls` calls of that compiled forward at batch 1 and at the
  run's ``eval_batch_size`` on the first local device (kdjax.compress.device_name()). A 'qat'
  stage loads as the float model with its quantisation-aware weights: its size, FLOPs and latency
  are those of the float forward, while its accuracy figures (predictions.npz) are those of the
  fake-quantised forward the stage evaluated.

Definitions (the choices the figures depend on):

- top-5: the label is among the 5 highest logits; null when the data set has <= 5 classes (it
  would be 1 by construction).
- per-class precision/recall/F1 over every class; a class absent from the test labels has null
  recall and F1 (and null precision if never predicted). Macro and weighted means run over the
  classes present in the test labels (sklearn, zero_division=0: a present class never predicted
  has precision 0).
- ROC-AUC: macro one-vs-rest on softmax probabilities. With every class present it is
  ``roc_auc_score(multi_class='ovr', average='macro')``; with some class absent from the test set
  it is the mean of the binary AUCs (sklearn, the same per-class quantity) over the present classes
  (``roc_auc_classes`` says how many); null with fewer than 2 present classes.
- NLL: ``log_loss`` of the float64 softmax. ECE: 15 equal-width bins of the max softmax
  probability, bin b = (b/15, (b+1)/15], sum over bins of |bin| / N * |accuracy - mean confidence|.
- agreement: fraction of test images where argmax(model) == argmax(teacher); KL: mean over test
  images of KL(softmax(teacher) || softmax(model)) at T=1, in nats. The teacher is the run's
  teacher stage (its ``teacher/predictions.npz``), also for the variants; without a teacher stage
  in the run (e.g. a teacher reused with teacher.checkpoint) both are null.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np

from kdjax import paths

REPORT_DIR = "report"
ECE_BINS = 15
TOP_K = 5
LATENCY_CALLS = 30
MIN_LATENCY_CALLS = 20
HEAD_ACCURACIES = ("test_accuracy_cls", "test_accuracy_dist", "test_accuracy_heads_logit_mean",
                   "test_accuracy_heads_softmax_mean")
MAX_MATRIX_CLASSES = 20  # confusion matrices larger than this: json and PNG only, not in report.md

# Class names of the data sets (kdjax.data has ids only); a run's dataset.classes picks and orders them.
CLASS_NAMES = {
    "digits": [str(i) for i in range(10)],
    "mnist": [str(i) for i in range(10)],
    "fashion_mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}


# ----------------------------------------------------------------------------------------------
# Figures from logits (numpy + sklearn only: no JAX)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> tuple[float, list]:
    """ECE over `bins` equal-width bins of the max probability, bin b = (b/bins, (b+1)/bins]
    (Guo et al. 2017); also the rows of the reliability diagram: one dict per bin with its edges,
    count, accuracy and mean confidence (None for an empty bin)."""
    conf = probs.max(axis=-1)
    correct = (probs.argmax(axis=-1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.digitize(conf, edges[1:-1], right=True)  # edges[b] < conf <= edges[b + 1]
    n = len(labels)
    ece, rows = 0.0, []
    for b in range(bins):
        inside = which == b
        count = int(inside.sum())
        acc = float(correct[inside].mean()) if count else None
        mean_conf = float(conf[inside].mean()) if count else None
        if count:
            ece += count / n * abs(acc - mean_conf)
        rows.append({"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": count,
                     "accuracy": acc, "confidence": mean_conf})
    return float(ece), rows


def kl_teacher_model(teacher_logits: np.ndarray, logits: np.ndarray) -> float:
    """Mean over examples of KL(softmax(teacher) || softmax(model)) at T=1, in nats."""
    log_t, log_m = log_softmax(teacher_logits), log_softmax(logits)
    return float(np.mean(np.sum(np.exp(log_t) * (log_t - log_m), axis=-1)))


def _none_if_nan(x):
    return None if x is None or not np.isfinite(x) else float(x)


def classification_metrics(logits: np.ndarray, labels: np.ndarray, teacher_logits: np.ndarray | None = None,
                           num_classes: int | None = None) -> dict[str, Any]:
    """Every accuracy-type figure of one model from its test logits (N, C) and labels (N,)
    (see the module docstring for the definitions); `teacher_logits` of the same images for
    agreement and KL (None: both null)."""
    from sklearn import metrics as skm

    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels).astype(np.int64)
    n, c = logits.shape
    c = num_classes or c
    if len(labels) != n:
        raise ValueError(f"logits hold {n} examples but labels {len(labels)}")
    classes = np.arange(c)
    present = np.unique(labels)
    probs = softmax(logits)
    preds = logits.argmax(axis=-1)
    out: dict[str, Any] = {"num_examples": int(n), "num_classes": int(c), "classes_present": int(len(present))}
    out["top1_accuracy"] = float(skm.accuracy_score(labels, preds))
    out["top5_accuracy"] = (float(skm.top_k_accuracy_score(labels, logits, k=TOP_K, labels=classes))
                            if c > TOP_K else None)

    p, r, f, s = skm.precision_recall_fscore_support(labels, preds, labels=classes, zero_division=0)
    predicted = np.bincount(preds, minlength=c)
    out["per_class"] = [{
        "class": int(k),
        "precision": float(p[k]) if (s[k] or predicted[k]) else None,
        "recall": float(r[k]) if s[k] else None,
        "f1": float(f[k]) if s[k] else None,
        "support": int(s[k]),
    } for k in classes]
    for avg in ("macro", "weighted"):
        pa, ra, fa, _ = skm.precision_recall_fscore_support(labels, preds, labels=present, average=avg,
                                                            zero_division=0)
        out[avg] = {"precision": float(pa), "recall": float(ra), "f1": float(fa)}
    out["confusion_matrix"] = skm.confusion_matrix(labels, preds, labels=classes).tolist()

    if len(present) < 2:
        out["roc_auc_ovr_macro"], out["roc_auc_classes"] = None, f"null: {len(present)} class(es) in the test labels"
    elif len(present) == c:
        auc = (skm.roc_auc_score(labels, probs[:, 1]) if c == 2 else
               skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro", labels=classes))
        out["roc_auc_ovr_macro"], out["roc_auc_classes"] = float(auc), f"all {c} classes"
    else:
        aucs = [skm.roc_auc_score(labels == k, probs[:, k]) for k in present]
        out["roc_auc_ovr_macro"] = float(np.mean(aucs))
        out["roc_auc_classes"] = f"the {len(present)} of {c} classes present in the test labels"
    out["nll"] = float(skm.log_loss(labels, probs, labels=classes))
    out["ece"], out["reliability"] = expected_calibration_error(probs, labels)
    out["mean_confidence"] = float(probs.max(axis=-1).mean())
    if teacher_logits is not None:
        t = np.asarray(teacher_logits, np.float64)
        out["teacher_agreement"] = float(np.mean(preds == t.argmax(axis=-1)))
        out["kl_teacher_model"] = kl_teacher_model(t, logits)
    else:
        out["teacher_agreement"] = out["kl_teacher_model"] = None
    return out


# ----------------------------------------------------------------------------------------------
# Reading a run


def _read_json(path: str):
    if not paths.exists(path):
        return None
    try:
        return json.loads(paths.read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): a damaged run folder?") from None


def _roles():
    from kdjax import train

    return train.ROLES


def find_models(workdir: str) -> list[dict]:
    """The finished models of the run in `workdir` and of its variants, in report order: dicts
    with name, stage, run (absolute run folder), folder (relative to workdir), variant."""
    roles = _roles()
    found = [{"name": r, "stage": r, "run": paths.absolute(workdir), "folder": ".", "variant": None}
             for r in roles if paths.exists(os.path.join(workdir, r, "result.json"))]
    variants = os.path.join(workdir, "variants")
    for name in paths.listdir(variants):
        run_dir = os.path.join(variants, name)
        if not paths.exists(os.path.join(run_dir, "config.json")):
            continue
        stages = [r for r in roles if paths.exists(os.path.join(run_dir, r, "result.json"))]
        for stage in stages:
            found.append({"name": f"student-{name}" if len(stages) == 1 else f"{name}/{stage}", "stage": stage,
                          "run": paths.absolute(run_dir), "folder": os.path.join("variants", name),
                          "variant": name})
    return found


def class_names(dataset_cfg: dict, num_classes: int) -> list[str]:
    """Names of the classes of a run's data set, in label order (ids where kdjax knows no names)."""
    base = CLASS_NAMES.get(dataset_cfg.get("name"))
    chosen = str(dataset_cfg.get("classes") or "").strip()
    ids = [int(c) for c in chosen.split(",")] if chosen else list(range(num_classes))
    if base is None or len(ids) != num_classes or max(ids) >= len(base):
        return [str(i) for i in ids] if len(ids) == num_classes else [str(i) for i in range(num_classes)]
    return [base[i] for i in ids]


def load_predictions(path: str) -> tuple[np.ndarray, np.ndarray]:
    with paths.load_npz(path) as z:
        logits, labels = np.asarray(z["logits"], np.float32), np.asarray(z["labels"])
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"{path}: logits {logits.shape} and labels {labels.shape} are not (N, C) and (N,)")
    return logits, labels


def training_curves(metrics_path: str, role: str) -> dict[str, Any]:
    """The stage's history from metrics.jsonl: per logged train step the loss terms; per epoch
    the mean train-batch accuracy of the steps logged in it, and the val/test accuracy of its
    evaluation. A resumed stage logs some steps twice: the last row of a step wins."""
    rows = {}
    if paths.exists(metrics_path):
        with paths.open_file(metrics_path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if row.get("role") == role:
                    rows[(row.get("kind"), row.get("step"))] = row
    train_rows = sorted((r for (k, _), r in rows.items() if k == "train"), key=lambda r: r["step"])
    eval_rows = sorted((r for (k, _), r in rows.items() if k == "eval"), key=lambda r: r["step"])
    loss_keys = sorted({k for r in train_rows for k in r if k == "loss" or k.startswith("loss/")})
    by_epoch: dict[int, list[float]] = {}
    for r in train_rows:
        if "accuracy" in r:
            by_epoch.setdefault(int(np.ceil(r["epoch"] - 1e-9)), []).append(r["accuracy"])
    return {
        "train_steps": {"epoch": [r["epoch"] for r in train_rows],
                        **{k: [r.get(k) for r in train_rows] for k in loss_keys}},
        "train_accuracy": {"epoch": sorted(by_epoch), "value": [float(np.mean(by_epoch[e])) for e in sorted(by_epoch)]},
        "eval": {"epoch": [r["epoch"] for r in eval_rows],
                 **{k: [r.get(k) for r in eval_rows] for k in ("val_accuracy", "test_accuracy")
                    if any(k in r for r in eval_rows)}},
    }


# ----------------------------------------------------------------------------------------------
# Size, FLOPs and latency (JAX)


def _test_images(dataset, batch: int) -> np.ndarray:
    """uint8 test images for the latency figures: all of an in-memory split, the first eval batch
    (decoded, resized and center-cropped) of a streamed one."""
    if not dataset.streamed:
        return dataset.test.images
    from kdjax import data as kdata

    images, _, mask = next(iter(kdata.eval_batches(dataset.test, batch)))
    return images[mask > 0]


def performance(model, variables, images: np.ndarray, mean, std, eval_batch: int, calls: int) -> dict[str, Any]:
    """Parameters, FLOPs per image (XLA cost analysis of the eval forward compiled for batch 1) and
    the median latency of `calls` calls at batch 1 and at `eval_batch` (uint8 test images, repeated
    to fill the batch)."""
    import jax

    from kdjax import inference, models
    from kdjax.compress import median_seconds

    fwd = inference.eval_forward(model, mean, std)
    variables = jax.device_put(variables)
    one = jax.device_put(np.asarray(images[:1]))
    big = jax.device_put(np.resize(images, (eval_batch,) + images.shape[1:]))
    at_one = fwd.lower(variables, one).compile()
    cost = at_one.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = cost.get("flops") if cost else None
    at_batch = fwd.lower(variables, big).compile()
    leaves = jax.tree.leaves(variables["params"])
    return {
        "params": models.num_params(variables["params"]),
        "nonzero_params": int(sum(np.count_nonzero(np.asarray(a)) for a in leaves)),
        "flops_per_image": float(flops) if flops is not None and flops >= 0 else None,
        "latency_ms_batch1": 1e3 * median_seconds(at_one, (variables, one), calls),
        "latency_ms_eval_batch": 1e3 * median_seconds(at_batch, (variables, big), calls),
    }


# ----------------------------------------------------------------------------------------------
# The report


def report(workdir: str, *, latency_calls: int = LATENCY_CALLS, plots: bool = True) -> dict[str, Any] | None:
    """Writes report.json, report.md and report/*.png into `workdir` (see the module docstring);
    returns the report dict. One-line ValueError if `workdir` is not a kdjax run or has no
    finished stage. A model whose files cannot be read is listed under "skipped" with the reason,
    and the others are reported. In a multi-process run only process 0 reports (others: None)."""
    # Bad input is refused before JAX starts (so the CLI's error is the only line on stderr).
    if latency_calls < MIN_LATENCY_CALLS:
        raise ValueError(f"latency_calls={latency_calls}: the latency is the median of at least "
                         f"{MIN_LATENCY_CALLS} calls")
    paths.check_workdir(workdir)
    config = _read_json(os.path.join(workdir, "config.json"))
    if not isinstance(config, dict):
        raise ValueError(f"{workdir} is not a kdjax run directory (no config.json)")
    entries = find_models(workdir)
    if not entries:
        raise ValueError(f"{workdir} has no finished stage yet (no <stage>/result.json): nothing to report")
    import jax

    from kdjax import compress, inference, runs, train

    if jax.process_index() != 0:
        return None
    start = time.perf_counter()
    eval_batch = int(config.get("eval_batch_size") or 256)
    datasets: dict[str, Any] = {}

    def dataset_of(run_cfg: dict):
        ds_cfg = dict(run_cfg["dataset"], download=False)
        key = json.dumps([ds_cfg, run_cfg.get("seed", 0)], sort_keys=True, default=str)
        if key not in datasets:
            try:
                datasets[key] = train.load_dataset(ds_cfg, run_cfg.get("seed", 0))
            except Exception as e:  # noqa: BLE001 - no data here: size and latency are skipped
                datasets[key] = e
        return datasets[key]

    teacher = None  # (logits, labels) of this run's teacher stage: reported first (ROLES order)
    rows, skipped = [], []
    for e in entries:
        name, stage, run_dir = e["name"], e["stage"], e["run"]
        pred_path = os.path.join(run_dir, stage, "predictions.npz")
        try:
            run_cfg = _read_json(os.path.join(run_dir, "config.json")) or config
            result = _read_json(os.path.join(run_dir, stage, "result.json")) or {}
            dataset = dataset_of(run_cfg)
            model = variables = None
            perf_error = None
            if isinstance(dataset, Exception):
                perf_error = f"data set not loadable here ({type(dataset).__name__}: {str(dataset).splitlines()[0][:200]})"
            else:
                try:
                    import jax.numpy as jnp

                    model, variables, _ = runs.load_trained_model(run_dir, stage, dataset, jnp.float32)
                except Exception as err:  # noqa: BLE001 - e.g. checkpoints deleted: accuracy still reported
                    perf_error = f"checkpoint not loadable ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
            if paths.exists(pred_path):
                logits, labels = load_predictions(pred_path)
                source = paths.relpath(pred_path, workdir)
            elif model is not None and dataset.streamed:
                logits = inference.predict_split_logits(model, variables, dataset.test, dataset.mean, dataset.std,
                                                        eval_batch)
                labels = np.asarray(dataset.test.labels)
                source = f"recomputed from the {stage} checkpoint by the eval forward (no {stage}/predictions.npz)"
            elif model is not None:
                logits = inference.predict_logits(model, variables, dataset.test.images, dataset.mean, dataset.std,
                                              eval_batch)
                labels = np.asarray(dataset.test.labels)
                source = (f"recomputed from the {stage} checkpoint by the eval forward (no {stage}/predictions.npz: "
                          "the stage predates it)")
            else:
                raise ValueError(f"no {paths.relpath(pred_path, workdir)} and {perf_error}")
            if e["folder"] == "." and stage == "teacher":
                teacher = (logits, labels)
            t_logits = None
            if teacher is not None and teacher[1].shape == labels.shape and np.array_equal(teacher[1], labels) \
                    and teacher[0].shape == logits.shape:
                t_logits = teacher[0]
            m = classification_metrics(logits, labels, t_logits)
            perf = (performance(model, variables, _test_images(dataset, eval_batch), dataset.mean, dataset.std,
                                eval_batch, latency_calls) if model is not None else {})
        except Exception as err:  # noqa: BLE001 - one unreadable model does not stop the report
            skipped.append({"name": name, "reason": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"})
            continue
        curves = training_curves(os.path.join(run_dir, "metrics.jsonl"), stage)
        arch = result.get("model") or run_cfg.get("teacher" if stage == "teacher" else "student", {}).get("model")
        note = None
        if stage == "qat":
            note = ("accuracy figures: the fake-quantised forward (predictions.npz); params/FLOPs/latency: the float "
                    "model with the QAT weights")
        rows.append({
            **e, "model": arch, "logits_source": source, "note": note,
            "selected_epoch": result.get("selected_epoch"), "selected_by": result.get("selected_by"),
            "params": perf.get("params", result.get("num_params")),
            "nonzero_params": perf.get("nonzero_params", result.get("nonzero_params")),
            "flops_per_image": perf.get("flops_per_image"),
            "latency_ms_batch1": perf.get("latency_ms_batch1"),
            "latency_ms_eval_batch": perf.get("latency_ms_eval_batch"),
            "performance_error": perf_error,
            # a distilled ViT (DeiT): the test accuracy of each head and of both (kdjax.inference.head_accuracies)
            "heads": {k: result[k] for k in HEAD_ACCURACIES if k in result} or None,
            # the torchvision / timm weights the stage started from, and the eval transform they were made for
            "weights_arch": result.get("weights_arch"), "weights_preprocess": result.get("weights_preprocess"),
            **m, "training_curves": curves,
        })
    if not rows:
        raise ValueError(f"no model of {workdir} could be reported: "
                         + "; ".join(f"{s['name']}: {s['reason']}" for s in skipped))
    num_classes = rows[0]["num_classes"]
    out = {
        "workdir": paths.absolute(workdir),
        "dataset": config["dataset"].get("name"),
        "class_names": class_names(config["dataset"], num_classes),
        # config.dataset.normalize as the run resolved it ('data': the data set's own statistics)
        "input_normalization": config["dataset"].get("normalize") or "data",
        "num_test_examples": rows[0]["num_examples"],
        "eval_batch_size": eval_batch,
        "device": compress.device_name(),
        "latency_calls": latency_calls,
        "teacher_reference": ("the teacher stage of this run (its logits: " + next(
            r["logits_source"] for r in rows if r["name"] == "teacher") + ")" if teacher is not None else
            "none: the teacher stage could not be read, so agreement and KL are null"
            if any(s["name"] == "teacher" for s in skipped) else
            "none: this run has no teacher stage, so agreement and KL are null"),
        "ece_bins": ECE_BINS,
        "source": ("Every accuracy-type figure (top-1, top-5, per-class precision/recall/F1, confusion matrix, "
                   "ROC-AUC, NLL, ECE, agreement, KL) is computed from each model's <stage>/predictions.npz "
                   "(test logits of the selected checkpoint, and labels), so anyone can recompute it; params, "
                   "FLOPs and latency from the checkpoint (kdjax.runs.load_trained_model)."),
        "jax_version": jax.__version__,
        "models": rows,
        "skipped": skipped,
    }
    plot_files = write_plots(out, os.path.join(workdir, REPORT_DIR)) if plots else {}
    out["plots"] = plot_files
    out["report_seconds"] = round(time.perf_counter() - start, 2)
    _write(os.path.join(workdir, "report.json"), json.dumps(_clean(out), indent=2))
    _write(os.path.join(workdir, "report.md"), format_markdown(out))
    return out


def _clean(x):
    """JSON-safe: NaN/inf -> null, numpy scalars -> Python."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return _none_if_nan(float(x))
    return x


def _write(path: str, text: str) -> None:
    paths.write_text(path, text if text.endswith("\n") else text + "\n")


# ----------------------------------------------------------------------------------------------
# report.md


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main_table(rep: dict) -> str:
    """The markdown table of report.md: one row per model."""
    head = ["model", "arch", "params", "non-zero", "MFLOPs/img", "top-1", "top-5", "macro F1", "weighted F1", "ROC-AUC",
            "NLL", "ECE", "agree w/ teacher", "KL(t‖m)", "ms @1", f"ms @{rep['eval_batch_size']}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rep["models"]:
        flops = r["flops_per_image"]
        cells = [r["name"], str(r["model"]), _fmt(r["params"], ","), _fmt(r["nonzero_params"], ","), _fmt(flops and flops / 1e6, ".3f"),
                 _fmt(r["top1_accuracy"], ".4f"), _fmt(r["top5_accuracy"], ".4f"), _fmt(r["macro"]["f1"], ".4f"),
                 _fmt(r["weighted"]["f1"], ".4f"), _fmt(r["roc_auc_ovr_macro"], ".4f"), _fmt(r["nll"], ".4f"),
                 _fmt(r["ece"], ".4f"), _fmt(r["teacher_agreement"], ".4f"), _fmt(r["kl_teacher_model"], ".4f"),
                 _fmt(r["latency_ms_batch1"], ".3f"), _fmt(r["latency_ms_eval_batch"], ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _normalization(name: str) -> str:
    from kdjax import data as kdata

    if name in kdata.NORMALIZATIONS:
        mean, std = kdata.NORMALIZATIONS[name]
        return f"'{name}' statistics (mean {list(mean)}, std {list(std)})"
    return "the data set's own per-channel statistics ('data')"


def format_markdown(rep: dict) -> str:
    names = rep["class_names"]
    n, c = rep["num_test_examples"], len(names)
    lines = [f"# Evaluation report: {rep['workdir']}", "",
             f"Data set: {rep['dataset']}, {n} test images, {c} classes. Device: {rep['device']}; latency: median of "
             f"{rep['latency_calls']} jitted calls of the eval forward at batch 1 and at the eval batch "
             f"({rep['eval_batch_size']}); MFLOPs/img: XLA cost analysis of that forward compiled for batch 1. "
             f"Teacher for agreement and KL (T=1, nats): {rep['teacher_reference']}. Inputs normalised with "
             f"{_normalization(rep.get('input_normalization', 'data'))}.", "",
             rep["source"], "", main_table(rep), ""]
    aucs = {r["roc_auc_classes"] for r in rep["models"]}
    lines.append(f"ROC-AUC: macro one-vs-rest over {'; '.join(sorted(aucs))}. ECE: {rep['ece_bins']} "
                 "equal-width bins of the max softmax probability. Macro/weighted means over the classes present "
                 "in the test labels.")
    for r in rep["models"]:
        if r.get("note") or not r["logits_source"].endswith("predictions.npz") or r.get("performance_error"):
            extra = "; ".join(filter(None, [r.get("note"), None if r["logits_source"].endswith("predictions.npz")
                                            else r["logits_source"], r.get("performance_error")]))
            lines.append(f"- {r['name']}: {extra}")
    for r in rep["models"]:
        if r.get("weights_arch"):
            lines.append(f"- {r['name']}: started from {r['weights_arch']} weights, made for: {r['weights_preprocess']}")
    for s in rep["skipped"]:
        lines.append(f"- not reported: {s['name']} ({s['reason']})")
    plots = rep.get("plots", {})
    if plots.get("comparison"):
        lines += ["", f"![comparison]({plots['comparison']})"]
    for r in rep["models"]:
        lines += ["", f"## {r['name']} ({r['model']}, stage {r['stage']}"
                  + (f", variant {r['variant']}" if r["variant"] else "") + ")", "",
                  f"Logits: `{r['logits_source']}`; selected epoch {r['selected_epoch']} ({r['selected_by']}). "
                  f"Top-1 {_fmt(r['top1_accuracy'], '.4f')}, NLL {_fmt(r['nll'], '.4f')}, ECE {_fmt(r['ece'], '.4f')}, "
                  f"mean confidence {_fmt(r['mean_confidence'], '.4f')}.", ""]
        if r.get("heads"):
            h = r["heads"]
            lines += [f"Two heads (DeiT): test accuracy of the class head {_fmt(h.get('test_accuracy_cls'), '.4f')}, "
                      f"the distillation head {_fmt(h.get('test_accuracy_dist'), '.4f')}, both: mean of their logits "
                      f"(the model's output) {_fmt(h.get('test_accuracy_heads_logit_mean'), '.4f')}, mean of their "
                      f"softmax {_fmt(h.get('test_accuracy_heads_softmax_mean'), '.4f')}.", ""]
        lines += ["| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        for k, pc in enumerate(r["per_class"]):
            lines.append(f"| {names[k] if k < c else k} | {_fmt(pc['precision'], '.4f')} | {_fmt(pc['recall'], '.4f')} | "
                         f"{_fmt(pc['f1'], '.4f')} | {pc['support']} |")
        for avg in ("macro", "weighted"):
            a = r[avg]
            lines.append(f"| *{avg} mean* | {a['precision']:.4f} | {a['recall']:.4f} | {a['f1']:.4f} | "
                         f"{r['num_examples']} |")
        if c <= MAX_MATRIX_CLASSES:
            lines += ["", "Confusion matrix (rows: true class, columns: predicted):", "",
                      "| true \\ pred | " + " | ".join(names) + " |", "|---|" + "---|" * c]
            for k, row in enumerate(r["confusion_matrix"]):
                lines.append(f"| {names[k]} | " + " | ".join(str(v) for v in row) + " |")
        pics = plots.get(r["name"], {})
        if pics:
            lines += [""] + [f"![{kind}]({path})" for kind, path in pics.items()]
    lines += ["", f"Report written in {rep.get('report_seconds', 0):.1f} s (jax {rep['jax_version']})."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Plots


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def write_plots(rep: dict, folder: str) -> dict:
    """The PNGs of the report; returns {model name: {kind: path relative to the workdir}, 'comparison': path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths.makedirs(folder)
    rel = lambda f: os.path.join(REPORT_DIR, f)  # noqa: E731
    names = rep["class_names"]
    out: dict[str, Any] = {}
    for r in rep["models"]:
        base = _safe(r["name"])
        files = {"confusion": f"{base}_confusion.png", "reliability": f"{base}_reliability.png"}
        _plot_confusion(plt, np.asarray(r["confusion_matrix"]), names, f"{r['name']} ({r['model']}): confusion matrix, "
                        f"top-1 {r['top1_accuracy']:.4f}", os.path.join(folder, files["confusion"]))
        _plot_reliability(plt, r, os.path.join(folder, files["reliability"]))
        curves = r["training_curves"]
        if curves["train_steps"]["epoch"] or curves["eval"]["epoch"]:
            files["curves"] = f"{base}_curves.png"
            _plot_curves(plt, r, os.path.join(folder, files["curves"]))
        out[r["name"]] = {k: rel(v) for k, v in files.items()}
    _plot_comparison(plt, rep, os.path.join(folder, "comparison.png"))
    out["comparison"] = rel("comparison.png")
    return out


def _plot_confusion(plt, cm: np.ndarray, names: list[str], title: str, path: str) -> None:
    c = len(cm)
    size = min(12, 3 + 0.45 * c)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if c <= 40:
        ax.set_xticks(range(c), names[:c], rotation=45 if max(map(len, names)) > 2 else 0, ha="right"
                      if max(map(len, names)) > 2 else "center", fontsize=8)
        ax.set_yticks(range(c), names[:c], fontsize=8)
    if c <= MAX_MATRIX_CLASSES:
        top = cm.max() or 1
        for i in range(c):
            for j in range(c):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if cm[i, j] > top / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    paths.save_figure(fig, path, dpi=100)
    plt.close(fig)


def _plot_reliability(plt, r: dict, path: str) -> None:
    bins = r["reliability"]
    fig, (ax, hx) = plt.subplots(2, 1, figsize=(4.5, 5.5), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    width = bins[0]["upper"] - bins[0]["lower"]
    centers = [(b["lower"] + b["upper"]) / 2 for b in bins]
    acc = [b["accuracy"] or 0.0 for b in bins]
    ax.bar(centers, acc, width=width, edgecolor="black", linewidth=0.5, label="accuracy")
    gap_label = next((x for b, x in zip(bins, centers) if b["count"]), None)
    for b, x in zip(bins, centers):
        if b["count"]:
            ax.bar(x, b["confidence"] - b["accuracy"], bottom=b["accuracy"], width=width, facecolor="none",
                   hatch="///", edgecolor="red", linewidth=0.5,
                   label="gap to mean confidence" if x == gap_label else None)
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8, label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=7)
    ax.set_title(f"{r['name']}: reliability, ECE {r['ece']:.4f} ({len(bins)} bins)", fontsize=9)
    hx.bar(centers, [b["count"] for b in bins], width=width, color="gray", edgecolor="black", linewidth=0.5)
    hx.set_yscale("symlog")
    hx.set_xlabel("confidence (max softmax probability)")
    hx.set_ylabel("images")
    hx.set_xlim(0, 1)
    fig.tight_layout()
    paths.save_figure(fig, path, dpi=100)
    plt.close(fig)


def _plot_curves(plt, r: dict, path: str) -> None:
    c = r["training_curves"]
    fig, (lx, ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = c["train_steps"]
    for key, values in steps.items():
        if key != "epoch":
            pts = [(e, v) for e, v in zip(steps["epoch"], values) if v is not None]
            if pts:
                lx.plot(*zip(*pts), label=key, linewidth=1, marker="." if len(pts) < 30 else None)
    lx.set_xlabel("epoch")
    lx.set_ylabel("loss (logged train steps)")
    lx.set_yscale("log" if all(v is None or v > 0 for k, vs in steps.items() if k != "epoch" for v in vs)
                  and len(steps["epoch"]) else "linear")
    if len(steps) > 1:
        lx.legend(fontsize=7)
    lx.set_title(f"{r['name']}: loss terms", fontsize=9)
    ta = c["train_accuracy"]
    if ta["epoch"]:
        ax.plot(ta["epoch"], ta["value"], marker=".", label="train (mean of logged batches)")
    for key in ("val_accuracy", "test_accuracy"):
        if key in c["eval"]:
            ax.plot(c["eval"]["epoch"], c["eval"][key], marker=".", label=key.replace("_accuracy", ""))
    if r.get("selected_epoch"):
        ax.axvline(r["selected_epoch"], color="gray", linestyle=":", linewidth=1, label="selected epoch")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax.set_title(f"{r['name']}: accuracy per epoch", fontsize=9)
    fig.tight_layout()
    paths.save_figure(fig, path, dpi=100)
    plt.close(fig)


def _plot_comparison(plt, rep: dict, path: str) -> None:
    """Horizontal bars, one row per model: top-1 accuracy, parameters, latency at batch 1 and at the
    eval batch (values written on the bars; latency on a log scale)."""
    import matplotlib.ticker

    rows = rep["models"]
    names = [r["name"] for r in rows]
    y = np.arange(len(rows))[::-1]  # first model on top
    fig, axes = plt.subplots(1, 3, figsize=(13, 1.4 + 0.45 * len(rows)), sharey=True)
    acc = [r["top1_accuracy"] for r in rows]
    axes[0].barh(y, acc, color="C0")
    low = min(acc)
    axes[0].set_xlim(max(0.0, low - 0.25 * (1 - low) - 0.02), 1.0)
    axes[0].set_xlabel("top-1 test accuracy")
    params = [r["params"] or 0 for r in rows]
    axes[1].barh(y, params, color="C1")
    axes[1].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(4))
    axes[1].xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    axes[1].set_xlabel("parameters")
    h = 0.4
    lat1 = [r["latency_ms_batch1"] or 0 for r in rows]
    latb = [r["latency_ms_eval_batch"] or 0 for r in rows]
    axes[2].barh(y + h / 2, lat1, h, label="batch 1", color="C2")
    axes[2].barh(y - h / 2, latb, h, label=f"batch {rep['eval_batch_size']}", color="C3")
    axes[2].set_xscale("log")
    axes[2].set_xlabel("latency (ms, median)")
    axes[2].legend(fontsize=7, loc="lower right")
    for ax, values, spec, offset in ((axes[0], acc, ".4f", 0), (axes[1], params, ",", 0),
                                     (axes[2], lat1, ".3f", h / 2), (axes[2], latb, ".3f", -h / 2)):
        for yi, v in zip(y, values):
            if v:
                ax.text(v, yi + offset, " " + format(v, spec), va="center", fontsize=7)
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
        ax.margins(x=0.2)
    axes[0].set_xlim(right=1.0 + 0.15 * (1.0 - axes[0].get_xlim()[0]))
    axes[0].set_yticks(y, names, fontsize=8)
    fig.suptitle(f"{rep['dataset']}: accuracy, size and latency ({rep['device']})", fontsize=9)
    fig.tight_layout()
    paths.save_figure(fig, path, dpi=100)
    plt.close(fig)
