"""Optimizers and learning-rate schedules: plain keyword arguments -> optax objects.

Nothing here reads a config object; the trainer unpacks its config and passes plain
arguments to :func:`make_schedule` and :func:`make_optimizer`.

Conventions (chosen to match PyTorch / RepDistiller, which most KD baselines use):

* A schedule is called with the number of updates already applied (optax's ``count``),
  so update number ``k`` (0-indexed) uses ``schedule(k)``.  Epoch arguments are converted
  to steps with ``round(epochs * steps_per_epoch)``.
* Weight decay is *coupled* L2 (added to the gradient before the optimizer, like
  ``torch.optim.SGD(weight_decay=...)``) for every optimizer except ``'adamw'``, where it
  is *decoupled* (``optax.adamw`` / ``torch.optim.AdamW``).
* By default only kernels (leaves with ``ndim > 1``) are decayed; biases and BatchNorm
  scale/bias are not (``decay_all=True`` decays every leaf, which is what a plain
  ``torch.optim.SGD(model.parameters(), weight_decay=...)`` does).
* Gradient clipping by global norm, when requested, is the first transformation in the
  chain (on the raw gradients, like ``torch.nn.utils.clip_grad_norm_`` before ``step()``).

When weight decay is used, ``optimizer.update(grads, opt_state, params)`` must be given
``params``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = [
    'OPTIMIZERS',
    'ALL_OPTIMIZERS',
    'SCHEDULES',
    'DEFAULT_LEARNING_RATES',
    'default_learning_rate',
    'resolve_learning_rate',
    'make_schedule',
    'make_optimizer',
    'weight_decay_mask',
    'param_paths',
    'flat_paths',
    'partition',
    'learning_rate_at',
    'dot',
    'scale_by_dot',
    'DotState',
]

OPTIMIZERS = ('sgd', 'adam', 'adamw', 'rmsprop', 'adagrad', 'adadelta')  # updated with one gradient
# ...and DOT, updated with the task and the distillation gradients (the trainer's step feeds both).
ALL_OPTIMIZERS = OPTIMIZERS + ('dot',)
SCHEDULES = ('constant', 'cosine', 'step', 'multistep', 'linear')

# The learning rate each optimizer gets when none is given (``optimizer.learning_rate=None`` in a
# config): the reference default of each, so that changing only the optimizer's name gives a
# sensible run.  Adam, AdamW, RMSprop, Adagrad, Adadelta: the ``torch.optim`` defaults (Adadelta's
# 1.0 is also Zeiler (2012)'s: its update is already unit-scaled).  SGD has no tuned default
# anywhere (``torch.optim.SGD``'s lr was a required argument until torch 2.2 made it 1e-3 "for a
# consistent signature"); 0.05 is the RepDistiller / mdistiller CIFAR recipe (momentum 0.9,
# batch 64), which this library's CIFAR configs reproduce at this library's default batch of 64
# (0.1 is the usual figure at batch 128-256).  Documented in kdjax/config.py (the schema) and
# the README.
DEFAULT_LEARNING_RATES = {
    'sgd': 0.05,
    'adam': 1e-3,
    'adamw': 1e-3,
    'rmsprop': 1e-2,
    'adagrad': 1e-2,
    'adadelta': 1.0,
    'dot': 0.05,  # SGD-momentum's (DOT is SGD with one momentum per loss; mdistiller's CIFAR recipe)
}

# eps used when ``eps=None`` (PyTorch defaults; note optax's adagrad default is 1e-7).
_DEFAULT_EPS = {
    'adam': 1e-8,
    'adamw': 1e-8,
    'rmsprop': 1e-8,
    'adagrad': 1e-10,
    'adadelta': 1e-6,
}


def _choices_error(kind: str, name: Any, valid: Sequence[str]) -> ValueError:
    return ValueError(f'unknown {kind} {name!r}; choose one of: {", ".join(sorted(valid))}')


def _normalize_name(name: Any, kind: str, valid: Sequence[str]) -> str:
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in valid:
        raise _choices_error(kind, name, valid)
    return key


def default_learning_rate(name: str) -> float:
    """The learning rate of :data:`DEFAULT_LEARNING_RATES` for optimizer ``name``."""
    return DEFAULT_LEARNING_RATES[_normalize_name(name, 'optimizer', ALL_OPTIMIZERS)]


def resolve_learning_rate(name: str, learning_rate: float | None = None, scale: float = 1.0,
                          tuned: Mapping[str, float] | None = None) -> float:
    """The (peak) learning rate of a stage: the base rate times the stage's ``scale``.

    The base rate is ``learning_rate`` when given; else ``tuned[name]`` when the caller's
    config was tuned for optimizer ``name`` (e.g. the digits config: ``{'adam': 3e-3}``); else
    the optimizer's default (:func:`default_learning_rate`).  A tuned rate therefore never
    follows the config to another optimizer.  This is the one place where a config's
    ``optimizer.learning_rate``, ``optimizer.tuned_learning_rates`` and
    ``<stage>.learning_rate_scale`` become a number.
    """
    key = _normalize_name(name, 'optimizer', ALL_OPTIMIZERS)
    tuned = dict(tuned or {})
    for other in tuned:
        if other not in ALL_OPTIMIZERS:
            raise ValueError(f'tuned learning rate for unknown optimizer {other!r}; '
                             f'choose from: {", ".join(sorted(ALL_OPTIMIZERS))}')
    if learning_rate is not None:
        base = float(learning_rate)
    else:
        base = float(tuned[key]) if key in tuned else DEFAULT_LEARNING_RATES[key]
    _check_nonneg('learning_rate', base)
    _check_nonneg('learning_rate_scale', scale)
    return base * float(scale)


def _epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
    return int(round(float(epochs) * steps_per_epoch))


# --------------------------------------------------------------------------- schedules


def make_schedule(
    name: str,
    *,
    base_lr: float,
    total_steps: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0.0,
    decay_epochs: Sequence[float] = (),
    decay_factor: float = 0.1,
    step_epochs: float = 30,
    end_lr_factor: float = 0.0,
) -> optax.Schedule:
    """Build an optax schedule ``step -> learning rate``.

    Args:
      name: one of :data:`SCHEDULES` (case-insensitive):

        * ``'constant'``: ``base_lr``.
        * ``'cosine'``: cosine decay from ``base_lr`` (at the end of warmup) to
          ``end_lr_factor * base_lr`` at ``total_steps`` (and flat after).
        * ``'linear'``: linear decay from ``base_lr`` to ``end_lr_factor * base_lr`` at
          ``total_steps``.
        * ``'multistep'``: ``base_lr * decay_factor**k`` where ``k`` is the number of
          entries of ``decay_epochs`` that are ``<= step / steps_per_epoch``; e.g.
          RepDistiller's CIFAR recipe is ``base_lr=0.05, decay_epochs=(150, 180, 210),
          decay_factor=0.1`` over 240 epochs (epoch 150 counted from 0 is the first
          decayed epoch, like ``torch.optim.lr_scheduler.MultiStepLR``).
        * ``'step'``: ``base_lr * decay_factor**floor(step / (step_epochs *
          steps_per_epoch))`` (``torch.optim.lr_scheduler.StepLR``).
      base_lr: peak learning rate (>= 0).
      total_steps: total number of updates of the run (used by cosine/linear, must
        exceed the warmup steps for them).
      steps_per_epoch: updates per epoch (> 0); converts all ``*_epochs`` arguments.
      warmup_epochs: optional linear warmup from 0 to ``base_lr`` over this many epochs
        (may be fractional), joined in front of the main schedule with
        ``optax.join_schedules``.  Epoch boundaries of ``'multistep'`` and ``'step'`` stay
        absolute (counted from step 0, not from the end of warmup) and must not fall
        inside the warmup; cosine and linear decay over the remaining
        ``total_steps - warmup_steps`` steps.
      decay_epochs: strictly increasing, positive epochs for ``'multistep'``.
      decay_factor: multiplicative factor (> 0) for ``'multistep'`` and ``'step'``.
      step_epochs: period (> 0) of ``'step'``.
      end_lr_factor: final LR as a fraction of ``base_lr`` for cosine/linear (>= 0).

    Returns:
      A callable ``step -> lr`` usable as an optax learning rate.

    Raises:
      ValueError: unknown name or inconsistent arguments.
    """
    key = _normalize_name(name, 'schedule', SCHEDULES)
    base_lr = float(base_lr)
    if not math.isfinite(base_lr) or base_lr < 0:
        raise ValueError(f'base_lr must be a finite number >= 0, got {base_lr}')
    if int(steps_per_epoch) <= 0:
        raise ValueError(f'steps_per_epoch must be > 0, got {steps_per_epoch}')
    steps_per_epoch = int(steps_per_epoch)
    if warmup_epochs < 0:
        raise ValueError(f'warmup_epochs must be >= 0, got {warmup_epochs}')
    warmup_steps = _epochs_to_steps(warmup_epochs, steps_per_epoch)
    if decay_factor <= 0:
        raise ValueError(f'decay_factor must be > 0, got {decay_factor}')
    if end_lr_factor < 0:
        raise ValueError(f'end_lr_factor must be >= 0, got {end_lr_factor}')

    if key == 'constant':
        main = optax.constant_schedule(base_lr)
    elif key in ('cosine', 'linear'):
        decay_steps = int(total_steps) - warmup_steps
        if decay_steps <= 0:
            raise ValueError(
                f'{key} schedule needs total_steps ({total_steps}) > warmup steps ({warmup_steps})'
            )
        end_lr = end_lr_factor * base_lr
        if key == 'cosine':
            main = optax.cosine_decay_schedule(base_lr, decay_steps, alpha=end_lr_factor)
        else:
            main = optax.linear_schedule(base_lr, end_lr, decay_steps)
    elif key == 'multistep':
        epochs = [float(e) for e in decay_epochs]
        if not epochs:
            raise ValueError("multistep schedule needs non-empty decay_epochs, e.g. (150, 180, 210)")
        if any(not math.isfinite(e) or e <= 0 for e in epochs):
            raise ValueError(f'decay_epochs must be positive, got {tuple(decay_epochs)}')
        if any(b <= a for a, b in zip(epochs, epochs[1:])):
            raise ValueError(f'decay_epochs must be strictly increasing, got {tuple(decay_epochs)}')
        boundaries = [_epochs_to_steps(e, steps_per_epoch) for e in epochs]
        if any(b <= a for a, b in zip(boundaries, boundaries[1:])):
            raise ValueError(
                f'decay_epochs {tuple(decay_epochs)} collide after rounding to steps '
                f'(steps_per_epoch={steps_per_epoch})'
            )
        if boundaries[0] < warmup_steps:
            raise ValueError(
                f'decay epoch {epochs[0]} falls inside the warmup ({warmup_epochs} epochs)'
            )
        # join_schedules feeds ``step - warmup_steps`` to the main schedule: shift back.
        main = optax.piecewise_constant_schedule(
            base_lr, {b - warmup_steps: decay_factor for b in boundaries}
        )
    else:  # 'step'
        if step_epochs <= 0:
            raise ValueError(f'step_epochs must be > 0, got {step_epochs}')
        period = _epochs_to_steps(step_epochs, steps_per_epoch)
        if period <= 0:
            raise ValueError(
                f'step_epochs={step_epochs} is less than one step at steps_per_epoch={steps_per_epoch}'
            )
        if period < warmup_steps:
            raise ValueError(
                f'step_epochs ({step_epochs}) is shorter than the warmup ({warmup_epochs} epochs)'
            )
        offset = warmup_steps

        def main(count):
            k = jnp.floor_divide(jnp.asarray(count) + offset, period)
            return base_lr * jnp.power(decay_factor, k.astype(jnp.float32))

    if warmup_steps == 0:
        return main
    warmup = optax.linear_schedule(0.0, base_lr, warmup_steps)
    return optax.join_schedules([warmup, main], [warmup_steps])


def learning_rate_at(learning_rate: float | optax.Schedule, step: int) -> float:
    """Learning rate (Python float) used by update number ``step`` (0-indexed).

    ``learning_rate`` is a constant or a schedule as given to :func:`make_optimizer`.
    For logging: ``learning_rate_at(schedule, int(step))``.
    """
    if callable(learning_rate):
        return float(learning_rate(jnp.asarray(step, dtype=jnp.int32)))
    return float(learning_rate)


# --------------------------------------------------------------------------- optimizers


def weight_decay_mask(params: Any) -> Any:
    """Pytree of bools: ``True`` for leaves that are decayed (``ndim > 1``: conv/dense kernels).

    Biases, BatchNorm/LayerNorm scale and bias (1-D) and scalars are excluded.  Used as
    the ``mask`` of ``optax.add_decayed_weights`` unless ``decay_all=True``.
    """
    return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def param_paths(params: Any) -> Any:
    """Pytree of strings: each leaf's path, keys joined by '/' (e.g. 'student/conv1_0/kernel')."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path), params)


def flat_paths(tree: Any) -> dict[str, Any]:
    """{'params/conv1_0/kernel': leaf, ...}: every leaf under its `param_paths` name, in
    tree-flatten order."""
    return dict(zip(jax.tree.leaves(param_paths(tree)), jax.tree.leaves(tree)))


def partition(transforms: dict[str, optax.GradientTransformation], rules: Sequence[tuple[str, str]],
              default: str, *, within: str = "student/") -> optax.GradientTransformation:
    """``optax.multi_transform`` by parameter path: a leaf whose path (relative to `within`, e.g.
    'conv1_0/kernel' for 'student/conv1_0/kernel') is matched (``re.search``) by the regex of the
    first ``(label, regex)`` rule goes to ``transforms[label]``; other leaves, and leaves outside
    `within` (e.g. distillation adapters), to ``transforms[default]``. Used to freeze parameters
    (``optax.set_to_zero()``) and to give the head its own learning rate."""
    compiled = [(label, re.compile(regex)) for label, regex in rules if regex]

    def label(path: str) -> str:
        if not path.startswith(within):
            return default
        rel = path[len(within):]
        return next((lab for lab, rx in compiled if rx.search(rel)), default)

    # mask_compatible_extra_args: extra arguments shaped like the parameters (DOT's kd_grads) are
    # masked like the gradients, so each group's transform sees its own leaves of them.
    return optax.multi_transform(transforms, lambda params: jax.tree.map(label, param_paths(params)),
                                 mask_compatible_extra_args=True)


def _check_nonneg(name: str, value: float) -> None:
    if not math.isfinite(float(value)) or float(value) < 0:
        raise ValueError(f'{name} must be a finite number >= 0, got {value}')


def make_optimizer(
    name: str,
    learning_rate: float | optax.Schedule,
    *,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    decay_all: bool = False,
    grad_clip_norm: float | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float | None = None,
    rmsprop_decay: float = 0.9,
    adadelta_rho: float = 0.9,
    dot_delta: float = 0.075,
) -> optax.GradientTransformation:
    """Build an optax optimizer from plain arguments (PyTorch semantics).

    ``'dot'`` returns :func:`dot` (momentum +- ``dot_delta``; no Nesterov, no clipping): its update
    needs ``kd_grads=`` as well, which kdjax's train step passes when ``StepConfig.dot`` is set.

    The chain is::

        clip_by_global_norm(grad_clip_norm)            # if grad_clip_norm
        add_decayed_weights(weight_decay, mask)        # coupled L2 (default, non-adamw)
        <scale_by_{sgd-momentum,adam,rms,rss,adadelta}>
        add_decayed_weights(weight_decay, mask)        # decoupled (adamw)
        scale_by_learning_rate(learning_rate)

    Args:
      name: one of :data:`OPTIMIZERS` (case-insensitive):

        * ``'sgd'``: ``torch.optim.SGD`` (dampening 0): ``buf = momentum*buf + g``;
          ``g = g + momentum*buf`` if ``nesterov`` else ``g = buf``; ``p -= lr*g``.
          ``momentum=0`` is plain SGD.
        * ``'adam'`` / ``'adamw'``: bias-corrected Adam with ``b1, b2, eps``;
          ``nesterov=True`` gives the NAdam variant (``optax.scale_by_adam(nesterov=True)``).
        * ``'rmsprop'``: ``torch.optim.RMSprop``-style: ``v = decay*v + (1-decay)*g**2``,
          ``u = g / (sqrt(v) + eps)`` (eps outside the sqrt, ``v`` starts at 0; no momentum,
          not centered: torch's defaults).
          Note torch's default ``alpha`` is 0.99; the default ``rmsprop_decay`` here is 0.9
          (TF/optax); pass 0.99 to match torch.
        * ``'adagrad'``: ``u = g / sqrt(sum g**2 + eps)``, accumulator starts at 0 (like
          torch; optax's default is 0.1).
        * ``'adadelta'``: ``torch.optim.Adadelta`` / Zeiler (2012).  The update is already
          unit-scaled (ratio of RMS of past updates to RMS of gradients), and
          ``learning_rate`` multiplies it exactly as in torch, so use ``learning_rate=1.0``
          (torch default; optionally with a decaying schedule).  SGD-sized rates such as
          0.05 make it crawl.
      learning_rate: a non-negative float or an optax schedule (e.g. from
        :func:`make_schedule`).
      momentum: SGD momentum in ``[0, 1)``; ignored by the other optimizers.
      nesterov: Nesterov momentum (sgd) or NAdam (adam/adamw).  Requires ``momentum > 0``
        for sgd, like torch.  Rejected for rmsprop/adagrad/adadelta.
      weight_decay: L2 coefficient (>= 0).  For sgd/adam/rmsprop/adagrad/adadelta it is
        coupled (``g += weight_decay * p`` before the optimizer; torch ``weight_decay``,
        e.g. RepDistiller's SGD ``5e-4``).  For adamw it is decoupled:
        ``p -= lr * (adam_update + weight_decay * p)`` (``optax.adamw``/``torch.optim.AdamW``).
      decay_all: ``False`` (default) decays only leaves with ``ndim > 1`` (kernels) — see
        :func:`weight_decay_mask`; ``True`` decays every leaf (biases and BatchNorm
        parameters too, like a plain ``model.parameters()`` torch optimizer).
      grad_clip_norm: if set (> 0), clip gradients by global norm first in the chain.
      b1, b2: Adam moment decays (torch ``betas``), each in ``[0, 1)``.
      eps: numerical epsilon; ``None`` uses the torch default of the optimizer
        (adam/adamw/rmsprop 1e-8, adagrad 1e-10, adadelta 1e-6).
      rmsprop_decay: RMSprop squared-gradient decay (torch ``alpha``), in ``[0, 1)``.
      adadelta_rho: Adadelta decay (torch ``rho``), in ``[0, 1)``.

    Returns:
      An ``optax.GradientTransformation``.  Call ``update(grads, state, params)`` with
      ``params`` whenever ``weight_decay > 0``.

    Raises:
      ValueError: unknown name or invalid hyper-parameter.
    """
    key = _normalize_name(name, 'optimizer', ALL_OPTIMIZERS)
    if key == 'dot':
        if nesterov or grad_clip_norm:
            raise ValueError("optimizer 'dot' has no Nesterov variant and no gradient clipping (as the reference): "
                             "set optimizer.nesterov=False and optimizer.grad_clip_norm=None")
        _check_nonneg('weight_decay', weight_decay)
        return dot(learning_rate, momentum=momentum, delta=dot_delta, weight_decay=weight_decay,
                   decay_all=decay_all)

    if not callable(learning_rate):
        _check_nonneg('learning_rate', learning_rate)
        learning_rate = float(learning_rate)
    _check_nonneg('weight_decay', weight_decay)
    if grad_clip_norm is not None and not (float(grad_clip_norm) > 0):
        raise ValueError(f'grad_clip_norm must be > 0 or None, got {grad_clip_norm}')
    if eps is None:
        eps = _DEFAULT_EPS.get(key, 1e-8)
    _check_nonneg('eps', eps)

    decoupled = key == 'adamw'

    if key == 'sgd':
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f'sgd momentum must be in [0, 1), got {momentum}')
        if nesterov and momentum <= 0:
            raise ValueError('sgd nesterov=True requires momentum > 0 (as in torch.optim.SGD)')
        core = optax.trace(decay=momentum, nesterov=nesterov) if momentum > 0 else optax.identity()
    elif key in ('adam', 'adamw'):
        for n, v in (('b1', b1), ('b2', b2)):
            if not 0.0 <= v < 1.0:
                raise ValueError(f'{n} must be in [0, 1), got {v}')
        core = optax.scale_by_adam(b1=b1, b2=b2, eps=eps, nesterov=nesterov)
    elif key == 'rmsprop':
        if not 0.0 <= rmsprop_decay < 1.0:
            raise ValueError(f'rmsprop_decay must be in [0, 1), got {rmsprop_decay}')
        if nesterov:
            raise ValueError("nesterov=True is not supported by 'rmsprop'")
        core = optax.scale_by_rms(decay=rmsprop_decay, eps=eps, initial_scale=0.0, eps_in_sqrt=False)
    elif key == 'adagrad':
        if nesterov:
            raise ValueError("nesterov=True is not supported by 'adagrad'")
        core = optax.scale_by_rss(initial_accumulator_value=0.0, eps=eps)
    else:  # adadelta
        if nesterov:
            raise ValueError("nesterov=True is not supported by 'adadelta'")
        if not 0.0 <= adadelta_rho < 1.0:
            raise ValueError(f'adadelta_rho must be in [0, 1), got {adadelta_rho}')
        core = optax.scale_by_adadelta(rho=adadelta_rho, eps=eps)

    mask = None if decay_all else weight_decay_mask
    decay = optax.add_decayed_weights(weight_decay, mask=mask) if weight_decay > 0 else None

    chain = []
    if grad_clip_norm is not None:
        chain.append(optax.clip_by_global_norm(float(grad_clip_norm)))
    if decay is not None and not decoupled:
        chain.append(decay)
    chain.append(core)
    if decay is not None and decoupled:
        chain.append(decay)
    chain.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*chain)


# --------------------------------------------------------------------------- DOT


class DotState(NamedTuple):
    """State of :func:`scale_by_dot`: one momentum buffer per loss, shaped like the parameters,
    and per leaf whether its distillation buffer has been set (the reference's first-step rule)."""
    task: Any
    kd: Any
    kd_started: Any


def scale_by_dot(
    momentum: float = 0.9,
    delta: float = 0.075,
    *,
    weight_decay: float = 0.0,
    mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """DOT's two momentum buffers (without the learning rate): see :func:`dot`.

    ``update(task_grads, state, params, kd_grads=kd_grads)``: ``updates`` is the gradient of
    the task loss, ``kd_grads`` (same tree) that of the distillation loss; returns the sum of
    the two buffers (to be scaled by ``-learning_rate``). ``mask``: which leaves are
    weight-decayed (a pytree of bools or a callable of the parameters; None: all).
    """
    beta, delta, weight_decay = float(momentum), float(delta), float(weight_decay)
    if not math.isfinite(delta) or delta < 0:
        raise ValueError(f'dot delta must be a finite number >= 0, got {delta}')
    if not (0.0 <= beta - delta and beta + delta < 1.0):
        raise ValueError(f'dot needs 0 <= momentum - delta and momentum + delta < 1 (the task and '
                         f'distillation momenta), got momentum={beta}, delta={delta}')
    _check_nonneg('weight_decay', weight_decay)
    m_task, m_kd = beta - delta, beta + delta

    def init_fn(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return DotState(task=zeros, kd=jax.tree.map(jnp.zeros_like, params),
                        kd_started=jax.tree.map(lambda _: jnp.zeros((), bool), params))

    def update_fn(updates, state, params=None, *, kd_grads=None, **extra_args):
        del extra_args
        if kd_grads is None:
            raise ValueError('dot: the update needs the distillation-loss gradient too: '
                             'tx.update(task_grads, state, params, kd_grads=kd_grads)')
        if jax.tree.structure(kd_grads) != jax.tree.structure(updates):
            raise ValueError('dot: kd_grads must have the same tree structure as the task gradients, '
                             f'got {jax.tree.structure(kd_grads)} and {jax.tree.structure(updates)}')
        if weight_decay > 0 and params is None:
            raise ValueError('dot: weight_decay > 0 needs params: tx.update(task_grads, state, params, '
                             'kd_grads=...)')
        base = updates if params is None else params
        if mask is None:
            decayed = jax.tree.map(lambda _: True, base)
        else:
            decayed = mask(base) if callable(mask) else mask

        def leaf(g_t, g_k, p, buf_t, buf_k, started, dec):
            # Which losses reach this leaf: torch's `p.grad is not None` after each backward. A
            # leaf outside a loss's graph gets an all-zero gradient here.
            in_t, in_k = jnp.any(g_t != 0), jnp.any(g_k != 0)
            wd = weight_decay if (weight_decay > 0 and dec) else 0.0
            decay = wd * p if wd else jnp.zeros_like(g_t)
            # Task pass: weight decay goes into the task gradient; momentum beta - delta where the
            # distillation loss also reaches the leaf, else beta ((m_task + m_kd) / 2).
            new_t = jnp.where(in_k, m_task, beta) * buf_t + (g_t + decay)
            # Distillation pass: momentum beta + delta where both reach the leaf; a leaf only the
            # distillation loss reaches (an adapter) gets beta, and the weight decay from its
            # second step on (the reference sets a fresh buffer to the bare gradient).
            d_k = g_k + jnp.where(~in_t & started, decay, 0.0)
            new_k = jnp.where(in_t, m_kd, beta) * buf_k + d_k
            new_t = jnp.where(in_t, new_t, buf_t)
            new_k = jnp.where(in_k, new_k, buf_k)
            out = jnp.where(in_t, new_t, 0.0) + jnp.where(in_k, new_k, 0.0)
            return out.astype(g_t.dtype), new_t, new_k, started | in_k

        res = jax.tree.map(leaf, updates, kd_grads, base, state.task, state.kd, state.kd_started,
                           decayed)
        treedef = jax.tree.structure(updates)
        leaves = treedef.flatten_up_to(res)
        pick = lambda i: treedef.unflatten([r[i] for r in leaves])  # noqa: E731
        return pick(0), DotState(task=pick(1), kd=pick(2), kd_started=pick(3))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def dot(
    learning_rate: float | optax.Schedule,
    momentum: float = 0.9,
    delta: float = 0.075,
    *,
    weight_decay: float = 0.0,
    decay_all: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """DOT, the Distillation-Oriented Trainer: SGD with one momentum per loss.

    Zhao, Song, Qiu, "DOT: A Distillation-Oriented Trainer", ICCV 2023; reproduces mdistiller
    ``DistillationOrientedTrainer`` (mdistiller/engine/dot.py @a08d46f) as its ``DOT`` trainer
    builds it (engine/trainer.py: ``momentum = MOMENTUM - DOT.DELTA``, ``momentum_kd = MOMENTUM
    + DOT.DELTA``; ``SOLVER.DOT.DELTA = 0.075``). With beta = ``momentum``, per parameter, g_task
    the gradient of the task (cross-entropy) loss and g_kd that of the distillation loss::

        b_task <- (beta - delta) * b_task + g_task + wd * p    # smaller momentum: task loss
        b_kd   <- (beta + delta) * b_kd   + g_kd               # larger momentum: distillation
        p      <- p - lr * (b_task + b_kd)

    Buffers start at zero (torch's first ``buf = d_p`` is the same). A parameter that only one
    loss reaches (all-zero gradient from the other, torch's ``grad is None``) uses plain beta for
    that loss: the task-only layers after a feature method's hint, a distillation adapter. The
    weight decay of an adapter goes into its distillation gradient, from its second step on (the
    reference initialises a fresh distillation buffer with the bare gradient). With delta = 0
    this is SGD with momentum beta (torch semantics, coupled weight decay) on g_task + g_kd.
    The reference has no Nesterov variant, dampening 0, and decays every parameter; here, as for
    :func:`make_optimizer`, only kernels unless ``decay_all=True``.

    Usage (two gradients of one forward pass; ``task``/``kd`` are the weighted losses)::

        tx = optim.dot(0.05, momentum=0.9, delta=0.075, weight_decay=5e-4)
        (task, kd), vjp = jax.vjp(lambda p: losses_of(p), params)
        g_task, = vjp((jnp.ones(()), jnp.zeros(())))
        g_kd, = vjp((jnp.zeros(()), jnp.ones(())))
        updates, opt_state = tx.update(g_task, opt_state, params, kd_grads=g_kd)
        params = optax.apply_updates(params, updates)

    ``kd_grads`` is an optax extra argument: ``optax.chain`` passes it on, and
    :func:`partition` masks it like the gradients (frozen parameters, a head with its own rate).

    Args:
      learning_rate: a float or an optax schedule (of the update count).
      momentum: beta; the task momentum is beta - delta, the distillation momentum beta + delta.
      delta: Delta >= 0 (0.075 in the reference).
      weight_decay: coupled L2 coefficient (torch ``weight_decay``).
      decay_all: decay every leaf, not only kernels (see :func:`weight_decay_mask`).
    """
    if not callable(learning_rate):
        _check_nonneg('learning_rate', learning_rate)
        learning_rate = float(learning_rate)
    core = scale_by_dot(momentum, delta, weight_decay=weight_decay,
                        mask=None if decay_all else weight_decay_mask)
    return optax.chain(core, optax.scale_by_learning_rate(learning_rate))
