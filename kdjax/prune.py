"""Pruning as an optax transform: the masks live in the optimizer state, so they are checkpointed,
resumed and restored bit-exactly with it, and pruned weights stay exactly zero under any optimizer.

    tx = prune.masked(inner_tx, prunable, method="magnitude", sparsity=0.7, scope="layer",
                      begin_step=0, end_step=1000, update_every=100)

`masked` wraps any optax transform: at mask-update steps it recomputes the masks from the current
weights, it feeds the inner optimizer only the surviving weights' gradients, and it returns, for a
pruned weight, exactly the update that makes it 0 (``-param``), whatever momentum or Adam state
the inner optimizer carries. Methods:

- ``magnitude``: unstructured; the smallest-|w| fraction `sparsity` of each kernel (``scope='layer'``)
  or of all prunable kernels together (``scope='global'``) is zeroed; exactly
  ``round(sparsity * size)`` weights per kernel for 'layer' (ties broken by position).
- ``nm``: N:M semi-structured (2:4 by default): in every group of `m` consecutive weights along
  the input dimension of a kernel (axis -2 of a dense (in, out) or conv (h, w, in, out) kernel), the
  `n` largest |w| survive.

- ``channel``: structured (`channel_prune`, at the end of this module): whole output channels or
  units are cut out, giving a genuinely smaller network (fewer parameters, FLOPs and latency),
  which the 'prune' stage then fine-tunes without masks.

Schedule (Zhu & Gupta, 2017, "To prune, or not to prune"): the sparsity at step t is
``s_f * (1 - (1 - (t - t0) / (t1 - t0)) ** 3)`` for t0 <= t <= t1, evaluated at multiples of
`update_every` after t0 and at t1 (0 before t0, s_f from t1 on); ``begin_step == end_step`` is one-shot pruning.
N:M pruning applies its pattern from `begin_step` on.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax.optim import param_paths

METHODS = ("magnitude", "nm", "channel")  # channel: structured, see channel_prune
# The config.prune fields that only some methods read (every method reads the others: method,
# epochs, include, exclude, learning_rate_scale).
METHOD_FIELDS = {"magnitude": ("sparsity", "scope", "begin_epoch", "end_epoch", "update_every"),
                 "nm": ("n", "m", "begin_epoch", "end_epoch", "update_every"),
                 "channel": ("sparsity", "criterion")}
_KEEP = np.bool_(True)  # the mask of a leaf that is not pruned
SCOPES = ("layer", "global")


class PruneState(NamedTuple):
    count: jax.Array  # optimizer steps taken
    masks: Any  # pytree like the params: bool arrays for prunable leaves, a scalar True otherwise
    inner: optax.OptState


def sparsity_at(step, target: float, begin_step: int, end_step: int, update_every: int = 1):
    """Zhu & Gupta's polynomial schedule, stepped every `update_every` steps (jnp or Python)."""
    if end_step <= begin_step:
        return jnp.where(step >= begin_step, target, 0.0)
    t = begin_step + jnp.floor((jnp.clip(step, begin_step, end_step) - begin_step) / update_every) * update_every
    t = jnp.where(step >= end_step, end_step, t)  # the last update, at end_step, reaches the target
    frac = jnp.clip((t - begin_step) / (end_step - begin_step), 0.0, 1.0)
    return jnp.where(step >= begin_step, target * (1.0 - (1.0 - frac) ** 3), 0.0)


def _keep_top(scores: jax.Array, num_pruned) -> jax.Array:
    """Mask keeping all but the `num_pruned` smallest scores (ties: the earlier position is pruned)."""
    flat = scores.reshape(-1)
    rank = jnp.empty_like(flat, dtype=jnp.int32).at[jnp.argsort(flat, stable=True)].set(
        jnp.arange(flat.size, dtype=jnp.int32))
    return (rank >= num_pruned).reshape(scores.shape)


def magnitude_masks(params, prunable, sparsity, scope: str = "layer"):
    """Masks (True = kept) zeroing the fraction `sparsity` of smallest |w| per prunable leaf
    ('layer') or over all of them ('global'). Non-prunable leaves get a scalar True."""
    leaves, treedef = jax.tree.flatten(params)
    which = jax.tree.leaves(prunable)
    if scope == "layer":
        masks = [_keep_top(jnp.abs(p), jnp.round(sparsity * p.size).astype(jnp.int32)) if w else _KEEP
                 for p, w in zip(leaves, which)]
        return jax.tree.unflatten(treedef, masks)
    chosen = [p for p, w in zip(leaves, which) if w]
    scores = jnp.concatenate([jnp.abs(p).reshape(-1) for p in chosen])
    kept = _keep_top(scores, jnp.round(sparsity * scores.size).astype(jnp.int32))
    out, start = [], 0
    for p, w in zip(leaves, which):
        if w:
            out.append(kept[start:start + p.size].reshape(p.shape))
            start += p.size
        else:
            out.append(_KEEP)
    return jax.tree.unflatten(treedef, out)


def nm_masks(params, prunable, n: int = 2, m: int = 4):
    """N:M masks: in each group of `m` along axis -2 (a kernel's input dimension), the `n` largest
    |w| are kept."""
    def one(p):
        fan_in = p.shape[-2]
        moved = jnp.moveaxis(jnp.abs(p), -2, -1)  # (..., out, in)
        groups = moved.reshape(moved.shape[:-1] + (fan_in // m, m))
        order = jnp.argsort(jnp.argsort(-groups, axis=-1, stable=True), axis=-1, stable=True)
        keep = (order < n).reshape(moved.shape)
        return jnp.moveaxis(keep, -1, -2)

    return jax.tree.map(lambda p, w: one(p) if w else _KEEP, params, prunable)


def check(params, prunable, method: str, sparsity: float, scope: str, n: int, m: int, criterion: str = "l1") -> None:
    """One-line ValueErrors for settings that cannot work on these (abstract) params."""
    if method not in METHODS:
        raise ValueError(f"unknown prune.method {method!r}; choose one of: {', '.join(METHODS)}")
    # Every setting is checked whichever method reads it: a value that can never be valid is refused
    # even where this method ignores it.
    if criterion not in CRITERIA:
        raise ValueError(f"unknown prune.criterion {criterion!r}; choose one of: {', '.join(CRITERIA)}")
    if scope not in SCOPES:
        raise ValueError(f"unknown prune.scope {scope!r}; choose one of: {', '.join(SCOPES)}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"prune.sparsity must be in [0, 1), got {sparsity}")
    if not 0 < n < m:
        raise ValueError(f"prune.n and prune.m must satisfy 0 < n < m, got {n}:{m}")
    if method == "nm":
        for path, p, w in zip(jax.tree.leaves(param_paths(params)), jax.tree.leaves(params), jax.tree.leaves(prunable)):
            if w and p.shape[-2] % m:
                raise ValueError(f"prune.m={m} does not divide the input dimension {p.shape[-2]} of {path}")


def select(params, include: str, exclude: str, *, skip: Sequence[str] = ()) -> Any:
    """Pytree of bools: the kernels (ndim >= 2) whose path matches `include` and not `exclude`
    (regexes, ``re.search``; '' = everything / nothing) and is not in `skip`."""
    inc, exc = re.compile(include or ""), re.compile(exclude) if exclude else None
    return jax.tree.map(lambda path, p: bool(np.ndim(p) >= 2 and inc.search(path) and not (exc and exc.search(path))
                                             and path not in skip), param_paths(params), params)


def masked(inner: optax.GradientTransformation, prunable, *, method: str = "magnitude", sparsity: float = 0.5,
           scope: str = "layer", n: int = 2, m: int = 4, begin_step: int = 0, end_step: int = 0,
           update_every: int = 1) -> optax.GradientTransformation:
    """`inner` with pruning (see the module docstring); `prunable` is a pytree of bools like the
    params, or a function params -> that pytree."""
    which = prunable if callable(prunable) else (lambda _: prunable)

    def masks_for(params, count):
        if method == "nm":
            return nm_masks(params, which(params), n, m)
        return magnitude_masks(params, which(params), sparsity_at(count, sparsity, begin_step, end_step, update_every),
                               scope)

    def init(params):
        ones = jax.tree.map(lambda p, w: jnp.ones(p.shape, bool) if w else jnp.asarray(_KEEP), params, which(params))
        return PruneState(jnp.zeros((), jnp.int32), ones, inner.init(params))

    def update(updates, state, params=None, **extra):
        count = state.count
        due = (count >= begin_step) & ((count <= end_step) | (count == begin_step)) & (
            ((count - begin_step) % max(update_every, 1) == 0) | (count == end_step))
        masks = jax.lax.cond(due, lambda: jax.tree.map(jnp.asarray, masks_for(params, count)), lambda: state.masks)
        prunable_ = which(params)
        hide = lambda tree: jax.tree.map(lambda w, mask, g: jnp.where(mask, g, 0) if w else g,  # noqa: E731
                                         prunable_, masks, tree)
        if "kd_grads" in extra:  # DOT's distillation gradient, masked like the gradient
            extra["kd_grads"] = hide(extra["kd_grads"])
        new_updates, inner_state = inner.update(hide(updates), state.inner, params, **extra)
        new_updates = jax.tree.map(lambda w, mask, u, p: jnp.where(mask, u, -p.astype(u.dtype)) if w else u,
                                   prunable_, masks, new_updates, params)
        return new_updates, PruneState(count + 1, masks, inner_state)

    return optax.GradientTransformationExtraArgs(init, update)


# ------------------------------------------------------------------ structured channel pruning
#
# Network surgery: unlike the masks above (which keep every tensor at full size and zero entries),
# `channel_prune` removes whole output channels of hidden layers and returns a genuinely smaller
# model (new field values) and its variables.

CRITERIA = ("l1", "bn")


def _channel_layers(model) -> tuple[list[tuple[str, str | None]], str]:
    """[(layer name, its BatchNorm's name or None)] in forward order, and the override field."""
    from kdjax.models.digits import MLP, SmallCNN  # local: keep `prune` importable without the zoo

    if isinstance(model, MLP):
        return [(f"fc{i + 1}", None) for i in range(len(model.hidden))], "hidden"
    if isinstance(model, SmallCNN):
        model.conv_widths()  # validates `widths`
        names = [f"{s + 1}_{k}" for s, (_, n) in enumerate(zip(model.channels, model.layers_per_stage))
                 for k in range(n)]
        return [(f"conv{n}", f"bn{n}") for n in names], "widths"
    raise ValueError(f"channel_prune supports only MLP and SmallCNN (models mlp, cnn_small, cnn_tiny), not "
                     f"{type(model).__name__}: residual additions and depthwise/grouped convs tie the channels of "
                     f"several layers together, which this function does not handle")


def _host(tree) -> dict:
    """A plain nested dict of fresh numpy arrays (copies: the input is never aliased)."""
    if hasattr(tree, "items"):
        return {k: _host(v) for k, v in tree.items()}
    return np.array(tree, copy=True)


def channel_prune(model, variables, *, sparsity: float, criterion: str = "l1", include: str = "",
                  exclude: str = "") -> tuple[dict, dict]:
    """Structured channel pruning: returns (model field overrides, smaller variables).

    E.g. for an MLP ``({"hidden": (128, 64)}, variables)`` or SmallCNN
    ``({"widths": (32, 16, 32, 32)}, variables)``; ``dataclasses.replace(model, **overrides)`` (or
    ``get_model(name, **kwargs, **overrides)``) is the smaller model, and with the small variables it
    computes the same function as the original with the removed channels zeroed (for SmallCNN: the
    conv's output filters and the BatchNorm's scale and bias; for MLP: the kernel columns and bias).

    - Layers: the hidden layers ('fc1', 'fc2', ... of an MLP; 'conv1_0', 'conv1_1', 'conv2_0', ...
      of a SmallCNN, the first conv included: its output channels are as removable as any other's,
      only a layer's *input* channels, the image's, are fixed). `include` / `exclude` are regexes
      (``re.search``) over those names ('' include = all, '' exclude = none). The classifier 'head' is
      never pruned (its outputs are the classes); its input rows follow the last hidden layer.
    - Per selected layer of width w, ``round(sparsity * w)`` output channels are removed (round half
      to even, as ``magnitude_masks``), at most w - 1 (at least one channel is always kept).
    - Ranking (every layer on the ORIGINAL weights, independently of the other layers' pruning):
      'l1' = the L1 norm of each output channel's filter (kernel[..., c] over all input axes);
      'bn' = |gamma| of the layer's BatchNorm (network slimming; BatchNorm models only). The lowest
      scores are removed; ties: stable sort, the earlier channel index is removed first. Surviving
      channels keep their original order.
    - Surgery: the layer's kernel output slice, its bias (if any), its BatchNorm's scale/bias and
      running mean/var, and the next layer's kernel input slice (the next conv, the next Dense, or the
      'head' rows: a SmallCNN's last conv feeds global average pooling, whose channels are the rows).
    - The overrides give every hidden width (pruned or not): ``{"hidden": (...)}`` for MLP,
      ``{"widths": (...)}`` for SmallCNN.

    Supported models: MLP and SmallCNN ('mlp', 'cnn_small', 'cnn_tiny'); anything else (ResNet, WRN,
    MobileNetV2, VGG) is a ValueError. Pure: `variables` ({'params'[, 'batch_stats']}, jax or numpy
    arrays, dict or FrozenDict) is not modified; the result is new nested dicts of numpy arrays
    holding only 'params' and 'batch_stats' (any other collection, e.g. a stale 'features', is
    dropped), dtypes preserved, with exactly the shapes of a fresh init of the smaller model."""
    layers, field = _channel_layers(model)
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float, np.number)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"channel_prune sparsity must be in [0, 1), got {sparsity!r}")
    if criterion not in CRITERIA:
        raise ValueError(f"unknown channel_prune criterion {criterion!r}; choose one of: {', '.join(CRITERIA)}")
    if criterion == "bn" and layers and layers[0][1] is None:
        raise ValueError(f"channel_prune criterion 'bn' ranks channels by BatchNorm |gamma| and {type(model).__name__} "
                         f"has no BatchNorm; use criterion 'l1'")
    names = [name for name, _ in layers]
    try:
        inc, exc = re.compile(include or ""), (re.compile(exclude) if exclude else None)
    except re.error as e:
        raise ValueError(f"channel_prune include/exclude is not a valid regex: {e}") from None
    chosen = {n for n in names if inc.search(n) and not (exc and exc.search(n))}
    if not chosen:
        raise ValueError(f"channel_prune include={include!r} exclude={exclude!r} selects no layer; the prunable "
                         f"layers of this {type(model).__name__} are: {', '.join(names) or '(none)'} "
                         f"(the classifier 'head' is never pruned)")

    if not hasattr(variables, "get") or "params" not in variables:
        raise ValueError("channel_prune needs the model's variables as {'params': ..., ['batch_stats': ...]}")
    params = _host(variables["params"])
    stats = _host(variables["batch_stats"]) if "batch_stats" in variables else None
    need = names + ["head"] + [bn for _, bn in layers if bn]
    missing = [n for n in need if n not in params]
    if missing or (layers and layers[0][1] and stats is None):
        what = f"params/{missing[0]}" if missing else "batch_stats"
        raise ValueError(f"channel_prune: the variables do not match this {type(model).__name__} (no {what})")

    # Rank every chosen layer on the original weights.
    keep: dict[str, np.ndarray] = {}
    for name, bn in layers:
        kernel = params[name]["kernel"]
        width = kernel.shape[-1]
        if name not in chosen:
            keep[name] = np.arange(width)
            continue
        if criterion == "l1":
            score = np.abs(kernel.astype(np.float64)).reshape(-1, width).sum(axis=0)
        else:
            score = np.abs(params[bn]["scale"].astype(np.float64))
        n_remove = min(int(np.round(sparsity * width)), width - 1)
        removed = np.argsort(score, kind="stable")[:n_remove]
        keep[name] = np.setdiff1d(np.arange(width), removed)  # sorted: original channel order

    # Surgery: output slices of each layer (+ its BN), input slices of the layer after it.
    following = names[1:] + ["head"]
    for (name, bn), nxt in zip(layers, following):
        k = keep[name]
        layer = params[name]
        layer["kernel"] = layer["kernel"][..., k]
        if "bias" in layer:
            layer["bias"] = layer["bias"][k]
        if bn:
            params[bn] = {key: v[k] for key, v in params[bn].items()}
            stats[bn] = {key: v[k] for key, v in stats[bn].items()}
        params[nxt]["kernel"] = params[nxt]["kernel"][..., k, :]

    out = {"params": params}
    if stats is not None:
        out["batch_stats"] = stats
    widths = tuple(int(keep[name].size) for name in names)
    return {field: widths}, out
