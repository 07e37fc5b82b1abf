"""Ensembles of teachers: the multi-teacher KD target of the logit terms (`ensemble_logits`) and the
trainer's ensemble settings (`ensemble_order`: which teacher's features the feature terms read,
and the weights)."""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.distill.core import Context, Term


def _normalized_weights(weights, n: int) -> jax.Array:
    if weights is None:
        return jnp.full((n,), 1.0 / n, jnp.float32)
    w = np.asarray(weights, np.float64)
    if w.shape != (n,):
        raise ValueError(f"{len(np.atleast_1d(w))} ensemble weights for {n} teachers; give one weight per teacher")
    if not (np.all(np.isfinite(w)) and np.all(w >= 0) and w.sum() > 0):
        raise ValueError(f"ensemble weights must be finite, >= 0 and not all 0, got {list(w)}")
    return jnp.asarray(w / w.sum(), jnp.float32)


def ensemble_logits(teacher_logits, temperature=1.0, weights=None) -> jax.Array:
    """Multi-teacher KD target: (B, n, K) logits of n teachers -> (B, K) logits z_ens with

        softmax(z_ens / T) = sum_i w_i softmax(z_i / T)      (w normalised to sum 1; None: 1/n)

    i.e. z_ens = T * log sum_i w_i softmax(z_i / T), computed as a log-sum-exp. A loss that
    softens z_ens at temperature T therefore sees the weighted average of the teachers' softened
    class probabilities at that T (not their average at T = 1, re-softened). `temperature` may be
    a traced scalar (CTKD's learned one). Any leading axes before the teacher axis 1 are kept
    ((B, n, T, V) -> (B, T, V))."""
    z = jnp.asarray(teacher_logits).astype(jnp.float32)
    w = _normalized_weights(weights, z.shape[1]).reshape((1, -1) + (1,) * (z.ndim - 2))
    logp = jax.nn.log_softmax(z / temperature, axis=-1)
    return temperature * jax.nn.logsumexp(logp, axis=1, b=w)


def _teacher_logits(student, teacher, ctx: Context, temperature=1.0):
    """The teacher's logits as a logit term reads them: an ensemble's (one more axis than the
    student's logits: the teacher axis 1) combined at `temperature`; one teacher's unchanged."""
    if jnp.ndim(teacher) == jnp.ndim(student) + 1:
        return ensemble_logits(teacher, temperature, ctx.teacher_weights)
    return teacher


def ensemble_order(num_teachers: int, terms: Sequence[Term], weights="",
                   feature_source: int | None = None) -> tuple[list[int], tuple[float, ...] | None]:
    """The trainer's ensemble settings -> (order of the teachers, their weights in that order).

    `weights`: ``config.teacher.ensemble_weights`` (comma-separated, one per teacher; '' or None:
    equal). `feature_source`: ``config.teacher.feature_source``, the index of the teacher whose
    non-logit features (stages, embedding, ...) the feature terms read; the teacher list is the
    trained or checkpoint teacher first (if any), then the runs of ``teacher.ensemble`` in order.
    kdjax.step.teacher_features takes those features from the first teacher, so that teacher is
    moved first (the weights follow it). With several teachers, a term that reads a teacher
    feature other than 'logits' and no `feature_source` is refused in one line: their features
    differ, and silently taking one teacher's would not be an ensemble. No teachers (a stage
    without a teacher): ([], None), nothing checked."""
    n = int(num_teachers)
    if n == 0:
        return [], None
    w = None
    if isinstance(weights, str):
        items = [x.strip() for x in weights.split(",") if x.strip()]
    else:
        items = list(weights or ())
    if items:
        try:
            values = [float(x) for x in items]
        except ValueError:
            raise ValueError(f"config.teacher.ensemble_weights={weights!r}: give comma-separated numbers, "
                             "one per teacher") from None
        if len(values) != n:
            raise ValueError(f"config.teacher.ensemble_weights has {len(values)} weights for {n} teacher(s) "
                             "(the trained or checkpoint teacher first, then teacher.ensemble in order)")
        if not all(math.isfinite(v) and v >= 0 for v in values) or sum(values) <= 0:
            raise ValueError(f"config.teacher.ensemble_weights must be finite numbers >= 0, not all 0; got {weights!r}")
        w = tuple(values)
    if feature_source is not None and not 0 <= int(feature_source) < max(n, 1):
        raise ValueError(f"config.teacher.feature_source={feature_source} is not a teacher index: there are {n} "
                         f"teacher(s), 0..{max(n, 1) - 1}")
    if n > 1 and feature_source is None:
        for t in terms:
            feats = [f for f in t.teacher if f != "logits"]
            if feats:
                raise ValueError(
                    f"term {t.name!r} reads the teacher's {', '.join(feats)}, but the teacher is an ensemble of {n} "
                    "models: set config.teacher.feature_source to the index of the one to read features from "
                    "(0 = the trained or checkpoint teacher, then teacher.ensemble in order)")
    order = list(range(n))
    if feature_source is not None and n > 1:
        order.remove(int(feature_source))
        order.insert(0, int(feature_source))
    if w is not None:
        w = tuple(w[i] for i in order)
    return order, w
