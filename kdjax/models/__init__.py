"""Model zoo: pure Linen modules + a name registry and small helpers.

Every model is an ``nn.Module`` with fields ``num_classes``, ``dtype`` (compute dtype; params
stay float32, logits are returned as float32) and ``bn_axis_name`` (SyncBN axis), and
``__call__(x, train=False, extra_features=())`` on NHWC float images. Intermediate features are
sown into the 'features' collection (``stage1``.., ``embedding``, ``logits``; see each model's
docstring); ``apply_model`` collects them as a flat dict. ``extra_features`` asks for the features
a model computes only on request (`layers.EXTRA_FEATURES`: 'preact' -> ``preact_stage<N>`` and
``preact_margin<N>``, 'class_map' -> ``class_map``); `requested_extras` maps the feature names a
distillation term reads to them, and the step passes them only when some term reads one.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

from .digits import MLP, SmallCNN
from .layers import EXTRA_FEATURES, DepthwiseConv, batch_norm, conv, sow_feature
from .mobilenetv2 import MobileNetV2, mobilenetv2, mobilenetv2_half
from .resnet import ResNet, cifar_resnet, resnet18, resnet34, resnet50
from .shufflenet import ShuffleNetV1, ShuffleNetV2
from .vgg import CFGS as VGG_CFGS, VGG
from .wrn import WideResNet

_p = functools.partial

MODELS: dict[str, Callable[..., nn.Module]] = {
    # digits (8x8x1)
    "mlp": MLP,
    "cnn_small": _p(SmallCNN, channels=(32, 64), layers_per_stage=(2, 2)),
    "cnn_tiny": _p(SmallCNN, channels=(16, 32), layers_per_stage=(2, 1)),
    # RepDistiller CIFAR ResNets
    **{f"resnet{d}": _p(cifar_resnet, d) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": _p(cifar_resnet, 8, (32, 64, 128, 256)),
    "resnet32x4": _p(cifar_resnet, 32, (32, 64, 128, 256)),
    # kuangliu CIFAR layouts
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "mobilenetv2": mobilenetv2,
    "mobilenetv2_half": mobilenetv2_half,
    # RepDistiller WRN / VGG-BN
    **{f"wrn_{d}_{k}": _p(WideResNet, depth=d, widen_factor=k) for d in (16, 40) for k in (1, 2)},
    **{f"vgg{d}": _p(VGG, cfg=cfg) for d, cfg in VGG_CFGS.items()},
    # RepDistiller ShuffleV1 / ShuffleV2 (1x1 stem, CIFAR)
    "shufflev1": ShuffleNetV1,
    "shufflev2": ShuffleNetV2,
    # torchvision ImageNet layouts (7x7 stride-2 stem + max-pool): the streamed ImageNet recipes
    "resnet18_imagenet": _p(resnet18, stem="imagenet"),
    "resnet34_imagenet": _p(resnet34, stem="imagenet"),
}


# The classification layer of every model above, by variable path ('head/kernel', 'fc/bias', ...):
# the default head of discriminative fine-tuning and never pruned.
CLASSIFIER = r"^(head|fc|classifier)/"


def get_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Construct model ``name`` (see ``MODELS``); kwargs go to the module (dtype, bn_axis_name,
    depthwise_impl, hidden, ...)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(sorted(MODELS))}")
    return MODELS[name](num_classes=num_classes, **kwargs)


def requested_extras(names) -> tuple[str, ...]:
    """The `EXTRA_FEATURES` groups that feature names (or patterns) such as 'preact_stage*' or
    'class_map' belong to, in `EXTRA_FEATURES` order; () for ordinary features."""
    names = list(names)
    groups = {"preact": lambda n: n.startswith("preact_"), "class_map": lambda n: n.startswith("class_map")}
    return tuple(g for g in EXTRA_FEATURES if any(groups[g](n) for n in names))


def apply_model(model: nn.Module, variables, x, *, train: bool, mutable_stats: bool | None = None, rng=None,
                extra: tuple[str, ...] = ()):
    """Run ``model`` and collect its sown features.

    Returns ``(logits, features, new_batch_stats)``: float32 logits, a flat dict
    name -> array of the features, and the updated batch_stats when ``train`` and the model has
    batch_stats (else None). ``mutable_stats=False`` in train mode still normalises with batch
    statistics but discards the running-average update (returns None). ``rng``: the key of the
    models' dropout (train mode). ``extra``: on-request feature groups (`EXTRA_FEATURES`, e.g.
    ``requested_extras(['class_map'])``), passed to the model as ``extra_features`` only when not
    empty, so the default call is the plain forward pass.

    ``features`` is built in forward order (hidden*/stage* by number, embedding, logits), but
    note that a dict passing through a JAX transform (jit, eval_shape, ...) comes back with
    sorted keys; use ``feature_names`` for the canonical order."""
    has_stats = "batch_stats" in variables
    if mutable_stats is None:
        mutable_stats = train and has_stats
    # Drop anything but params / batch_stats (e.g. a stale 'features' collection) so sown
    # values are fresh.
    variables = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
    mutable = ["features"] + (["batch_stats"] if train and has_stats else [])
    kwargs = {"extra_features": tuple(extra)} if extra else {}
    logits, state = model.apply(variables, x, train=train, mutable=mutable,
                                rngs={"dropout": rng} if rng is not None else None, **kwargs)
    flat = _flatten(state.get("features", {}))
    features = {k: flat[k] for k in sorted(flat, key=_order)}
    new_stats = state.get("batch_stats") if (train and has_stats and mutable_stats) else None
    return logits.astype(jnp.float32), features, new_stats


def _order(name: str):
    """Forward order: numbered features (hidden1, stage1, stage2, ...) by number, then
    anything else by name, then embedding, then logits."""
    if name == "logits":
        return (3, "", 0)
    if name == "embedding":
        return (2, "", 0)
    stem = name.rstrip("0123456789")
    if stem != name:
        return (0, stem, int(name[len(stem):]))
    return (1, name, 0)


def _flatten(tree, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) or hasattr(v, "items"):
            out.update(_flatten(v, name + "/"))
        elif isinstance(v, tuple):  # default sow reduce (e.g. a user-added sow)
            out[name] = v[-1]
        else:
            out[name] = v
    return out


def _full_shape(input_shape) -> tuple:
    input_shape = tuple(input_shape)
    return input_shape if len(input_shape) == 4 else (1, *input_shape)


def feature_shapes(model: nn.Module, input_shape, extra: tuple[str, ...] = ()) -> dict[str, tuple]:
    """name -> shape of every sown feature for inputs of ``input_shape`` (NHWC; a 3-tuple gets
    batch 1), in forward order; ``extra``: also the on-request groups (`EXTRA_FEATURES`). Uses
    ``jax.eval_shape``: no compute."""
    x = jax.ShapeDtypeStruct(_full_shape(input_shape), jnp.float32)

    def run(x):
        variables = model.init(jax.random.key(0), x, train=False)
        return apply_model(model, variables, x, train=False, extra=extra)[1]

    shapes = jax.eval_shape(run, x)
    return {k: tuple(shapes[k].shape) for k in sorted(shapes, key=_order)}


def feature_names(model: nn.Module, input_shape, extra: tuple[str, ...] = ()) -> list[str]:
    """Names of the features ``model`` sows, in forward order (no compute); ``extra`` as in
    `feature_shapes`."""
    return list(feature_shapes(model, input_shape, extra))


def init_model(model: nn.Module, rng, input_shape) -> dict:
    """``model.init`` on zeros of ``input_shape`` (eval mode): {'params', ['batch_stats']}."""
    return dict(model.init(rng, jnp.zeros(_full_shape(input_shape), jnp.float32), train=False))


def param_shapes(model: nn.Module, input_shape):
    """Abstract variables (ShapeDtypeStructs) of ``model`` via ``jax.eval_shape``."""
    return jax.eval_shape(lambda: init_model(model, jax.random.key(0), input_shape))


def num_params(params) -> int:
    """Total number of scalars in a params pytree (works on ShapeDtypeStructs too)."""
    return int(sum(int(x.size) for x in jax.tree_util.tree_leaves(params)))


__all__ = [
    "MODELS", "CLASSIFIER", "EXTRA_FEATURES", "get_model", "apply_model", "requested_extras", "feature_names", "feature_shapes", "num_params",
    "init_model", "param_shapes", "MLP", "SmallCNN", "ResNet", "MobileNetV2", "WideResNet", "VGG",
    "DepthwiseConv", "batch_norm", "conv", "sow_feature", "cifar_resnet", "resnet18", "resnet34",
    "mobilenetv2", "mobilenetv2_half", "resnet50", "ShuffleNetV1", "ShuffleNetV2",
]
