"""Adversarial distillation: the `Discriminator` adapter and the method adv (a discriminator tells
the teacher's outputs from the student's; the student learns to fool it)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdjax import losses
from kdjax.distill.core import _as_names
from kdjax.distill.ensemble import _teacher_logits
from kdjax.distill.layers import Embed, _torch_bias, _torch_kernel
from kdjax.distill.registry import defaults, register, term


class Discriminator(nn.Module):
    """Adversarial distillation's discriminator: an MLP, (N, D) -> (N,) logits (real = teacher).

    Dense layers of `hidden` units, each followed by LeakyReLU(0.2), then Dense(1); PyTorch
    default initialisation. Neither Xu et al. (ICLR-W 2018) nor KDGAN (NeurIPS 2018; its official
    code's discriminator is an image classifier that scores sampled labels, another design) gives
    an MLP size that fits this setting, so the sizes are kdjax's choice (distill.adv.hidden,
    default 256,256) and the slope is the DCGAN convention. No BatchNorm (so no state besides the
    parameters); the real and the fake samples go through it as one concatenated batch."""

    hidden: tuple[int, ...] = (256, 256)
    negative_slope: float = 0.2

    @nn.compact
    def __call__(self, x):
        x = x.astype(jnp.float32)
        for i, h in enumerate(self.hidden):
            x = nn.Dense(h, kernel_init=_torch_kernel, bias_init=_torch_bias(x.shape[-1]), name=f"dense{i}")(x)
            x = nn.leaky_relu(x, self.negative_slope)
        x = nn.Dense(1, kernel_init=_torch_kernel, bias_init=_torch_bias(x.shape[-1]), name="out")(x)
        return x[:, 0]


def _pooled(x: jax.Array) -> jax.Array:
    """A feature as one vector per example: a map's spatial (middle) axes averaged away."""
    x = jnp.asarray(x).astype(jnp.float32)
    return x.mean(axis=tuple(range(1, x.ndim - 1))) if x.ndim > 2 else x


def _adv_fn(name, student, teacher, ctx, *, hidden, conditional, logits, num_classes):
    """Discriminator BCE (`losses.discriminator_bce`, teacher = real, student = fake).

    Minimax through a gradient-reversal layer (`losses.gradient_reversal`, lambda 1, as CTKD's
    temperature): the discriminator's parameters descend the BCE like every other adapter, while
    the student's input to it is reversed, so the student ascends the same BCE, i.e. it is trained
    to make its outputs indistinguishable from the teacher's, in the same optimizer step. The
    non-saturating generator loss (-log D(student)) would need the discriminator applied a second
    time with stopped parameters; the minimax form needs no second pass, keeps the logged value
    the discriminator's BCE (2 log 2 = 1.386 at chance), and its weak-gradient regime (the
    discriminator winning outright) is countered by the discriminator learning at the student's
    pace, not k steps ahead. The teacher's branch is a stop_gradient constant.

    Logits (the default features) enter as log-probabilities, log_softmax(z): a per-example
    constant offset of the logits carries no class information but would be an easy tell, and an
    ensemble's combined target (`ensemble_logits` at T = 1) is a log-probability already. Other
    features are pooled to (B, C) (`_pooled`); when the student's width differs from the
    teacher's, a linear `Embed` maps it to the teacher's width; it sits before the reversal, so it
    is part of the student's side and also ascends the BCE. Conditional (Xu et al.): the label's
    one-hot vector is appended to both inputs."""
    if isinstance(student, list) or isinstance(teacher, list):
        raise ValueError(f"{name} reads one student and one teacher feature; set distill.{name}.student / "
                         ".teacher to a single feature name")
    if logits:
        t = jax.nn.log_softmax(_teacher_logits(student, teacher, ctx).astype(jnp.float32), axis=-1)
        s = jax.nn.log_softmax(jnp.asarray(student).astype(jnp.float32), axis=-1)
    else:
        s, t = _pooled(student), _pooled(teacher)
    t = jax.lax.stop_gradient(t)
    if s.shape[-1] != t.shape[-1]:
        s = Embed(t.shape[-1], name=f"{name}_embed")(s)
    s = losses.gradient_reversal(s, jnp.ones((), jnp.float32))
    if conditional:
        k = s.shape[-1] if logits else num_classes
        if k is None:
            raise ValueError(f"{name}.conditional on a feature needs the number of classes: pass "
                             f"build_terms(..., dataset_labels=train_labels), or set distill.{name}.conditional=False")
        y = jax.nn.one_hot(ctx.labels, k, dtype=jnp.float32)
        s, t = jnp.concatenate([s, y], axis=-1), jnp.concatenate([t, y], axis=-1)
    d = Discriminator(hidden, name=f"{name}_discriminator")(jnp.concatenate([t, s], axis=0))
    return losses.discriminator_bce(d[:t.shape[0]], d[t.shape[0]:])


# Adversarial distillation: Xu, Hsu, Huang ICLR-W 2018 (a discriminator on the logits, conditioned
# on the label, trained against the student) and KDGAN (Wang et al. NeurIPS 2018). Neither has a
# reference code path this setting could follow (Xu et al. released none that we found; KDGAN's
# official xiaojiew94/KDGAN is a three-player Gumbel-softmax game with an image-classifier
# discriminator), so the defaults are kdjax's: weight 1, CE weight 1 (labels as well: on digits
# the adversarial term alone, CE 0, left the MLP student at chance, 0.08 test accuracy over 3
# seeds; combined, the largest CE weight of the methods applies, e.g. 1 for kd+adv), logits,
# conditional, hidden 256,256. One optimizer step trains both players (see _adv_fn).
@register("adv", paper="Xu, Hsu, Huang. Training Shallow and Thin Networks for Acceleration via Knowledge "
                       "Distillation with Conditional Adversarial Networks (ICLR-W 2018)",
          ce_weight=1.0, defaults=defaults(1.0, hidden="256,256", conditional=True), loss="discriminator_bce")
def _adv(h, temperature, data):
    items = h["hidden"].split(",") if isinstance(h["hidden"], str) else list(h["hidden"])
    try:
        hidden = tuple(int(x) for x in items if str(x).strip())
    except ValueError:
        hidden = ()
    if not hidden or min(hidden) <= 0:
        raise ValueError(f"distill.adv.hidden must be comma-separated positive layer widths, e.g. '256,256', "
                         f"got {h['hidden']!r}")
    labels = data.get("dataset_labels")
    logits = _as_names(h["student"]) == ("logits",) and _as_names(h["teacher"]) == ("logits",)
    fn = functools.partial(_adv_fn, "adv", hidden=hidden, conditional=bool(h["conditional"]), logits=logits,
                           num_classes=None if labels is None else int(np.max(labels)) + 1)
    return [term("adv", fn, h)]
