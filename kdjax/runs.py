"""The run folder: what identifies a run, how its files are read and written, and reading a
finished stage back (for a teacher, transfer learning, compression, export and the report).

    <workdir>/config.json              the resolved config (its `run_identity` decides resume vs refuse)
    <workdir>/summary.json             one entry per finished stage
    <workdir>/<stage>/checkpoints/     Orbax checkpoints (kdjax.checkpoint)
    <workdir>/<stage>/result.json      the finished stage's figures
    <workdir>/<stage>/model.json       the architecture, where the stage changed it (channel pruning)
    <workdir>/<stage>/predictions.npz  the selected model's test logits and labels
    <workdir>/metrics.jsonl            every logged step and evaluation (kdjax.logs)

Every JSON file a run writes goes through `write_json` (atomic, process 0 only) and is read
through `read_json`.

The workdir may be a bucket (``gs://bucket/run``): its files go through `kdjax.paths`. On GCS
there are no folders and no atomic rename, but a single object write is atomic, so `write_json`
writes the object directly there (tmp + rename locally).
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from kdjax import checkpoint as kckpt
from kdjax import data as kdata
from kdjax import distill, models, optim
from kdjax import step as kstep
from kdjax.paths import absolute, check_remote, exists, is_remote, makedirs, open_file, write_text


def is_main() -> bool:
    """Whether this is the process that writes the run folder (process 0)."""
    return jax.process_index() == 0


def write_json(path: str, obj: Any) -> None:
    """Writes `obj` as JSON to `path` (process 0 only), atomically: a reader never sees half a file."""
    if is_main():
        write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def read_json(path: str, default=None):
    """The JSON object in `path`, or `default` if there is no such file."""
    if not exists(path):
        return default
    with open_file(path) as f:
        return json.load(f)


def agree(what: str, value: int, where: str) -> None:
    """Checks that every process sees the same `value` (a bool, or e.g. the latest checkpoint step
    with -1 for none) in `where`; raises a one-line ValueError otherwise. Processes that do not share the
    workdir would otherwise restore different states and diverge, or wait for each other forever.
    Call it right after reading, before anything is written (it is a collective)."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    values = [int(v) for v in np.asarray(multihost_utils.process_allgather(np.int64(value))).reshape(-1)]
    if len(set(values)) > 1:
        show = (lambda v: "yes" if v else "no") if isinstance(value, bool) else (lambda v: "none" if v < 0 else v)
        seen = ", ".join(f"process {i}: {show(v)}" for i, v in enumerate(values))
        raise ValueError(f"the processes see different {what} in {where} ({seen}); every process must read and "
                         "write the same workdir (a shared filesystem): rerun with a --workdir they all share")


# Fields that do not change what a run computes: where it runs and with how many devices, how
# often it logs and saves, where the data and caches live. They are left out of a run's identity,
# so changing them neither moves the default workdir nor blocks a resume (e.g. on another machine).
RUNTIME_FIELDS = ("compile_cache_dir", "log", "log_every_steps", "throughput_batch", "eval_batch_size", "parallel",
                  "num_devices", "checkpoint", "dataset.data_dir", "dataset.manual_dir", "dataset.download",
                  "distill.cache_teacher", "distill.cache_dir")


def flatten_dict(tree: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1} (empty sub-dicts stay as values)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flatten_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_identity(config) -> dict:
    """What determines a run's results: the flattened config ('a.b' -> value) without
    `RUNTIME_FIELDS`, without the sub-dicts of distillation methods the run does not use (so
    adding a method to kdjax changes no existing run's identity) and without an unresolved
    dataset.normalize (''). `config`: a ConfigDict or the
    plain dict of a saved config.json."""
    if not isinstance(config, dict):
        config = json.loads(config.to_json_best_effort(sort_keys=True))
    used = set(distill.method_names(config["distill"]["method"]))

    def kept(key: str) -> bool:
        if any(key == f or key.startswith(f + ".") for f in RUNTIME_FIELDS):
            return False
        parts = key.split(".")
        return not (parts[0] == "distill" and len(parts) > 2 and parts[1] in distill.METHODS and parts[1] not in used)

    # dataset.normalize '' is resolved from the weights fields (config.resolve_normalization) and
    # saved resolved: only a name given is compared
    return {k: v for k, v in flatten_dict(config).items() if kept(k) and not (k == "dataset.normalize" and not v)}


def prepare_workdir(config, workdir: str, overwrite: bool, identity=run_identity) -> None:
    """Creates `workdir` or checks that it holds a run of this very config (then it resumes).

    Configs are compared by `identity` (`run_identity`: an image run's). A field that exists on one side only (added to or
    removed from kdjax since the run started) does not block a resume; it is logged. A workdir
    holding another config is refused; with `overwrite` it is renamed aside to
    `<workdir>.replaced-<time>` (never deleted) and a fresh run starts.
    """
    check_remote(workdir)
    path = os.path.join(workdir, "config.json")
    resolved = json.loads(config.to_json_best_effort(sort_keys=True))
    saved = read_json(path)
    agree("answers to 'is there a run (config.json)?'", saved is not None, workdir)
    if saved is not None:
        old, new = identity(saved), identity(resolved)
        changed = sorted(k for k in set(old) & set(new) if old[k] != new[k])
        if changed and not overwrite:
            raise ValueError(
                f"workdir {workdir} holds a run with a different config (differs in: {', '.join(changed)}); "
                "rerun with the same config to resume, choose a new --workdir, or pass --overwrite "
                "(which moves the old run aside)"
            )
        if changed and is_remote(workdir):
            raise ValueError(f"workdir {workdir} holds a run with a different config (differs in: {', '.join(changed)}) "
                             "and --overwrite cannot move a bucket's run aside (GCS has no rename); choose a new "
                             "--workdir or delete the old run (gcloud storage rm -r)")
        if changed and is_main():
            aside = f"{workdir.rstrip('/')}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
            os.rename(workdir, aside)
            logging.warning("moved the previous run in %s (config differed in %s) to %s", workdir, ", ".join(changed), aside)
        elif set(old) ^ set(new):
            logging.warning("resuming %s: fields new or gone since it started (not compared): %s", workdir,
                            ", ".join(sorted(set(old) ^ set(new))))
    if is_main():
        makedirs(workdir)
    write_json(path, resolved)
    if jax.process_count() > 1:  # the others read the workdir only once process 0 has prepared it
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("kdjax_prepare_workdir")


def read_stage_variables(run_dir: str, role: str) -> tuple[dict, dict, str, int]:
    """(variables, saved config, checkpoint dir, step) of the selected checkpoint of stage `role` of
    an earlier run, as saved (host arrays). One-line ValueErrors for a missing or corrupt run."""
    check_remote(run_dir)
    src = absolute(run_dir)
    saved = read_json(os.path.join(src, "config.json"))
    if saved is None:
        raise ValueError(f"{src} is not a kdjax run directory (no config.json)")
    ckpt_dir = os.path.join(src, role, "checkpoints")
    if not (exists(ckpt_dir) if is_remote(ckpt_dir) else os.path.isdir(ckpt_dir)):  # checked first: orbax would create the folder in that run
        raise ValueError(f"no {role} checkpoint in {ckpt_dir}")
    ckpts = kckpt.StageCheckpoints(ckpt_dir)
    latest = ckpts.latest_step()
    if latest is None:
        ckpts.close()
        raise ValueError(f"no {role} checkpoint in {ckpt_dir}")
    meta = ckpts.restore_meta(latest)
    try:
        ckpts.check_selected(meta, role)
    except ValueError:
        ckpts.close()
        raise
    step = meta.get("best_step") or latest
    try:
        state, _ = ckpts.restore(step)  # as saved; the callers check it against an architecture
    except Exception as e:  # orbax raises many types for truncated or corrupt files
        raise ValueError(f"cannot read the {role} checkpoint {ckpt_dir}/{step}: it is corrupt or incomplete "
                         f"({type(e).__name__}); retrain it or point at another run") from e
    finally:
        ckpts.close()
    return {"params": state["params"]["student"], **state["model_state"]["student"]}, saved, ckpt_dir, step


def load_trained_model(run_dir: str, role: str, dataset: kdata.Dataset, dtype) -> tuple[Any, dict, dict]:
    """A model trained by an earlier run: (Linen model, variables, result dict).

    The architecture comes from that run's config.json, or from ``<role>/model.json`` where the
    stage changed it (channel pruning); the variables from the selected checkpoint of its `role`
    stage (e.g. 'teacher', or 'student' for born-again self-distillation). A 'qat' stage gives the
    float model with its quantisation-aware weights (kdjax.quantize.ptq converts them to int8).
    """
    variables, saved, ckpt_dir, step = read_stage_variables(run_dir, role)
    src = absolute(run_dir)
    model_cfg = read_json(os.path.join(src, role, "model.json")) or saved["teacher" if role == "teacher" else "student"]
    model = models.get_model(model_cfg["model"], num_classes=dataset.num_classes, dtype=dtype,
                             bn_axis_name=kstep.AXIS,
                             **{k: tuple(v) if isinstance(v, list) else v for k, v in (model_cfg.get("kwargs") or {}).items()})
    expected = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
                              jnp.zeros((1,) + dataset.image_shape))
    shapes = lambda tree: jax.tree.map(lambda a: tuple(a.shape), dict(tree))  # noqa: E731
    if shapes(variables) != shapes(expected):
        raise ValueError(f"the {role} checkpoint in {ckpt_dir} does not fit a {model_cfg['model']} for "
                         f"{dataset.name} ({dataset.num_classes} classes, {dataset.image_shape} images)")
    logging.info("%s: reusing %s (%s, step %d), not retraining", role, src, model_cfg["model"], step)
    result = read_json(os.path.join(src, role, "result.json")) or {
        "model": model_cfg["model"], "num_params": models.num_params(variables["params"])}
    return model, variables, dict(result, reused_from=src, reused_role=role)


def transfer_variables(fresh: dict, source: dict, reinit: str = "", where: str = "the source run") -> dict:
    """`fresh` variables with every entry taken from `source` by path ('conv1_0/kernel',
    'bn1_0/mean', ...), except those whose path matches the regex `reinit` (kept fresh, e.g. a new
    classification head: 'head'). Anything else that does not match in path and shape is a
    one-line ValueError listing the paths."""
    pattern = re.compile(reinit) if reinit else None
    flat_fresh = optim.flat_paths(fresh)
    flat_src = optim.flat_paths(source)
    reinit_paths = {k for k in flat_fresh if pattern and pattern.search(k.split("/", 1)[1])}
    shape = lambda a: tuple(a.shape)  # noqa: E731  (arrays or jax.ShapeDtypeStructs)
    problems = [f"{k} {shape(flat_fresh[k])} vs {shape(flat_src[k]) if k in flat_src else 'missing'}"
                for k in sorted(flat_fresh) if k not in reinit_paths
                and (k not in flat_src or shape(flat_src[k]) != shape(flat_fresh[k]))]
    unused = sorted(k for k in flat_src if k not in flat_fresh)
    if problems or unused:
        listed = "; ".join(problems[:6] + [f"{k} (not in this model)" for k in unused[:6]])
        raise ValueError(f"cannot initialise from {where}: {len(problems) + len(unused)} variable(s) do not match "
                         f"({listed}); re-initialise them with --config.init.reinit=<regex>, e.g. 'head'")
    return jax.tree.unflatten(jax.tree.structure(fresh),
                              [flat_fresh[k] if k in reinit_paths else flat_src[k] for k in flat_fresh])
