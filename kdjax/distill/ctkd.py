"""CTKD, a modifier of the temperature-based methods (``distill.ctkd.enabled``): the learnable
temperature (`CTKDTemperature`, with its curriculum), its term, and the wrapper that hands the
learned temperature to the other terms."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax import losses
from kdjax.distill.core import AXIS, CTKD_COLLECTION, Context, Term


class CTKDTemperature(nn.Module):
    """CTKD's global learnable temperature (zhengli97/CTKD ``Global_T``), with its curriculum.

    One trainable scalar 'raw' (initialised to `init`); T = t_start + t_end * sigmoid(raw) behind a
    gradient-reversal layer of weight lambda (`losses.ctkd_temperature`), so the student's optimiser
    moves T to increase the distillation loss. lambda follows `losses.ctkd_lambda` at the 1-based
    epoch floor(step / steps_per_epoch) + 1, as the reference evaluates it once per epoch. The step
    count is this module's own state (collection 'ctkd', advanced only when ``ctx.train``), so the
    trainer passes nothing new; steps_per_epoch is num_data // global batch, as
    `kdjax.data.steps_per_epoch`, unless given. Outside training lambda is irrelevant (no update).
    'raw' is optimised with the student by the trainer's optimizer; the reference's SGD also
    weight-decays it (5e-4), which kdjax's default mask (kernels only) does not unless
    ``optimizer.decay_all=True``. Only the reference's global temperature is implemented, not its
    per-instance variant."""

    t_start: float = 1.0
    t_end: float = 20.0
    init: float = 1.0
    lambda_start: float = 0.0
    lambda_end: float = 1.0
    lambda_epochs: float = 10.0
    num_data: int | None = None
    steps_per_epoch: int | None = None

    @nn.compact
    def __call__(self, ctx: Context):
        raw = self.param("raw", nn.initializers.constant(self.init), (), jnp.float32)
        step = self.variable(CTKD_COLLECTION, "step", lambda: jnp.zeros((), jnp.float32))
        lam = jnp.zeros((), jnp.float32)
        if ctx.train:
            spe = self.steps_per_epoch
            if spe is None:
                if self.num_data is None:
                    raise ValueError("ctkd needs the epoch length: pass build_terms(..., num_data=N) or "
                                     "set distill.ctkd.steps_per_epoch")
                spe = int(self.num_data) // (ctx.labels.shape[0] * jax.lax.axis_size(AXIS))
            spe = max(int(spe), 1)
            epoch = jnp.floor(step.value / spe) + 1.0
            lam = losses.ctkd_lambda(epoch, self.lambda_start, self.lambda_end, self.lambda_epochs)
            if self.is_mutable_collection(CTKD_COLLECTION) and not self.is_initializing():
                step.value = step.value + 1.0
        return losses.ctkd_temperature(raw, lam, self.t_start, self.t_end)


# CTKD (Li et al. AAAI 2023), a modifier of the temperature-based methods: zhengli97/CTKD
# scripts/run_cifar_distill.sh and train_student.py (global temperature: --t_start 1 --t_end 20,
# Global_T initialised to 1; --cosine_decay 1 --decay_max 0 --decay_min -1 --decay_loops 10, i.e.
# lambda rises 0 -> 1 over 10 epochs). Its KD run uses -r 0.1 -a 0.9, kd's weights here.
CTKD_DEFAULTS = {"enabled": False, "t_start": 1.0, "t_end": 20.0, "init": 1.0, "lambda_start": 0.0,
                 "lambda_end": 1.0, "lambda_epochs": 10.0, "steps_per_epoch": None}


def _ctkd_fn(_student, _teacher, ctx, **kw):
    return CTKDTemperature(**kw, name="ctkd")(ctx)


def ctkd_term(h, num_data) -> Term:
    kw = {k: float(h[k]) for k in ("t_start", "t_end", "init", "lambda_start", "lambda_end", "lambda_epochs")}
    if kw["lambda_epochs"] <= 0:
        raise ValueError(f"distill.ctkd.lambda_epochs must be > 0, got {kw['lambda_epochs']}")
    spe = h["steps_per_epoch"]
    fn = functools.partial(_ctkd_fn, **kw, num_data=None if num_data is None else int(num_data),
                           steps_per_epoch=None if spe is None else int(spe))
    return Term("ctkd_temperature", fn, 0.0, (), (), provides_temperature=True)


def learned_temperature(fn):
    """A temperature-based term's fn that uses ctx.temperature (CTKD's) when it is set."""
    def with_learned_temperature(student, teacher, ctx, **kw):
        if ctx.temperature is not None:
            kw["temperature"] = ctx.temperature
        return fn(student, teacher, ctx, **kw)
    return with_learned_temperature
