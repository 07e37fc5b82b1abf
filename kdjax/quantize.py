"""int8 quantisation of a trained Linen model with Qwix: post-training (PTQ) and quantisation-aware
training (QAT), plus a bfloat16 storage row and the flat arrays the exported `.npz` holds.

Two modes (``MODES``):

    weights   int8 weights (symmetric, per output channel: scale = max|w| over the input axes / 127,
              q = round(w / scale) in [-127, 127]; exact zeros stay zero), float activations. Dense layers only: Qwix 0.1.8 cannot
              quantise a convolution's weights without its input activations (`check` says so).
    static    int8 weights as above and int8 input activations of every quantised layer, with one
              static scale per layer calibrated on a few float batches (Qwix's absmax calibration:
              scale = the mean over calibration samples of each sample's max|x|, / 127; inputs
              beyond 127 * scale clip).
              Dense and convolution layers; the artifact holds int8 x int8 dots / convolutions.

A layer is a module that owns a 'kernel' (`layers`); `exclude` is a regex searched in its path
('conv', '^head$', 'fc1|head') and leaves matching layers in float. Biases, BatchNorm and every op
outside the quantised layers stay float32.

Qwix calls (qwix 0.1.8):

    PTQ      ``qwix.quantize_model(model, qwix.PtqProvider(rules))``; the abstract quantised variables
             from ``jax.eval_shape(qmodel.init)``; ``qwix.quantize_params(params, abstract, quant_stats)``.
             A quantised kernel becomes ``WithAux(QArray(qvalue int8, scale float32))`` in the params.
    static   calibration runs ``qwix.quantize_model(model, qwix.QtProvider(rules))`` with
             ``act_static_scale=True`` over the calibration batches, accumulating its 'quant_stats'
             collection, which ``quantize_params`` turns into per-layer activation scales
             ('<layer>/dot_general0_lhs_scale', '<layer>/conv_general_dilated0_lhs_scale').
    QAT      ``qwix.quantize_model(model, qwix.QtProvider(rules))``: fake quantisation in the forward
             pass, straight-through gradients, the same variables as the float model. Activations
             use dynamic (per-example) ranges during training; `ptq` of the trained float variables
             then calibrates the static scales.

Rules are ``qwix.QtRule``s: Qwix takes the first rule whose ``module_path`` regex fully matches a
module's path, so `exclude` is a leading rule ``.*(?:exclude).*`` without a quantised type, then
``.*`` with the mode's types. Calibration is ``absmax`` scaled by 127.5 / 127 (``ABSMAX_127``):
Qwix's own int8 bound is 127.5 (scale = absmax / 127.5, values in [-128, 127]); this gives the
usual restricted-range symmetric int8 that deployment runtimes expect.

Limits: int8 only (Qwix also has int4 / fp8; not exposed); no per-layer mode; weights-only
convolutions are refused by Qwix (use 'static' or exclude them); static activation scales are
per layer (per tensor), not per channel; QAT's activation fake-quantisation is dynamic-range, so a
QAT model's eval logits differ slightly from the converted static model's. The quantised model is
a Qwix-wrapped Linen module: `models.apply_model` runs it, on any backend, but the int8 arithmetic
only pays off where XLA has int8 kernels (TPU, GPU). This module imports qwix only when a function
needs it; `check_settings`, `storage`, `stored_bytes`, `num_params`, `describe` and `bf16` never do.

Calibration runs eagerly, batch by batch: under ``jax.jit`` Qwix 0.1.8's statistics update leaks a
tracer out of its convolution's ``custom_vjp``. Use a few batches, not a data set.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import DictKey, GetAttrKey, SequenceKey

from kdjax import models

MODES = ("weights", "static")


def _qwix():
    import qwix  # local: kdjax must import without pulling in qwix

    return qwix


# ------------------------------------------------------------------------------------- validation

def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown quant.mode {mode!r}; choose one of: {', '.join(MODES)}")


def _compile_exclude(exclude: str):
    if not exclude:
        return None
    try:
        re.compile(f".*(?:{exclude}).*")  # the form Qwix's rule uses (rejects e.g. a mid-pattern '(?i)')
        return re.compile(exclude)
    except re.error as e:
        raise ValueError(f"quant.exclude={exclude!r} is not a valid regular expression: {e}") from None


def check_settings(mode: str, exclude: str = "") -> None:
    """The model-free part of `check`: a one-line ValueError for an unknown mode or an `exclude`
    that is not a valid regex (for validating a config before anything is built)."""
    _check_mode(mode)
    _compile_exclude(exclude)


def _full_shape(input_shape) -> tuple:
    input_shape = tuple(int(d) for d in input_shape)
    return input_shape if len(input_shape) == 4 else (1, *input_shape)


def _kernels(model, x) -> dict[str, tuple]:
    """Module path -> kernel shape of every module owning a 'kernel', in creation (forward) order."""
    found: dict[str, tuple] = {}

    def walk(tree, prefix):
        for k, v in tree.items():
            path = f"{prefix}{k}"
            if hasattr(v, "items"):
                walk(v, path + "/")
            elif k == "kernel":
                found[prefix.rstrip("/")] = tuple(v.shape)

    def run(x):
        # Walked inside the trace: a dict returned through eval_shape comes back key-sorted.
        walk(model.init(jax.random.key(0), x, train=False)["params"], "")
        return 0

    jax.eval_shape(run, x)
    return found


def layers(model, input_shape) -> list[str]:
    """The quantisable module paths of `model` (those owning a 'kernel'), in forward order, e.g.
    ['conv1_0', 'conv1_1', 'conv2_0', 'conv2_1', 'head']. No compute (``jax.eval_shape``)."""
    x = jax.ShapeDtypeStruct(_full_shape(input_shape), jnp.float32)
    return list(_kernels(model, x))


# Qwix's int8 absmax scale is absmax / 127.5 (values round into [-128, 127]); scaling its absmax
# by 127.5 / 127 gives the usual restricted-range symmetric int8: scale = absmax / 127, q in [-127, 127].
ABSMAX_127 = f"absmax,{127.5 / 127!r}"


def _rules(mode: str, exclude: str, *, training: bool = False, only: str = ".*") -> list:
    """Qwix rules: `exclude` (if any) first without a quantised type, then modules matching `only`."""
    qwix = _qwix()
    rules = [qwix.QtRule(module_path=f".*(?:{exclude}).*")] if exclude else []
    if mode == "weights":
        rules.append(qwix.QtRule(module_path=only, weight_qtype="int8", weight_calibration_method=ABSMAX_127))
    else:
        rules.append(qwix.QtRule(module_path=only, weight_qtype="int8", act_qtype="int8",
                                 act_static_scale=not training, weight_calibration_method=ABSMAX_127,
                                 act_calibration_method=ABSMAX_127))
    return rules


def _trace(model, x, rules, mode: str):
    """Abstract variables of the PTQ model (and, for 'static', a trace of the calibration model)."""
    qwix = _qwix()
    if mode == "static":
        qt = qwix.quantize_model(model, qwix.QtProvider(rules))
        jax.eval_shape(lambda x: qt.init(jax.random.key(0), x, train=False), x)
    qm = qwix.quantize_model(model, qwix.PtqProvider(rules))
    return qm, jax.eval_shape(lambda x: qm.init(jax.random.key(0), x, train=False), x)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _suggest_exclude(names, kernels) -> str:
    convs = [n for n in names if len(kernels[n]) > 2]
    if convs and all("conv" in n for n in convs) and not any("conv" in n for n in names if n not in convs):
        return "conv"
    return "^(" + "|".join(re.escape(n) for n in convs) + ")$"


def _diagnose(model, x, mode, kept, kernels, error) -> ValueError:
    """Traces each kept layer's rule alone to name the first layer Qwix refuses."""
    for name in kept:
        try:
            _trace(model, x, _rules(mode, "", only=re.escape(name)), mode)
        except Exception as e:  # noqa: BLE001 - any qwix refusal
            if mode == "weights" and len(kernels[name]) > 2:
                return ValueError(
                    f"qwix cannot quantise the weights of convolution {name} alone (it needs int8 "
                    f"activations too): use quant.mode=static, or "
                    f"quant.exclude={_suggest_exclude(list(kernels), kernels)!r}")
            return ValueError(f"qwix cannot quantise layer {name} in mode {mode!r} ({_first_line(e)}): "
                              f"exclude it with quant.exclude")
    return ValueError(f"qwix cannot quantise this model in mode {mode!r}: {_first_line(error)}")


def _prepare(model, x, mode: str, exclude: str):
    """Validates mode / exclude / layers and traces the PTQ model: (rules, qmodel, abstract)."""
    _check_mode(mode)
    rx = _compile_exclude(exclude)
    kernels = _kernels(model, x)
    names = list(kernels)
    kept = [n for n in names if not (rx and rx.search(n))]
    if not names:
        raise ValueError("the model has no layer with a 'kernel' to quantise")
    if not kept:
        raise ValueError(f"quant.exclude={exclude!r} leaves no layer to quantise (layers: {', '.join(names)})")
    rules = _rules(mode, exclude)
    try:
        qm, abstract = _trace(model, x, rules, mode)
    except Exception as e:  # noqa: BLE001 - turned into one line naming the layer
        raise _diagnose(model, x, mode, kept, kernels, e) from None
    return rules, qm, abstract


def check(model, input_shape, mode: str, exclude: str = "") -> None:
    """Raises a one-line ValueError if `model` cannot be quantised in `mode` (see ``MODES``) with
    `exclude`: an unknown mode, an invalid regex, an exclude that leaves no layer, or a layer Qwix
    refuses (found by tracing Qwix itself with ``jax.eval_shape``: no compute)."""
    x = jax.ShapeDtypeStruct(_full_shape(input_shape), jnp.float32)
    _prepare(model, x, mode, exclude)


# -------------------------------------------------------------------------------------------- PTQ

def _calibrate(model, variables, rules, batches):
    """Qwix's 'quant_stats' accumulated over `batches` (eval mode, one jitted step)."""
    qwix = _qwix()
    qt = qwix.quantize_model(model, qwix.QtProvider(rules))
    # jax arrays, not numpy: Qwix tells weights from activations by type, and would calibrate a
    # numpy kernel as an activation (then quantize_params fails).
    base = jax.tree.map(jnp.asarray, {k: v for k, v in variables.items() if k in ("params", "batch_stats")})

    def stats_of(base, stats, x):
        extra = {"quant_stats": stats} if stats is not None else {}
        return qt.apply({**base, **extra}, x, train=False, mutable=["quant_stats", "features"])[1]["quant_stats"]

    # Eager, batch by batch: under jax.jit Qwix's stat update leaks a tracer out of its
    # convolution's custom_vjp (qwix 0.1.8).
    stats = None
    for xb in batches:
        stats = stats_of(base, stats, xb)
    return jax.device_get(stats)


def ptq(model, variables: dict, mode: str, calibration=(), exclude: str = "", *, input_shape=None):
    """Post-training int8 quantisation: returns ``(quantised Linen model, its variables)``.

    Kernels become int8 QArrays with per-output-channel float32 scales; in mode 'static' each
    quantised layer also gets an int8 activation scale calibrated on `calibration` (an iterable of
    float NHWC batches, normalised like training inputs; required). batch_stats are unchanged.
    The model traces on `input_shape` (NHWC, a 3-tuple gets batch 1) or, if not given, the first
    calibration batch's shape. Run it with ``models.apply_model(qmodel, qvariables, x, train=False)``.
    """
    _check_mode(mode)
    batches = [jnp.asarray(b, jnp.float32) for b in calibration]
    if mode == "static" and not batches:
        raise ValueError("quant.mode=static needs calibration batches to set the activation scales; none given")
    if input_shape is not None:
        x = jax.ShapeDtypeStruct(_full_shape(input_shape), jnp.float32)
    elif batches:
        x = jax.ShapeDtypeStruct(batches[0].shape, jnp.float32)
    else:
        raise ValueError("ptq needs input_shape (or a calibration batch) to trace the model")
    rules, qm, abstract = _prepare(model, x, mode, exclude)
    params = jax.tree.map(jnp.asarray, variables["params"])
    stats = _calibrate(model, variables, rules, batches) if mode == "static" else {}
    qparams = _qwix().quantize_params(params, abstract["params"], stats)
    return qm, {**variables, "params": qparams}


def qat_model(model, mode: str, exclude: str = ""):
    """The model with int8 fake quantisation (straight-through gradients) for QAT: weights in mode
    'weights', weights and activations (dynamic ranges while training) in mode 'static'. It takes
    the float model's variables unchanged. Call `check` first (this does not trace the model);
    after training, ``ptq(model, trained_variables, mode, calibration)`` converts."""
    check_settings(mode, exclude)
    qwix = _qwix()
    return qwix.quantize_model(model, qwix.QtProvider(_rules(mode, exclude, training=True)))


# --------------------------------------------------------------------------- storage and bf16

def _flat(variables) -> list[tuple[tuple, object]]:
    return jax.tree_util.tree_flatten_with_path(variables)[0]


def _name(path) -> str:
    """'params/fc1/bias'; a quantised kernel's parts 'params/fc1/kernel.qvalue' / '.scale'; the
    Qwix wrapper's own '.array' level is dropped ('params/conv1_0/conv_general_dilated0_lhs_scale')."""
    out = ""
    for k in path:
        if isinstance(k, DictKey):
            out += ("/" if out else "") + str(k.key)
        elif isinstance(k, SequenceKey):
            out += ("/" if out else "") + str(k.idx)
        elif isinstance(k, GetAttrKey):
            out += "" if k.name == "array" else f".{k.name}"
        else:
            out += ("/" if out else "") + str(k)
    return out


def _is_plain(path) -> bool:
    return not any(isinstance(k, GetAttrKey) for k in path)


def _is_qvalue(path) -> bool:
    return bool(path) and isinstance(path[-1], GetAttrKey) and path[-1].name == "qvalue"


def storage(variables) -> dict[str, np.ndarray]:
    """Flat name -> numpy array, as the exported `.npz` holds the variables: ordinary leaves as
    'params/fc1/bias' (identical to ``optim.flat_paths`` for float variables); a quantised kernel as
    'params/fc1/kernel.qvalue' (int8) and 'params/fc1/kernel.scale' (float32, broadcastable to it;
    w ~= qvalue * scale), with no float copy; static activation scales under their own path
    ('params/head/dot_general0_lhs_scale'). bfloat16 leaves are stored as their uint16 bit patterns
    (npz has no bfloat16; read them back with ``.view(ml_dtypes.bfloat16)``)."""
    out = {}
    for path, leaf in _flat(variables):
        a = np.asarray(leaf)
        if a.dtype == jnp.bfloat16:
            a = a.view(np.uint16)
        out[_name(path)] = a
    return out


def stored_bytes(variables) -> int:
    """Bytes of the arrays of ``storage(variables)`` (what the `.npz` holds, before zip headers)."""
    return int(sum(a.nbytes for a in storage(variables).values()))


def num_params(params) -> int:
    """Logical weights in a (possibly quantised) params tree: ordinary leaves, plus each quantised
    kernel's qvalue size; quantisation scales are not counted. Equals ``models.num_params`` of the
    float params."""
    return int(sum(int(np.size(leaf)) for path, leaf in _flat(params) if _is_plain(path) or _is_qvalue(path)))


def describe(variables) -> dict:
    """{'weights_dtype': 'float32' | 'int8' | 'bfloat16', 'quantization': 'weights' | 'static' | None}
    of a variables (or params) tree, from its leaves: int8 if any kernel is quantised (static if it
    also holds activation scales), bfloat16 if the float params are, else float32."""
    flat = _flat(variables)
    if any(_is_qvalue(p) for p, _ in flat):
        # an activation scale is a Qwix WithAux around a plain array: its path ends in '.array'
        static = any(isinstance(p[-1], GetAttrKey) and p[-1].name == "array" for p, _ in flat)
        return {"weights_dtype": "int8", "quantization": "static" if static else "weights"}
    params = variables.get("params", variables) if hasattr(variables, "get") else variables
    dtypes = {np.asarray(leaf).dtype for leaf in jax.tree.leaves(params)}
    return {"weights_dtype": "bfloat16" if jnp.dtype(jnp.bfloat16) in dtypes else "float32", "quantization": None}


def bf16(variables) -> dict:
    """The variables with float params cast to bfloat16 (half the bytes; the model still computes in
    its own dtype); batch_stats and other collections unchanged (float32). Already-quantised
    kernels and scales are left as they are."""

    def cast(path, leaf):
        if _is_plain(path) and jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
            return jnp.asarray(leaf, jnp.bfloat16)
        return leaf

    return {**variables, "params": jax.tree_util.tree_map_with_path(cast, variables["params"])}
