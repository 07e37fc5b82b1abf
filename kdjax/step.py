"""The distillation train step and eval step, written once per device, wrapped two ways.

The per-device functions use `axis_name='data'` collectives (gradients, BatchNorm statistics and
metrics are averaged over devices; BatchNorm in the models is SyncBN over the same axis). They are
wrapped by `DataParallel` either as ``jax.jit(jax.shard_map(...))`` over a ("data",) mesh (batch
sharded, state replicated) or by ``jax.pmap``: both give the same numbers as one device.

Device-count invariance: augmentation keys are derived from each example's position in the
*global* batch, BatchNorm statistics are global, and the loss is a mean over the local batch whose
gradient is then averaged over devices = the gradient of the global mean. The batch-level terms
(RKD, PKT, CC, SP, DIST; `distill.Term.global_batch`) are evaluated on the all-gathered global
batch on every device: the all-gather's transpose sums the devices' cotangents of each share
(D times its part of the gradient) and the pmean divides by D, so their gradient is exactly that
of the global-batch term too (kdjax.distill's module docstring). So 1, 2 or 8 devices give the
same loss and gradient up to float reassociation (tests/test_global_batch.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kdjax import data as kdata
from kdjax import distill
from kdjax import losses
from kdjax import models

AXIS = distill.AXIS  # "data"
DROPOUT_STREAM = 0x0D0  # folded into a step's key for the models' dropout masks
STRONG_VIEW_STREAM = 0x5E0  # folded into a step's key for the strong view's augmentation


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue bit-exactly: checkpoint this whole object."""

    step: jax.Array  # int32 scalar: optimizer steps taken in this stage
    params: Any  # {'student': ..., 'distiller': ...}
    model_state: Any  # non-parameter collections, e.g. {'student': {'batch_stats': ...}}
    opt_state: Any
    rng: jax.Array  # uint32[2] base key of this stage; step keys are fold_in(rng, step)
    ema: Any = None  # Mean Teacher: EMA of the student's variables ({'params', 'batch_stats'})


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static (hashable) settings of the train step."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    steps_per_epoch: int
    crop_padding: int = 0
    flip: bool = False
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    l1: float = 0.0
    l2: float = 0.0
    dtype: Any = jnp.float32
    ema_decay: float = 0.0  # > 0: the teacher is an EMA of the student (state.ema), decay per step
    dot: bool = False  # the optimizer is DOT (kdjax.optim.dot): it gets the task and distillation gradients apart


def _apply_distiller(distiller, params, model_state, s_feats, t_feats, ctx):
    variables = {"params": params, **model_state}
    mutable = list(model_state)
    if mutable:
        return distiller.apply(variables, s_feats, t_feats, ctx, mutable=mutable)
    return distiller.apply(variables, s_feats, t_feats, ctx), {}


def extras(terms) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The on-request feature groups (`models.EXTRA_FEATURES`) that the terms read from the
    student and from the teacher: (student's, teacher's); () when none (the plain forward)."""
    bare = lambda names: (n.removeprefix(distill.STRONG) for n in names)  # noqa: E731 (either view)
    return (models.requested_extras(bare(n for t in terms for n in t.student)),
            models.requested_extras(bare(n for t in terms for n in t.teacher)))


def teacher_features(teachers, teacher_vars, x, extra: tuple[str, ...] = ()) -> dict:
    """Eval-mode features of one teacher, or of an ensemble (no gradient); ``extra``: the
    on-request feature groups to compute too (`extras`).

    With several teachers, 'logits' is every teacher's logits stacked along a teacher axis,
    (B, n, K) in the order of `teachers`: each logit term combines them at its own temperature
    (the weighted average of the teachers' softened probabilities, `distill.ensemble_logits`).
    Every other feature is the first teacher's (the trainer puts ``teacher.feature_source``
    first, see `distill.ensemble_order`).
    """
    if not teachers:
        return {}
    feats = [models.apply_model(m, v, x, train=False, extra=extra)[1] for m, v in zip(teachers, teacher_vars)]
    out = dict(feats[0])
    if len(feats) > 1:
        out["logits"] = jnp.stack([f["logits"] for f in feats], axis=1)
    return jax.lax.stop_gradient(out)


def init_variables(student, distiller: distill.Distiller, teachers: tuple, teacher_vars: tuple,
                   image_shape: tuple, key: jax.Array, *, ema: bool = False) -> tuple[dict, dict]:
    """Fresh (student variables, distiller variables) for one stage: the single init path.

    The trainer runs it jit-compiled (`init_state`), the pre-flight check traces it abstractly
    (`jax.eval_shape`), and the benchmark uses `init_state` too, so all three see the same state.
    Raises a one-line ValueError when a term reads a feature a model lacks.
    """
    key_model, key_distiller = jax.random.split(key)
    x = jnp.zeros((2,) + tuple(image_shape), jnp.float32)
    s_vars = dict(student.init(key_model, x, train=False))
    s_extra, t_extra = extras(distiller.terms)
    _, s_feats, _ = models.apply_model(student, s_vars, x, train=False, extra=s_extra)
    if ema:  # Mean Teacher: the teacher is the student itself
        t_feats = teacher_features((student,), (s_vars,), x, t_extra)
    else:
        t_feats = teacher_features(teachers, teacher_vars, x, t_extra)
    s_strong, t_strong = distill.reads_strong_view(distiller.terms)
    if s_strong:  # the strong view's features have the weak view's shapes
        s_feats = distill.with_strong_view(s_feats, s_feats)
    if t_strong:
        t_feats = distill.with_strong_view(t_feats, t_feats)
    distill.check_features(distiller.terms, s_feats, t_feats)
    ctx = distill.Context(labels=jnp.zeros((2,), jnp.int32), train=False, indices=jnp.zeros((2,), jnp.int32),
                          rng=key_distiller)
    return s_vars, dict(distiller.init(key_distiller, s_feats, t_feats, ctx))


# The init function runs once, so on CPU it is compiled without XLA's backend optimisations: that
# cut the compile of ResNet-18's init from 7.2 s to 1.7 s and MobileNetV2's from 12.4 s to 5.6 s on
# 2 CPU cores (the values differ from an optimised compile only in float rounding).
INIT_COMPILER_OPTIONS = {"cpu": {"xla_backend_optimization_level": 0}}


def init_state(student, distiller: distill.Distiller, teachers: tuple, teacher_vars: tuple,
               tx: optax.GradientTransformation, image_shape: tuple, seed: int, *, ema: bool = False,
               init_from: TrainState | None = None) -> TrainState:
    """The TrainState a stage starts from, built by one jit-compiled function (eager init runs op
    by op and took about a minute for ResNet-18 -> MobileNetV2 on 2 CPU cores).

    Keys: ``split(PRNGKey(seed))`` initialises student and distiller, ``PRNGKey(seed + 1)`` is
    the stage's step key. `init_from` (a finished stage's TrainState) supplies the student's and
    the adapters' values (two-stage methods); `ema` keeps an EMA copy of the student (Mean Teacher).
    """

    def build(teacher_vars, init_from):
        s_vars, d_vars = init_variables(student, distiller, teachers, teacher_vars, image_shape,
                                        jax.random.PRNGKey(seed), ema=ema)
        s_params = s_vars.pop("params")
        d_params = d_vars.pop("params", {})
        params = {"student": s_params, "distiller": d_params}
        model_state = {"student": s_vars, "distiller": d_vars}
        if init_from is not None:
            params = {"student": init_from.params["student"],
                      "distiller": {**d_params, **init_from.params["distiller"]}}
            model_state = {"student": init_from.model_state["student"],
                           "distiller": {**d_vars, **init_from.model_state["distiller"]}}
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                          opt_state=tx.init(params), rng=jax.random.PRNGKey(seed + 1))

    state = jax.jit(build, compiler_options=INIT_COMPILER_OPTIONS.get(jax.default_backend()))(
        tuple(teacher_vars), init_from)
    if ema:  # its own buffers (copied outside jit, which may forward inputs): donated buffers
        # must not appear twice in the state
        state = state.replace(ema=jax.tree.map(jnp.copy, {"params": state.params["student"],
                                                          **state.model_state["student"]}))
    return state


def global_norm(tree) -> jax.Array:
    """The L2 norm of all entries of `tree` together, in float32 (0 for an empty tree).

    One fused reduction over the leaves concatenated (XLA fuses the concatenation into it, so
    nothing is materialised); `optax.tree.norm` reduces leaf by leaf, one small kernel each, which
    was a second of the ResNet-18 -> MobileNetV2 step's compile on CPU for its three norms."""
    leaves = [jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(tree)]
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return jnp.sqrt(jnp.sum(jnp.square(jnp.concatenate(leaves))))


# ------------------------------------------------------------------ the train step, piece by piece
# `make_train_step` calls these in order, inside the per-device step (so the `AXIS` collectives are
# available to them). Splitting the step into them changed nothing in the traced program.


def _view(batch, position, key, mix_key, augment, cfg: StepConfig):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(position)
    x = augment(keys, batch["image"], crop_padding=cfg.crop_padding, flip=cfg.flip)
    x = kdata.normalize(x, cfg.mean, cfg.std, dtype=cfg.dtype)
    if cfg.mixup_alpha > 0:
        return kdata.mixup(mix_key, x, cfg.mixup_alpha)
    if cfg.cutmix_alpha > 0:
        return kdata.cutmix(mix_key, x, cfg.cutmix_alpha)
    return x, None, None


def views(batch, step_key, aug_key, mix_key, cfg: StepConfig, *, strong: bool = False):
    """The augmented, normalised (and mixed) views of this device's batch: (x, mix_perm, mix_lam,
    x_strong); perm and lam are None without mixup or CutMix, x_strong is None unless `strong`.

    x is the weak view (`kdata.augment`: crop and flip, keyed by `aug_key`). x_strong, asked for
    when a term reads the strong view (`distill.reads_strong_view`), is `kdata.strong_augment`'s,
    keyed by fold_in(step_key, STRONG_VIEW_STREAM). Example i's key is fold_in(view key, i's position
    in the *global* batch), so 1 or N devices, and a resumed run, draw the same views. Mixing draws
    from `mix_key` for both views: the same partners and weight.
    """
    b = batch["label"].shape[0]
    position = jax.lax.axis_index(AXIS) * b + jnp.arange(b)
    x, perm, lam = _view(batch, position, aug_key, mix_key, kdata.augment, cfg)
    x_strong = None
    if strong:
        x_strong, _, _ = _view(batch, position, jax.random.fold_in(step_key, STRONG_VIEW_STREAM), mix_key,
                               kdata.strong_augment, cfg)
    return x, perm, lam, x_strong


def teacher_outputs(teachers, teacher_vars, x, x_strong=None, *, extra: tuple[str, ...] = (),
                    cached: dict | None = None) -> dict:
    """What the teacher says about this step's views: eval mode, the very same augmented batch, no
    gradient (`teacher_features`); its features on `x_strong` too, as 'strong/<name>', when given.
    `cached`: the batch's 'teacher' entry, the outputs computed once before training
    (`kdata.teacher_cache`); then no teacher runs and it is returned as is."""
    if cached is not None:
        return cached
    t_feats = teacher_features(teachers, teacher_vars, x, extra)
    if x_strong is not None:
        t_feats = distill.with_strong_view(t_feats, teacher_features(teachers, teacher_vars, x_strong, extra))
    return t_feats


def student_loss(params, *, student, distiller: distill.Distiller, model_state, x, t_feats, ctx: distill.Context,
                 epoch, dropout_key, cfg: StepConfig, x_strong=None, extra: tuple[str, ...] = ()):
    """The student's forward pass in train mode and the weighted loss at `params`: ((task, kd), aux).

    task is the part of the labels (the 'ce' term and the L1/L2 penalties), kd the distillation
    terms' (each term weighted at `epoch`); DOT takes their gradients apart (`device_gradients`).
    aux = (values, logits, model_state): every term's unweighted value (and 'l1', 'l2'), the weak
    view's logits, and the student's and distiller's new non-parameter state. With `x_strong` the
    student then runs on the strong view, from the BatchNorm statistics the weak one left (two
    forward passes in train mode, as the reference's two calls); its features reach the terms as
    'strong/<name>'.
    """
    s_vars = {"params": params["student"], **model_state["student"]}
    logits, s_feats, s_stats = models.apply_model(student, s_vars, x, train=True, rng=dropout_key, extra=extra)
    if x_strong is not None:
        if s_stats is not None:
            s_vars = {**s_vars, "batch_stats": s_stats}
        _, strong, s_stats = models.apply_model(student, s_vars, x_strong, train=True, extra=extra,
                                                rng=jax.random.fold_in(dropout_key, STRONG_VIEW_STREAM))
        s_feats = distill.with_strong_view(s_feats, strong)
    values, d_state = _apply_distiller(distiller, params["distiller"], model_state["distiller"], s_feats, t_feats,
                                       ctx)
    terms = distiller.terms
    task = sum(t.weight_at(epoch) * values[t.name] for t in terms if t.name == "ce")
    kd = sum(t.weight_at(epoch) * values[t.name] for t in terms if t.name != "ce")
    if cfg.l1:
        values["l1"] = losses.l1_penalty(params["student"], kernels_only=True)
        task = task + cfg.l1 * values["l1"]
    if cfg.l2:
        values["l2"] = losses.l2_penalty(params["student"], kernels_only=True)
        task = task + cfg.l2 * values["l2"]
    s_state = {"batch_stats": s_stats} if s_stats is not None else {}
    return (task, kd), (values, logits, {"student": s_state, "distiller": d_state})


def device_gradients(loss_fn, params, *, dot: bool = False):
    """The loss and its gradients averaged over devices: (total, grads, (opt_grads, opt_extra), aux).

    `loss_fn(params) -> ((task, kd), aux)` is `student_loss` with the rest bound. It is differentiated
    w.r.t. a per-device ("varying") view of the replicated parameters, so the gradients are this
    device's own and the pmean here is the only reduction (otherwise shard_map's autodiff would
    already psum them). Without `dot`: one gradient of task + kd, which the optimizer gets. With
    `dot` (the optimizer is `kdjax.optim.dot`): one forward pass, two gradients; the optimizer gets
    the task gradient and, in opt_extra, ``kd_grads``; grads is their sum (what is logged and guarded).
    """
    local_params = jax.lax.pcast(params, AXIS, to="varying")
    if dot:
        def split_loss(p):
            (task, kd), aux = loss_fn(p)
            return (jnp.asarray(task, jnp.float32), jnp.asarray(kd, jnp.float32)), aux

        (task, kd), vjp, aux = jax.vjp(split_loss, local_params, has_aux=True)
        # cotangents typed like each output (a stage without distillation has a constant kd)
        (g_task,) = vjp((jnp.ones_like(task), jnp.zeros_like(kd)))
        (g_kd,) = vjp((jnp.zeros_like(task), jnp.ones_like(kd)))
        g_task, g_kd = jax.lax.pmean((g_task, g_kd), AXIS)
        return task + kd, jax.tree.map(jnp.add, g_task, g_kd), (g_task, {"kd_grads": g_kd}), aux

    def summed_loss(p):
        (task, kd), aux = loss_fn(p)
        return task + kd, aux

    (total, aux), grads = jax.value_and_grad(summed_loss, has_aux=True)(local_params)
    grads = jax.lax.pmean(grads, AXIS)
    return total, grads, (grads, {}), aux


def synced_model_state(new, old, frozen_stats: Any = None):
    """The non-parameter state leaving the step: `new` averaged over devices, with the student's
    `frozen_stats` (True leaves: the BatchNorm statistics of frozen layers) kept at their `old` values.

    BatchNorm statistics are already global (SyncBN) and CRD's memory is updated from all-gathered
    embeddings, so the pmean changes nothing numerically; it is what proves to shard_map that the
    state leaving the step is replicated."""
    new = jax.lax.pmean(new, AXIS)
    if frozen_stats is not None:
        new["student"] = jax.tree.map(lambda frozen, n, o: o if frozen else n, frozen_stats, new["student"],
                                      old["student"])
    return new


def is_finite_step(total, grad_norm, update_norm) -> jax.Array:
    """The NaN/Inf guard's decision: whether the loss (averaged over devices), the gradient and the
    optimizer update (e.g. an overflow in the optimizer's state) are all finite. Gradients and
    updates are already device-averaged, so every device takes the same decision.

    Via the norms the metrics compute anyway: per-leaf isfinite reductions made the ResNet-18 ->
    MobileNetV2 step compile 5x slower on CPU (13 s -> 62 s). A norm overflows only for entries
    beyond ~1e19, which is a divergence in any case."""
    return jnp.isfinite(jax.lax.pmean(total, AXIS)) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)


def keep_if_finite(finite, new, old):
    """The NaN/Inf guard: `new` after a finite step, else `old` (pytrees of one structure), so a
    non-finite step changes nothing (the trainer then stops with a message, or skips the step, as
    config.nan_policy says). One conditional over the whole tree: a select per leaf was hundreds of
    kernels to compile."""
    return jax.lax.cond(finite, lambda: new, lambda: old)


def ema_update(ema, params, model_state, decay: float, finite):
    """Mean Teacher's teacher after a step: ema <- decay * ema + (1 - decay) * the student's
    variables ({'params', 'batch_stats', ...}); unchanged after a non-finite step."""
    current = {"params": params["student"], **model_state["student"]}
    return keep_if_finite(finite, optax.incremental_update(current, ema, 1.0 - decay), ema)


def step_metrics(values, total, logits, labels, *, params, grad_norm, update_norm, finite, schedule,
                 step) -> dict:
    """The step's metrics: 'loss/<term>' (unweighted values), 'loss', 'accuracy' (of the weak view),
    averaged over devices; the global 'grad_norm', 'update_norm' and 'param_norm' (the student's,
    after the step), 'lr' (`schedule` at `step`) and 'nonfinite' (1.0 when the guard kept the state)."""
    metrics = {f"loss/{k}": v for k, v in values.items()}
    metrics["loss"] = total
    metrics["accuracy"] = jnp.mean(jnp.argmax(logits, -1) == labels)
    metrics = jax.lax.pmean(metrics, AXIS)
    metrics["grad_norm"] = grad_norm
    metrics["param_norm"] = global_norm(params["student"])
    metrics["update_norm"] = update_norm
    metrics["lr"] = jnp.asarray(schedule(step), jnp.float32)
    metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
    return metrics


def make_train_step(
    student, distiller: distill.Distiller, teachers: tuple, tx: optax.GradientTransformation,
    schedule: Callable[[jax.Array], jax.Array], cfg: StepConfig, frozen_stats: Any = None,
):
    """Returns the per-device step fn(state, teacher_variables, batch) -> (state, metrics).

    `batch` holds this device's slice: 'image' uint8 (b,H,W,C), 'label' int32 (b,), 'index' int32
    (b,) (data-set index of each example), and optionally 'teacher': the frozen teacher's cached
    features for these examples (then `teachers` is empty and no teacher runs in the step).
    `teachers` is a tuple of Linen models (empty: none; several: an ensemble) and
    `teacher_variables` the matching tuple of variables. With `cfg.ema_decay` > 0 the teacher is
    instead the student itself with the EMA variables `state.ema` (Mean Teacher), updated after
    every step. `frozen_stats`: a pytree of Python bools shaped like the student's non-parameter
    variables; True leaves (the BatchNorm statistics of frozen layers) keep their values. When a
    term reads the strong view (kdjax.distill.STRONG; config.augment.views='weak,strong', which
    kdjax.distill.check_views requires of such terms), the student and/or the teacher also see a
    strongly augmented view (`views`, `student_loss`).
    """
    s_extra, t_extra = extras(distiller.terms)
    # The strong view (two augmented views): only when a term reads it, only for who is read.
    s_strong, t_strong = distill.reads_strong_view(distiller.terms)

    def step_fn(state: TrainState, teacher_vars, batch):
        step_key = jax.random.fold_in(state.rng, state.step)
        aug_key, mix_key, term_key = jax.random.split(step_key, 3)
        x, perm, lam, x_strong = views(batch, step_key, aug_key, mix_key, cfg, strong=s_strong or t_strong)
        # Mean Teacher: the teacher is the student itself, with its EMA variables.
        t_models, t_vars = ((student,), (state.ema,)) if cfg.ema_decay > 0 else (teachers, teacher_vars)
        t_feats = teacher_outputs(t_models, t_vars, x, x_strong if t_strong else None, extra=t_extra,
                                  cached=batch.get("teacher"))
        ctx = distill.Context(labels=batch["label"], train=True, mix_perm=perm, mix_lam=lam,
                              indices=batch["index"], rng=term_key)
        epoch = state.step.astype(jnp.float32) / cfg.steps_per_epoch
        # The models' dropout: from the step key (a resumed run draws the same masks), other on each device.
        dropout_key = jax.random.fold_in(jax.random.fold_in(step_key, DROPOUT_STREAM), jax.lax.axis_index(AXIS))
        loss_fn = functools.partial(student_loss, student=student, distiller=distiller,
                                    model_state=state.model_state, x=x, t_feats=t_feats, ctx=ctx, epoch=epoch,
                                    dropout_key=dropout_key, cfg=cfg, x_strong=x_strong if s_strong else None,
                                    extra=s_extra)
        total, grads, (opt_grads, opt_extra), (values, logits, model_state) = device_gradients(
            loss_fn, state.params, dot=cfg.dot)
        model_state = synced_model_state(model_state, state.model_state, frozen_stats)
        updates, opt_state = tx.update(opt_grads, state.opt_state, state.params, **opt_extra)
        params = optax.apply_updates(state.params, updates)
        grad_norm, update_norm = global_norm(grads), global_norm(updates)
        finite = is_finite_step(total, grad_norm, update_norm)
        params, opt_state, model_state = keep_if_finite(finite, (params, opt_state, model_state),
                                                        (state.params, state.opt_state, state.model_state))
        metrics = step_metrics(values, total, logits, batch["label"], params=params, grad_norm=grad_norm,
                               update_norm=update_norm, finite=finite, schedule=schedule, step=state.step)
        ema = state.ema
        if cfg.ema_decay > 0:
            ema = ema_update(state.ema, params, model_state, cfg.ema_decay, finite)
        return state.replace(step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state,
                             ema=ema), metrics

    return step_fn


def make_eval_step(model, cfg: StepConfig):
    """Per-device fn(variables, batch) -> {'correct', 'count', 'loss_sum'}, summed over devices."""

    def eval_fn(variables, batch):
        x = kdata.normalize(batch["image"], cfg.mean, cfg.std, dtype=cfg.dtype)
        logits, _, _ = models.apply_model(model, variables, x, train=False)
        mask = batch["mask"].astype(jnp.float32)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        nll = -jnp.take_along_axis(logp, batch["label"][:, None], axis=-1)[:, 0]
        out = {
            "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
            "count": jnp.sum(mask),
            "loss_sum": jnp.sum(nll * mask),
        }
        return jax.lax.psum(out, AXIS)

    return eval_fn


class DataParallel:
    """Runs a per-device function over all devices: ``jit`` (shard_map over a mesh) or ``pmap``.

    Arguments of the wrapped function are either replicated (state, variables) or sharded along
    the batch (the last argument, a dict of arrays whose leading axis is the per-process batch).
    """

    MODES = ("jit", "pmap")

    def __init__(self, mode: str = "jit", num_devices: int | None = None):
        """`num_devices`: use only the first n devices (single-process only; default all)."""
        if mode not in self.MODES:
            raise ValueError(f"unknown parallel mode {mode!r}; choose one of: {', '.join(self.MODES)}")
        self.mode = mode
        devices = jax.devices()
        if num_devices is not None:
            if jax.process_count() > 1 or not 0 < num_devices <= len(devices):
                raise ValueError(f"num_devices={num_devices}: this process has {len(devices)} devices")
            devices = devices[:num_devices]
        self.devices = devices
        self.num_devices = len(devices)
        self.num_local = len([d for d in devices if d.process_index == jax.process_index()])
        self.mesh = jax.make_mesh((self.num_devices,), (AXIS,), devices=devices)
        self._replicated = NamedSharding(self.mesh, P())
        self._sharded = NamedSharding(self.mesh, P(AXIS))

    def wrap(self, fn, donate_first: bool = False):
        donate = (0,) if donate_first else ()
        if self.mode == "pmap":
            local = [d for d in self.devices if d.process_index == jax.process_index()]
            return jax.pmap(fn, axis_name=AXIS, donate_argnums=donate, devices=local)
        # Replicated arguments except the last (the sharded batch); replicated outputs.
        def sharded(*args):
            specs = tuple(P() for _ in args[:-1]) + (P(AXIS),)
            return jax.shard_map(fn, mesh=self.mesh, in_specs=specs, out_specs=P())(*args)

        return jax.jit(sharded, donate_argnums=donate)

    def replicate(self, tree):
        if self.mode == "pmap":
            return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (self.num_local,) + np.shape(x)), tree)
        return jax.device_put(tree, self._replicated)

    def unreplicate(self, tree):
        """Back to host numpy, one copy."""
        if self.mode == "pmap":
            return jax.device_get(jax.tree.map(lambda x: x[0], tree))
        return jax.device_get(tree)

    def shard(self, batch):
        """This process's slice of the global batch -> the wrapped function's batch argument."""
        if self.mode == "pmap":
            return jax.tree.map(lambda x: x.reshape((self.num_local, -1) + x.shape[1:]), batch)
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self._sharded, x), batch)
