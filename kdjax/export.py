"""Export a trained model for deployment: a `jax.export` artifact, its weights and a description.

`export_model` writes three files into a folder, for a model called `name` (e.g. 'student'):

    <name>.jaxexport   jax.export's serialised StableHLO of images -> logits: input uint8 NHWC images
                       exactly as kdjax's loaders hold them, with a symbolic batch dimension;
                       normalisation and the weights (in their stored dtype: float32, bfloat16,
                       or int8 kernels with float32 scales) are inside; output float32 logits.
                       Lowered for CPU, CUDA and TPU.
    <name>.npz         the weights: one array per flat variable path joined by '/'
                       (e.g. 'params/conv1_0/kernel', 'batch_stats/bn1_0/mean'); for a model from
                       `quantize.ptq` a quantised kernel is 'params/fc1/kernel.qvalue' (int8) and
                       'params/fc1/kernel.scale' (float32, w ~= qvalue * scale), static activation
                       scales under their own path; bfloat16 arrays as uint16 bit patterns
                       (see `quantize.storage`).
    <name>.json        input shape and dtype, class names, normalisation constants, platforms,
                       "weights_dtype" ('float32', 'int8' or 'bfloat16'), "quantization" (the
                       `quantize` mode, 'weights' or 'static', or null), "num_params" (logical
                       weights: a quantised kernel counts its int8 values, not its scales), and
                       whatever the caller adds (accuracy, run, stage, versions; these override).

Loading needs only jax, numpy and flatbuffers (which `jax.export.deserialize` imports), not kdjax
or flax::

    import jax, numpy as np
    with open("student.jaxexport", "rb") as f:
        model = jax.export.deserialize(bytearray(f.read()))
    logits = model.call(images_uint8)          # (N, H, W, C) uint8 -> (N, classes) float32

This module knows no trainer: it takes a Linen model and its variables: a float model, one with
``quantize.bf16`` variables, or the (model, variables) pair ``quantize.ptq`` returns.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp

from kdjax import data as kdata
from kdjax import models
from kdjax.models import layers
from kdjax import paths as kpaths
from kdjax import quantize

PLATFORMS = ("cpu", "cuda", "tpu")


def export_model(model, variables: dict, *, image_shape: tuple, mean, std, out_dir: str, name: str,
                 class_names=None, metadata: dict | None = None, platforms=PLATFORMS) -> dict[str, str]:
    """Writes `<name>.jaxexport`, `<name>.npz` and `<name>.json` into `out_dir`; returns their paths.

    The artifact computes ``model.apply(variables, normalize(images), train=False)`` (kdjax's own
    eval-mode forward) for uint8 images of shape (batch, *image_shape), batch symbolic. The
    weights are closed-over constants in their stored dtype (an int8 kernel stays int8 in the
    artifact). "weights_dtype" and "quantization" in the json are detected from `variables` unless
    `metadata` gives them.
    """
    # jax (not numpy) arrays: JAX folds a dtype conversion of a numpy constant at trace time, which
    # would embed int8 / bfloat16 weights as float32 constants; of a jax.Array it stays in the graph.
    variables = jax.tree.map(jnp.asarray, dict(variables))

    def logits_fn(images):
        x = kdata.normalize(images, mean, std)
        return models.apply_model(model, variables, x, train=False)[0]

    batch = jax.export.symbolic_shape("batch")[0]
    spec = jax.ShapeDtypeStruct((batch, *image_shape), jnp.uint8)
    # Source locations keep only file base names: the artifact does not carry the exporting
    # machine's directories, and its bytes do not depend on where kdjax is installed.
    previous = jax.config.jax_hlo_source_file_canonicalization_regex
    jax.config.update("jax_hlo_source_file_canonicalization_regex", ".*/")
    try:
        with layers.portable():  # no XLA:CPU fusion barriers in a program for every platform
            exported = jax.export.export(jax.jit(logits_fn), platforms=platforms)(spec)
    finally:
        jax.config.update("jax_hlo_source_file_canonicalization_regex", previous)
    paths = {ext: os.path.join(out_dir, f"{name}.{ext}") for ext in ("jaxexport", "npz", "json")}
    kpaths.write_bytes(paths["jaxexport"], exported.serialize())
    kpaths.save_npz(paths["npz"], **quantize.storage(variables))
    out = exported.out_avals[0]
    num_classes = int(out.shape[-1])
    description = {
        "input": {"shape": ["batch", *map(int, image_shape)], "dtype": "uint8", "layout": "NHWC",
                  "pixels": "as kdjax's loaders hold them (0-255)"},
        "output": {"shape": ["batch", num_classes], "dtype": str(out.dtype), "meaning": "logits"},
        "normalization": {"mean": [float(m) for m in mean], "std": [float(s) for s in std],
                          "formula": "(images / 255 - mean) / std, per channel, inside the artifact"},
        "class_names": list(class_names) if class_names is not None else [str(i) for i in range(num_classes)],
        "platforms": list(exported.platforms),
        "num_params": quantize.num_params(variables.get("params", {})),
        **quantize.describe(variables),
        "files": {k: os.path.basename(v) for k, v in paths.items()},
        "jax_version": jax.__version__,
        **(metadata or {}),
    }
    kpaths.write_text(paths["json"], json.dumps(description, indent=2, sort_keys=True))
    return paths
