"""The method layer: a distillation config -> named, weighted loss terms.

A student's objective is a weighted sum of named terms (torchdistill's idea)::

    total = sum_i  weight_i * ramp_i(epoch) * term_i(student features, teacher features)

A *method* is a ready-made list of terms with the weights the reference code uses. Adding one
needs one loss function in `kdjax.losses` and one entry in `METHODS` below; nothing else changes.

Config (``config.distill``, built by `get_config`)::

    method        'kd'; several joined with '+' combine their terms ('kd+at'); 'ce' = labels only
    temperature   softening temperature shared by the logit methods whose own ``temperature``
                  is None (kd, dkd, dist); lskd, nkd and fm carry their reference temperature
                  (wttm has none: its teacher is power-transformed, its student at T = 1)
    logit_standardize  modifier: per-sample z-scored student and teacher logits for every term
                  that reads both (Sun et al. CVPR 2024), e.g. dkd + logit standardisation
    ctkd          modifier: ctkd.enabled learns the temperature of the temperature-based methods
                  (CTKD, Li et al. AAAI 2023: gradient reversal, cosine curriculum of lambda)
    ce_weight     weight of the hard-label cross-entropy; None -> the largest reference CE weight
                  of the chosen methods
    <method>      one sub-dict per method with its hyper-parameters, e.g. distill.kd.weight;
                  every method has weight, warmup_epochs, student, teacher (feature names)
    terms         extra custom terms: name -> dict(loss=<kdjax.losses function name>, weight=...,
                  student=<feature name(s)>, teacher=<...>, warmup_epochs=0, kwargs={...})

Feature names (``student`` / ``teacher``) are comma-separated strings (or tuples) of the names a
model sows (`kdjax.models.feature_names`); two patterns keep one default valid for every model
family: ``stage*`` = all ``stage<N>`` features in forward order (RepDistiller's ``feat[1:-1]``),
``stage[-1]`` = the last one (RepDistiller's ``feat[-2]``). E.g. 'stage*,embedding'.

Weight naming. RepDistiller writes ``gamma*CE + alpha*KD + beta*feature`` (flags -r, -a, -b),
mdistiller writes ``ce_weight*CE + kd_weight*KD``; here every term carries its own ``weight`` and
the CE weight is ``distill.ce_weight``, so "alpha" never has to be interpreted. RepDistiller's
feature methods run with -r 1 -a 0 -b <weight>: CE weight 1, no KD term, feature weight = -b.

Trainable adapters (regressors, embeddings, ...) are Linen modules created inside a term's
function; `Distiller` owns them, and the trainer optimises them together with the student. Their
BatchNorm statistics and the CRD memory bank are non-parameter collections of the Distiller
('batch_stats', 'crd_memory'), updated only when ``ctx.train`` is True. ``ctx.train`` True means
"inside the data-parallel step": the code runs under shard_map/pmap with axis `AXIS`, so adapter
BatchNorm is synchronised over it and the CRD memory update all-gathers the global batch.

Global batch. Batch-level terms (RKD, PKT, CC, SP, DIST, and custom terms with one of those
losses; ``Term.global_batch``) compare examples with each other, so inside the data-parallel step
the Distiller all-gathers their inputs (student and teacher features, labels, indices) over
`AXIS` and every device evaluates the term on the *global* batch: 1, 2 or 8 devices give the same
value and the same gradient. Gradient convention (kdjax.step): a device's loss is the mean of the
per-example terms over its own share plus the global-batch terms; the step then averages the
per-device gradients (pmean). The transpose of the all-gather sums every device's cotangent for
this device's share (D identical copies of the term, so D times its part of the gradient), and
the pmean divides by D again: the result is exactly the gradient of the global-batch term, with no
double counting. CRD is per example (its negatives come from the memory bank, which is updated
from the all-gathered batch; its normaliser Z is a global-batch mean), so it needs no gather.

Ensembles. With several teachers, the teacher's 'logits' (kdjax.step.teacher_features) carry a
teacher axis: (B, n, K). Every logit term combines them at its own temperature T (the learned one
under CTKD), as multi-teacher KD defines it: the target is the weighted average of the teachers'
softened distributions, sum_i w_i softmax(z_i / T) (`ensemble_logits`), with weights
``Context.teacher_weights`` (the Distiller's ``teacher_weights``; default equal). Terms without a
temperature (wttm, mse_logits, custom terms without one) combine at T = 1. With logit
standardisation each teacher is standardised first. Every other teacher feature is the first
teacher's: the trainer puts `teacher.feature_source` first, or refuses feature terms for an
ensemble (`ensemble_order`).

Two augmented views. With ``config.augment.views='weak,strong'`` the step also makes a strongly
augmented view of the batch (`kdjax.data.strong_augment`) and hands the terms its features under
``STRONG + name`` ('strong/logits', 'strong/stage*'); the unprefixed names stay the weak view's,
so a term that reads no 'strong/' feature is unchanged. A method whose terms read them (``Method
.views``: mlkd) without the views is refused in one line (`check_views`), as are views that no
term reads. MLKD's hard-label CE on the strong view is its own term, 'mlkd_ce_strong'.

What the trainer passes (`build_terms` keyword arguments): ``num_data`` (training-set size: rows of
the CRD memory) and ``dataset_labels`` (training labels: CRD draws negatives from other classes,
as RepDistiller's default 'exact' mode). Only CRD needs them; without them CRD fails at trace
time with a message saying so.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kdjax import losses

AXIS = "data"  # the data-parallel axis name (kdjax.step uses the same)
CRD_COLLECTION = "crd_memory"
CTKD_COLLECTION = "ctkd"  # CTKDTemperature's step count (its lambda curriculum's clock)


@dataclasses.dataclass(frozen=True)
class Context:
    """Per-batch inputs that a term may need besides the features."""

    labels: jax.Array  # (B,) int
    train: bool = True  # True: inside the data-parallel step (axis AXIS); adapters in train mode
    mix_perm: jax.Array | None = None  # mixup/cutmix partner of each example
    mix_lam: jax.Array | None = None  # weight of the example itself
    indices: jax.Array | None = None  # global data-set index of each example (CRD)
    rng: jax.Array | None = None  # for terms that sample (CRD negatives)
    # The learned distillation temperature (CTKD), set by the Distiller from its temperature term
    # before the other terms run; None: every term uses its configured temperature.
    temperature: jax.Array | None = None
    # Ensemble weights of the teachers along the teacher axis of the teacher's logits (normalised
    # to sum 1); None: equal weights. The Distiller sets it from its `teacher_weights`.
    teacher_weights: tuple[float, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Term:
    """One named, weighted term of the objective.

    fn(student, teacher, ctx) -> scalar, where `student`/`teacher` are the feature arrays named by
    `student`/`teacher` (a single array for one name, a list for several, None for no names;
    patterns such as 'stage*' are resolved against the model's features first).
    `weight` is multiplied by a linear ramp min(1, epoch / warmup_epochs) when warmup_epochs > 0.
    `paired`: the i-th student feature goes with the i-th teacher feature (counts must match).
    `provides_temperature`: fn(None, None, ctx) returns the learned temperature (CTKD) instead of
    a loss; the Distiller evaluates it first, hands it to the other terms as ctx.temperature and
    reports it (gradient stopped) as this term's value, which enters the total with weight 0.
    `global_batch`: a batch-level term (it relates the examples of a batch to each other); inside
    the data-parallel step (ctx.train) it is evaluated on the all-gathered global batch, on every
    device (see the module docstring for why the gradients come out right).

    Two-stage methods (the trainer's `student_init` stage trains the terms named in
    ``config.student_init.terms`` first, then the student stage starts from its student and
    adapters): `init_fn` is the term's objective in that stage instead of `fn` (FT's paraphraser
    reconstruction), with weight `init_weight` (None: `weight`); `init_only` drops the term from
    every later stage (FSP and AB: their student stage trains on labels only, as RepDistiller); a
    term with either must be named in ``student_init.terms``. `frozen` / `init_frozen`: what the optimizer keeps fixed in the student
    stage / in the student_init stage: names of adapter modules (top-level names in the Distiller's
    parameters, e.g. 'ft_paraphraser'), or 'student' for the student model (its parameters and
    BatchNorm statistics; FT's paraphraser pre-training). Fixed means no update at all, so weight
    decay and momentum do not move them either.
    """

    name: str
    fn: Callable[..., jax.Array]
    weight: float
    student: tuple[str, ...] = ("logits",)
    teacher: tuple[str, ...] = ()
    warmup_epochs: float = 0.0
    paired: bool = False
    provides_temperature: bool = False
    global_batch: bool = False
    init_fn: Callable[..., jax.Array] | None = None
    init_weight: float | None = None
    init_only: bool = False
    frozen: tuple[str, ...] = ()
    init_frozen: tuple[str, ...] = ()

    def weight_at(self, epoch: jax.Array) -> jax.Array:
        if self.warmup_epochs <= 0:
            return jnp.asarray(self.weight, jnp.float32)
        return self.weight * jnp.minimum(1.0, epoch / self.warmup_epochs)


# ----------------------------------------------------------------------------------------------
# Feature names and patterns.

_ALL = re.compile(r"^([A-Za-z_/]*[A-Za-z_])\*$")  # 'stage*'
_INDEX = re.compile(r"^([A-Za-z_/]*[A-Za-z_])\[(-?\d+)\]$")  # 'stage[-1]'


def _as_names(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(n.strip() for n in value.split(",") if n.strip())
    return tuple(n for v in value for n in _as_names(v))


def _numbered(stem: str, available) -> list[str]:
    found = []
    for n in available:
        rest = n[len(stem):]
        if n.startswith(stem) and rest.isdigit():
            found.append((int(rest), n))
    return [n for _, n in sorted(found)]


def resolve_features(names: Sequence[str], available) -> tuple[str, ...]:
    """Expands 'stem*' / 'stem[i]' patterns against the available feature names.

    Raises a one-line ValueError naming the available features when a name or pattern matches
    nothing."""
    available = list(available)
    out: list[str] = []
    for n in names:
        if m := _ALL.match(n):
            found = _numbered(m.group(1), available)
        elif m := _INDEX.match(n):
            numbered = _numbered(m.group(1), available)
            i = int(m.group(2))
            found = [numbered[i]] if -len(numbered) <= i < len(numbered) else []
        else:
            found = [n] if n in available else []
        if not found:
            raise ValueError(f"feature {n!r} matches none of: {', '.join(sorted(available))}")
        out.extend(found)
    return tuple(out)


def _pick(features: Mapping[str, jax.Array], names: tuple[str, ...]):
    if not names:
        return None
    names = resolve_features(names, features)
    if len(names) == 1:
        return features[names[0]]
    return [features[n] for n in names]


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


# Two augmented views (config.augment.views='weak,strong'): the step runs a model on both and
# hands the terms every feature twice, the weak view's under its own name and the strong view's
# under STRONG + name ('strong/logits', 'strong/stage2', 'strong/stage*' ...). A term reading no
# 'strong/' feature sees exactly what it sees without views; the strong view is computed only when
# some term reads it, and only for the model(s) whose strong features are read.
STRONG = "strong/"
VIEWS = ("", "weak,strong")  # config.augment.views: one view (off), or the weak and the strong one


def with_strong_view(features: Mapping[str, Any], strong: Mapping[str, Any]) -> dict:
    """The features of the weak view plus those of the strong view, renamed STRONG + name."""
    return {**features, **{STRONG + k: v for k, v in strong.items()}}


def reads_strong_view(terms: Sequence["Term"]) -> tuple[bool, bool]:
    """Whether any term reads a strong-view feature of (the student, the teacher)."""
    return (any(n.startswith(STRONG) for t in terms for n in t.student),
            any(n.startswith(STRONG) for t in terms for n in t.teacher))


def check_views(terms: Sequence["Term"], views) -> bool:
    """``config.augment.views`` -> whether the strong view is on; one-line ValueErrors for an
    unknown value, for terms that read the strong view without it, and for views no term reads."""
    views = ",".join(v.strip() for v in str(views or "").split(",") if v.strip())
    if views not in VIEWS:
        raise ValueError(f"unknown config.augment.views {views!r}; choose '' (one view) or 'weak,strong'")
    readers = [t.name for t in terms if any(n.startswith(STRONG) for n in t.student + t.teacher)]
    if readers and not views:
        methods = [n for n in readers if n in METHODS]  # (a method's extra terms: named after it)
        who = f"distill.method={methods[0]}" if methods else f"term {readers[0]!r}"
        raise ValueError(f"{who} needs two augmented views: set --config.augment.views=weak,strong")
    if views and not readers:
        raise ValueError("config.augment.views=weak,strong: no distillation term reads the strong view (features "
                         f"'{STRONG}<name>'); use a method that does ("
                         + ", ".join(n for n, m in METHODS.items() if m.views) + ") or set augment.views=''")
    return bool(views)


def _pairs(term: str, student, teacher) -> list[tuple[jax.Array, jax.Array]]:
    s, t = _as_list(student), _as_list(teacher)
    if len(s) != len(t):
        raise ValueError(
            f"term {term!r} pairs student and teacher features one to one, got {len(s)} student "
            f"and {len(t)} teacher features; set distill.{term}.student / .teacher"
        )
    return list(zip(s, t))


def global_batch(tree, ctx: Context):
    """This device's share of a batch-first pytree -> the global batch (all-gathered over `AXIS`)
    inside the data-parallel step (``ctx.train``); unchanged outside it."""
    if not ctx.train:
        return tree
    return jax.tree.map(lambda x: jax.lax.all_gather(x, AXIS, tiled=True), tree)


def _global_context(ctx: Context) -> Context:
    """The Context of the global batch: labels, indices and the mix partners all-gathered (a mix
    partner's index shifted by its device's offset)."""
    if not ctx.train:
        return ctx
    perm = ctx.mix_perm
    if perm is not None:
        perm = perm + jax.lax.axis_index(AXIS) * ctx.labels.shape[0]
    labels, indices, perm = global_batch((ctx.labels, ctx.indices, perm), ctx)
    return dataclasses.replace(ctx, labels=labels, indices=indices, mix_perm=perm)


class Distiller(nn.Module):
    """Evaluates every term; owns the terms' trainable adapters as sub-modules.

    `teacher_weights`: an ensemble's per-teacher weights, in the order of the teacher axis of the
    teacher's logits (None: equal); handed to the terms as ``ctx.teacher_weights``. Terms with
    ``global_batch`` see the all-gathered global batch inside the data-parallel step."""

    terms: tuple[Term, ...]
    teacher_weights: tuple[float, ...] | None = None

    @nn.compact
    def __call__(self, student_features, teacher_features, ctx: Context) -> dict[str, jax.Array]:
        if self.teacher_weights is not None and ctx.teacher_weights is None:
            ctx = dataclasses.replace(ctx, teacher_weights=tuple(self.teacher_weights))
        values = {}
        for t in self.terms:
            if t.provides_temperature:
                temperature = t.fn(None, None, ctx)
                ctx = dataclasses.replace(ctx, temperature=temperature)
                values[t.name] = jax.lax.stop_gradient(temperature)
        global_ctx = None
        for t in self.terms:
            if t.provides_temperature:
                continue
            student, teacher = _pick(student_features, t.student), _pick(teacher_features, t.teacher)
            if t.global_batch and ctx.train:
                if global_ctx is None:
                    global_ctx = _global_context(ctx)
                values[t.name] = t.fn(global_batch(student, ctx), global_batch(teacher, ctx), global_ctx)
            else:
                values[t.name] = t.fn(student, teacher, ctx)
        return {t.name: values[t.name] for t in self.terms}


# ----------------------------------------------------------------------------------------------
# Ensembles of teachers.


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


# ----------------------------------------------------------------------------------------------
# Adapter building blocks (NHWC). PyTorch default initialisation where the reference relies on
# it: weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

_torch_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_bias(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _batch_norm(ctx: Context, name: str) -> nn.BatchNorm:
    """PyTorch-default BatchNorm; batch statistics synchronised over AXIS when training."""
    return nn.BatchNorm(use_running_average=not ctx.train, momentum=0.9, epsilon=1e-5,
                        axis_name=AXIS if ctx.train else None, name=name)


def _resize_nearest(x: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """torch F.interpolate(mode='nearest') of an NHWC map: source index floor(i * in / out)."""
    h, w = x.shape[1:3]
    rows = (np.arange(hw[0]) * h) // hw[0]
    cols = (np.arange(hw[1]) * w) // hw[1]
    return x[:, rows][:, :, cols]


class Embed(nn.Module):
    """Linear projection of flattened features, optionally l2-normalised.

    RepDistiller ``LinearEmbed`` (normalize=False; torchdistill ``Linear4CCKD``) and ``Embed``
    (normalize=True; CRD)."""

    dim: int = 128
    normalize: bool = False

    @nn.compact
    def __call__(self, x):
        x = losses.relation.flatten(x)
        x = nn.Dense(self.dim, kernel_init=_torch_kernel, bias_init=_torch_bias(x.shape[-1]))(x)
        return losses.contrastive.normalize_embedding(x) if self.normalize else x


class ConvReg(nn.Module):
    """RepDistiller ``ConvReg`` (FitNets regressor): student map -> teacher's (H, W, C).

    conv 3x3 stride 2 when the student is twice as large, transposed conv 4x4 stride 2 when half
    as large, else a 'valid' conv of kernel (1 + Hs - Ht, 1 + Ws - Wt); then BatchNorm and ReLU."""

    teacher_shape: tuple[int, int, int]  # (H, W, C) of the target
    use_relu: bool = True
    term: str = "fitnet"  # the term it serves, for error messages

    @nn.compact
    def __call__(self, x, ctx: Context):
        _, sh, sw, sc = x.shape
        th, tw, tc = self.teacher_shape
        if sh == 2 * th:
            conv = nn.Conv(tc, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                           kernel_init=_torch_kernel, bias_init=_torch_bias(9 * sc), name="conv")
        elif 2 * sh == th:  # torch ConvTranspose2d(k=4, s=2, p=1) == flax padding k - 1 - p = 2
            conv = nn.ConvTranspose(tc, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)),
                                    kernel_init=_torch_kernel, bias_init=_torch_bias(16 * sc),
                                    name="conv")
        elif sh >= th and sw >= tw:
            k = (1 + sh - th, 1 + sw - tw)
            conv = nn.Conv(tc, k, padding="VALID", kernel_init=_torch_kernel,
                           bias_init=_torch_bias(k[0] * k[1] * sc), name="conv")
        else:
            raise ValueError(f"{self.term}: cannot regress a student map of size {sh}x{sw} to a teacher "
                             f"map of size {th}x{tw}; choose other distill.{self.term} features")
        y = _batch_norm(ctx, "bn")(conv(x.astype(jnp.float32)))
        if y.shape[1:] != tuple(self.teacher_shape):
            raise ValueError(f"{self.term}: regressed student map has shape {y.shape[1:]}, the teacher "
                             f"map {tuple(self.teacher_shape)}; choose other features")
        return nn.relu(y) if self.use_relu else y


class VIDRegressor(nn.Module):
    """RepDistiller ``VIDLoss`` adapter: 1x1 convs (no bias) in->mid->mid->out with ReLUs give the
    mean; variance = softplus(log_scale) + eps per channel, initialised to init_pred_var."""

    mid: int
    out: int
    init_pred_var: float = 5.0
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        x = x.astype(jnp.float32)
        for i, c in enumerate((self.mid, self.mid, self.out)):
            if i:
                x = nn.relu(x)
            x = nn.Conv(c, (1, 1), use_bias=False, kernel_init=_torch_kernel, name=f"conv{i}")(x)
        raw = math.log(math.expm1(self.init_pred_var - self.eps))
        log_scale = self.param("log_scale", nn.initializers.constant(raw), (self.out,))
        return x, jax.nn.softplus(log_scale) + self.eps


class ABF(nn.Module):
    """ReviewKD attention-based fusion (mdistiller ``ABF``), NHWC.

    conv1x1 + BN to `mid` channels; if `fuse`, mix with the upsampled residual of the deeper level
    by a 2-channel sigmoid attention; resize (nearest) to the teacher's size; conv3x3 + BN to
    `out` channels. Returns (output, residual for the next shallower level)."""

    mid: int
    out: int
    fuse: bool

    @nn.compact
    def __call__(self, x, residual, out_hw: tuple[int, int], ctx: Context):
        kaiming_a1 = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")  # kaiming_uniform(a=1)
        x = nn.Conv(self.mid, (1, 1), use_bias=False, kernel_init=kaiming_a1, name="conv1")(
            x.astype(jnp.float32))
        x = _batch_norm(ctx, "bn1")(x)
        if self.fuse:
            y = _resize_nearest(residual, x.shape[1:3])
            z = nn.Conv(2, (1, 1), kernel_init=_torch_kernel, bias_init=_torch_bias(2 * self.mid),
                        name="att_conv")(jnp.concatenate([x, y], axis=-1))
            z = jax.nn.sigmoid(z)
            x = x * z[..., 0:1] + y * z[..., 1:2]
        if tuple(x.shape[1:3]) != tuple(out_hw):
            x = _resize_nearest(x, out_hw)
        y = nn.Conv(self.out, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                    kernel_init=kaiming_a1, name="conv2")(x)
        return _batch_norm(ctx, "bn2")(y), x


def _conv3x3_stack(x, channels: Sequence[int], ctx: Context | None, transpose: bool = False, prefix: str = "conv"):
    """FT's paraphraser / translator body: per entry of `channels` a 3x3 stride-1 'same' conv
    (transposed conv if `transpose`: torch ConvTranspose2d(k=3, s=1, p=1)), BatchNorm when `ctx` is
    given, LeakyReLU(0.1); PyTorch default initialisation. Call inside a compact method."""
    for i, c in enumerate(channels):
        layer = nn.ConvTranspose if transpose else nn.Conv
        x = layer(c, (3, 3), padding=((1, 1), (1, 1)), kernel_init=_torch_kernel,
                  bias_init=_torch_bias(9 * x.shape[-1]), name=f"{prefix}{i}")(x)
        if ctx is not None:
            x = _batch_norm(ctx, f"{prefix}{i}_bn")(x)
        x = nn.leaky_relu(x, 0.1)
    return x


class Paraphraser(nn.Module):
    """FT's paraphraser (RepDistiller ``Paraphraser``, use_bn=False): an encoder of the teacher's
    map, convs C -> C -> kC -> kC, and a decoder, transposed convs kC -> kC -> C -> C. Returns the
    factor (encoder output), and with `decode` also the reconstruction."""

    rate: float = 0.5

    @nn.compact
    def __call__(self, x, decode: bool = False):
        c = x.shape[-1]
        out = int(c * self.rate)
        factor = _conv3x3_stack(x.astype(jnp.float32), (c, out, out), None, prefix="encoder")
        if not decode:
            return factor
        return factor, _conv3x3_stack(factor, (out, c, c), None, transpose=True, prefix="decoder")


class Translator(nn.Module):
    """FT's translator (RepDistiller ``Translator``, use_bn=True): the student's map through convs
    Cs -> Cs -> out -> out (out = rate x the teacher's channels), each with BatchNorm."""

    out: int

    @nn.compact
    def __call__(self, x, ctx: Context):
        return _conv3x3_stack(x.astype(jnp.float32), (x.shape[-1], self.out, self.out), ctx)


class CRD(nn.Module):
    """CRD head: student/teacher ``Embed`` (linear + l2 norm) and the memory bank.

    The memory (two (num_data, dim) banks and the normalisers Z, `losses.crd_init_memory`) lives in
    the non-parameter collection 'crd_memory'. Per example, negatives are drawn with a key folded
    from ctx.rng and the example's position in the global batch (device-count invariant). Scores use
    the bank before this batch's update (as RepDistiller); when ``ctx.train`` the banks are then
    updated with the all-gathered global batch, and Z (set once, from the first batch) is the
    global-batch mean, so the memory stays identical on every device."""

    num_data: int
    dim: int = 128
    num_negatives: int = 16384
    temperature: float = 0.07
    momentum: float = 0.5
    exclude_same_class: bool = True

    @nn.compact
    def __call__(self, student, teacher, ctx: Context, dataset_labels=None):
        if ctx.indices is None or ctx.rng is None:
            raise ValueError("crd needs ctx.indices (data-set index of each example) and ctx.rng")
        s = Embed(self.dim, normalize=True, name="embed_s")(student)
        t = Embed(self.dim, normalize=True, name="embed_t")(teacher)
        n, k = self.num_data, self.num_negatives
        init = None
        if not self.has_variable(CRD_COLLECTION, "bank_s"):
            init = losses.crd_init_memory(self.make_rng("params"), n, self.dim)
        state = {key: self.variable(CRD_COLLECTION, key, lambda key=key: init[key])
                 for key in ("bank_s", "bank_t", "z_s", "z_t")}
        memory = {key: v.value for key, v in state.items()}

        idx = jnp.asarray(ctx.indices, jnp.int32)
        b = idx.shape[0]
        offset = jax.lax.axis_index(AXIS) * b if ctx.train else 0
        keys = jax.vmap(lambda i: jax.random.fold_in(ctx.rng, i))(offset + jnp.arange(b))
        if self.exclude_same_class:
            if dataset_labels is None:
                raise ValueError("crd.exclude_same_class needs the training labels: pass "
                                 "build_terms(..., dataset_labels=train_labels), or set "
                                 "distill.crd.exclude_same_class=False")
            labels = jnp.asarray(dataset_labels, jnp.int32)
            neg = jax.vmap(lambda key, i, y: losses.crd_sample_negatives(
                key, i[None], n, k, labels=y[None], dataset_labels=labels)[0])(keys, idx, ctx.labels)
        else:
            neg = jax.vmap(lambda key, i: losses.crd_sample_negatives(key, i[None], n, k)[0])(keys, idx)

        if ctx.train:  # Z from the global batch, so that every device sets the same value
            full = jnp.concatenate([idx[:, None], neg], axis=1)

            def first_z(bank, emb):
                rows = bank[full]
                out = jnp.exp(jnp.einsum("bkd,bd->bk", rows, jax.lax.stop_gradient(emb),
                                         precision=jax.lax.Precision.HIGHEST) / self.temperature)
                return jax.lax.pmean(jnp.mean(out), AXIS) * n

            for z, bank, emb in (("z_s", "bank_t", s), ("z_t", "bank_s", t)):
                memory[z] = jax.lax.cond(memory[z] < 0, lambda bank=bank, emb=emb: first_z(memory[bank], emb),
                                         lambda z=z: memory[z])
        loss, memory = losses.crd_nce(s, t, memory, idx, neg, self.temperature)

        if ctx.train and self.is_mutable_collection(CRD_COLLECTION) and not self.is_initializing():
            gather = lambda x: jax.lax.all_gather(jax.lax.stop_gradient(x), AXIS, tiled=True)
            memory = losses.crd_update_memory(memory, gather(s), gather(t), gather(idx), self.momentum)
            for key, v in state.items():
                v.value = memory[key]
        return loss


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


# ----------------------------------------------------------------------------------------------
# Term functions. Each adapts one `kdjax.losses` function to (student, teacher, ctx).


def _ce_term(student_logits, _, ctx: Context, *, label_smoothing: float = 0.0):
    ce = functools.partial(losses.cross_entropy, student_logits, label_smoothing=label_smoothing)
    if ctx.mix_perm is None:
        return ce(ctx.labels)
    return ctx.mix_lam * ce(ctx.labels) + (1.0 - ctx.mix_lam) * ce(ctx.labels[ctx.mix_perm])


def _loss_term(loss_fn, student, teacher, _ctx, **kwargs):
    """A term that is just a `kdjax.losses` function of (student, teacher)."""
    return loss_fn(student, teacher, **kwargs)


def _logit_term(loss_fn, student, teacher, ctx, **kwargs):
    """A `kdjax.losses` function of (student logits, teacher logits); an ensemble's teachers are
    combined at the loss's `temperature` keyword (T = 1 without one), see `ensemble_logits`."""
    teacher = _teacher_logits(student, teacher, ctx, kwargs.get("temperature", 1.0))
    return loss_fn(student, teacher, **kwargs)


def _pairs_term(name, loss_fn, student, teacher, _ctx, **kwargs):
    """Sum of `loss_fn` over paired student/teacher features (RepDistiller sums the groups)."""
    return sum(loss_fn(s, t, **kwargs) for s, t in _pairs(name, student, teacher))


# ----------------------------------------------------------------------------------------------
# Ready-made methods.


@dataclasses.dataclass(frozen=True)
class Method:
    """A ready-made method: its default hyper-parameters and how they become terms.

    `build(h, temperature, data)` returns the method's terms (without the hard-label CE term, which
    the trainer adds with weight `ce_weight`). `h` is the method's sub-dict of the config merged
    over `defaults` (its keys are the only ones allowed); `temperature` the shared temperature;
    `data` = {'num_data': int | None, 'dataset_labels': array | None} from the trainer.
    `temperature`: the method's terms soften with a temperature (their fn takes a ``temperature=``
    keyword), which CTKD (``distill.ctkd.enabled``) replaces by its learned one.
    `views`: its terms read the strong augmented view ('strong/logits', ...), so it needs
    ``config.augment.views='weak,strong'``.
    """

    paper: str
    ce_weight: float
    defaults: Mapping[str, Any]
    build: Callable[[Mapping[str, Any], float, Mapping[str, Any]], list[Term]]
    temperature: bool = False
    views: bool = False  # its terms read the strong augmented view (config.augment.views)


def _defaults(weight, student="logits", teacher="logits", warmup_epochs=0.0, **extra):
    return {"weight": weight, "warmup_epochs": warmup_epochs, "student": student,
            "teacher": teacher, **extra}


def _term(name: str, fn, h, paired: bool = False, global_batch: bool = False) -> Term:
    return Term(name, fn, float(h["weight"]), _as_names(h["student"]), _as_names(h["teacher"]),
                float(h["warmup_epochs"]), paired, global_batch=global_batch)


def _temp(h, temperature: float) -> float:
    return float(temperature if h.get("temperature") is None else h["temperature"])


# --- logits -----------------------------------------------------------------------------------

# KD: Hinton, Vinyals, Dean 2015. RepDistiller `-r 0.1 -a 0.9 -b 0` (CE 0.1, KD 0.9), T = 4.
def _kd(h, temperature, data):
    return [_term("kd", functools.partial(_logit_term, losses.kd, temperature=_temp(h, temperature)), h)]


# DKD: Zhao et al. CVPR 2022; mdistiller configs/cifar100/dkd (CE_WEIGHT 1, ALPHA 1, BETA 8 for
# res32x4->res8x4, 2 for res56->res20 / res110->res32, 6 for wrn40_2/vgg13 pairs; T 4; the DKD
# weight warms up linearly over WARMUP = 20 epochs). alpha/beta are DKD's TCKD/NCKD weights.
def _dkd_fn(student, teacher, ctx, **kw):
    teacher = _teacher_logits(student, teacher, ctx, kw["temperature"])
    return losses.dkd(student, teacher, ctx.labels, **kw)


def _dkd(h, temperature, data):
    fn = functools.partial(_dkd_fn, alpha=float(h["alpha"]), beta=float(h["beta"]),
                           temperature=_temp(h, temperature))
    return [_term("dkd", fn, h)]


# DIST: Huang et al. NeurIPS 2022; hunto/image_classification_sota dist_cifar.yaml: CE 1
# (ori_loss_weight), DIST 2 (kd_loss_weight), 'dist_t4' = DIST(beta=1, gamma=1, tau=4).
# Global batch: its per-class (column) correlation is over the examples of the batch (the
# paper's "intra-class relation"; the per-sample "inter-class" part is per example), so the whole
# term is evaluated on the all-gathered global batch under data parallelism.
def _dist(h, temperature, data):
    fn = functools.partial(_logit_term, losses.dist, beta=float(h["beta"]), gamma=float(h["gamma"]),
                           temperature=_temp(h, temperature))
    return [_term("dist", fn, h, global_batch=True)]


# Logit standardisation: Sun et al. CVPR 2024; sunshangquan/logit-standardization-KD README
# (KD + --logit-stand --base-temp 2 --kd-weight 9, CE_WEIGHT 0.1 from its KD config). It is KD
# with the logit-standardisation modifier (the one `distill.logit_standardize` applies to any
# logit method) always on: losses.logit_standardized_kd, computed the same way.
def _standardize(logits):
    """losses.logit_standardize over the last axis of logits of any rank (an ensemble's (B, n, K):
    each teacher on its own)."""
    z = jnp.asarray(logits)
    return losses.logit_standardize(z.reshape(-1, z.shape[-1])).reshape(z.shape)


def _standardized(fn):
    """A logit term's fn on per-sample z-scored student and teacher logits (before its
    temperature; an ensemble's teachers each z-scored before they are combined); extra keywords
    (CTKD's learned temperature) pass through."""
    def term(student, teacher, ctx, **kw):
        return fn(_standardize(student), _standardize(teacher), ctx, **kw)
    term.standardized = True
    return term


def _lskd(h, temperature, data):
    fn = functools.partial(_logit_term, losses.kd, temperature=_temp(h, temperature))
    return [_term("lskd", _standardized(fn), h)]


# WTTM: Zheng & Yang ICLR 2024; zkxufo/TTM README's WTTM command (`--add wttm --ttm_l 0.2 -a 4`,
# CE weight -r 1, the train_student.py default): gamma 0.2, weight 4. The student is at T = 1
# and the teacher is power-transformed (gamma = 1/T), so the shared temperature does not apply.
def _wttm(h, temperature, data):
    return [_term("wttm", functools.partial(_logit_term, losses.wttm, gamma=float(h["gamma"])), h)]


# MLKD: Jin, Wang, Lin CVPR 2023; Jin-Ying/Multi-Level-Logit-Distillation KD_ours.py with the
# defaults of its mdistiller/engine/cfg.py (KD.TEMPERATURE 4, LOSS.CE_WEIGHT 0.1, LOSS.KD_WEIGHT
# 0.9: every one of its KD/CC/BC losses is weighted 0.9) and its configs/cifar100/ours/*.yaml
# (TRAINER 'ours': the weak and the strong view). Its CE is 0.1 x (CE(weak) + CE(strong)): the
# method's 'ce' term is the weak view's, its 'mlkd_ce_strong' term (weight strong_ce_weight) the
# strong view's. A batch-level term (medians, the B x B and K x K correlations): global batch.
def _mlkd_fn(student, teacher, ctx, *, temperatures, strong_temperatures, standardize=False):
    (sw, tw), (ss, ts) = _pairs("mlkd", student, teacher)  # (weak pair), (strong pair)
    if jnp.ndim(tw) == jnp.ndim(sw):  # one teacher
        return losses.mlkd(sw, ss, tw, ts, temperatures, strong_temperatures, standardize=standardize)
    # an ensemble: its teachers combined at each temperature; the masks from their T = 1 average
    # (with standardize, the combined logits are z-scored for the instance level)
    conf = _teacher_logits(sw, tw, ctx, 1.0)
    return sum(losses.mlkd(sw, ss, _teacher_logits(sw, tw, ctx, t), _teacher_logits(ss, ts, ctx, t), (t,),
                           tuple(x for x in strong_temperatures if float(x) == float(t)),
                           confidence_logits=conf, standardize=standardize) for t in temperatures)


def _mlkd(h, temperature, data):
    kw = {"temperatures": tuple(float(t) for t in _as_floats(h["temperatures"])),
          "strong_temperatures": tuple(float(t) for t in _as_floats(h["strong_temperatures"]))}
    if not kw["temperatures"] or min(kw["temperatures"]) <= 0:
        raise ValueError(f"distill.mlkd.temperatures must be temperatures > 0, got {h['temperatures']!r}")
    if not set(kw["strong_temperatures"]) <= set(kw["temperatures"]):
        raise ValueError(f"distill.mlkd.strong_temperatures={h['strong_temperatures']!r} must be among "
                         f"distill.mlkd.temperatures={h['temperatures']!r}")
    fn = functools.partial(_mlkd_fn, **kw)
    fn.logit_standardized = functools.partial(_mlkd_fn, **kw, standardize=True)
    ce = functools.partial(_ce_term, label_smoothing=0.0)
    return [Term("mlkd_ce_strong", ce, _check_weight("distill.mlkd.strong_ce_weight", h["strong_ce_weight"]),
                 (STRONG + "logits",), ()),
            _term("mlkd", fn, h, paired=True, global_batch=True)]


def _as_floats(value) -> list[float]:
    """'4,3,5' or (4, 3, 5) -> [4.0, 3.0, 5.0]."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return [float(x) for x in items if str(x).strip()]


# NKD: Yang et al. ICCV 2023; yzd-v/cls_KD configs/distillers/cifar100/res34_distill_res18_cifar.py
# (NKDLoss temp 3, gamma 3.5; the student's CE weight 1, NKD weight 1). Its ImageNet configs use
# temp 1, gamma 1.5 (the class defaults; DeiT: gamma 1). NKD carries its own temperature.
def _nkd_fn(student, teacher, ctx, **kw):
    teacher = _teacher_logits(student, teacher, ctx, kw["temperature"])
    return losses.nkd(student, teacher, ctx.labels, **kw)


def _nkd(h, temperature, data):
    fn = functools.partial(_nkd_fn, gamma=float(h["gamma"]), temperature=_temp(h, temperature))
    return [_term("nkd", fn, h)]


# SDD: Wei, Luo, Luo CVPR 2024; shicaiwei123/SDD-CVPR2024 README command (``--M [1,2,4]``: 1x1,
# 2x2, 4x4 cells) with mdistiller/engine/cfg.py's KD block for SD-KD (CE_WEIGHT 0.1, KD_WEIGHT
# 0.9, T 4; no warm-up, distillers/KD.py ``SDD_KD``), complementary regions weighted 2. base='dkd'
# is SD-DKD (distillers/SDD_DKD.py: DKD's CE 1, alpha 1, beta 8, T 4, linear warm-up over
# tools/train_origin.py's --warm_up 30 epochs): set distill.sdd.weight=1, warmup_epochs=30 and
# distill.ce_weight=1 with it. Reads both models' 'class_map' (the on-request class activation
# map; `losses.multiscale_logits` pools it into the cells' logits).
def _sdd_fn(student, teacher, ctx, **kw):
    scales = kw.pop("scales")
    return losses.sdd(losses.multiscale_logits(student, scales), losses.multiscale_logits(teacher, scales),
                      ctx.labels, **kw)


def _sdd(h, temperature, data):
    scales = h["scales"]
    if isinstance(scales, str):
        scales = [x for x in scales.replace("(", "").replace(")", "").split(",") if x.strip()]
    try:
        scales = tuple(int(x) for x in scales)
    except (TypeError, ValueError):
        scales = ()
    if not scales or min(scales) < 1:
        raise ValueError(f"distill.sdd.scales must be positive integers, e.g. (1, 2, 4), got {h['scales']!r}")
    if h["base"] not in ("kd", "dkd"):
        raise ValueError(f"distill.sdd.base must be 'kd' or 'dkd', got {h['base']!r}")
    fn = functools.partial(_sdd_fn, scales=scales, base=h["base"], temperature=_temp(h, temperature),
                           alpha=float(h["alpha"]), beta=float(h["beta"]),
                           complementary_weight=float(h["complementary_weight"]))
    return [_term("sdd", fn, h)]


# Function matching, Beyer et al. CVPR 2022 (big_vision proj/distill): no labels (CE 0).
# mse_logits = big_vision distance 'l2'; fm = distance 'kl' with t=1 (bit_i1k.py), i.e. KL of the
# softened distributions without kd's T^2 factor (identical to kd at T = 1).
def _mse_logits(h, temperature, data):
    return [_term("mse_logits", functools.partial(_logit_term, losses.mse_logits), h)]


def _fm_fn(student, teacher, ctx, temperature):
    teacher = _teacher_logits(student, teacher, ctx, temperature)
    return losses.kd(student, teacher, temperature) / temperature**2


def _fm(h, temperature, data):
    return [_term("fm", functools.partial(_fm_fn, temperature=_temp(h, temperature)), h)]


# --- feature maps -----------------------------------------------------------------------------

# FitNets: Romero et al. ICLR 2015; RepDistiller `--distill hint -a 0 -b 100`, hint_layer 2
# (= stage2), regressor ConvReg (trained with the student).
def _fitnet_fn(name, student, teacher, ctx, use_relu):
    s = ConvReg(tuple(teacher.shape[1:]), use_relu, name=f"{name}_regressor")(student, ctx)
    return losses.fitnet(s, teacher)


def _fitnet(h, temperature, data):
    return [_term("fitnet", functools.partial(_fitnet_fn, "fitnet", use_relu=bool(h["use_relu"])), h)]


# OFD: Heo et al. ICCV 2019; clovaai/overhaul-distillation CIFAR-100/distiller.py and
# train_with_distillation.py (``loss_CE + loss_distill.sum() / batch_size / 1000``: CE 1, weight
# 1e-3 on the per-example sum; mdistiller configs/cifar100/ofd.yaml + engine/cfg.py OFD: CE_WEIGHT
# 1, FEAT_WEIGHT 0.001, connector kernel 1). Every stage's pre-ReLU map (the models' on-request
# 'preact' features); the margins come from the teacher's BatchNorm before each ReLU
# (``preact_margin<N>``, `losses.ofd_margin`); stage i of n is weighted 1 / 2^(n-1-i). When the
# stage counts differ, the last min(n_s, n_t) stages of each are paired (mdistiller
# ``_align_list``) and a teacher map of another size is adaptive-average-pooled to the student's
# (mdistiller ``ofd_loss``; the official code requires equal sizes).
class OFDConnector(nn.Module):
    """OFD's connector: 1x1 conv (no bias, N(0, 2 / out_channels) init) + BatchNorm (scale 1,
    bias 0), student channels -> teacher channels (clovaai ``build_feature_connector``)."""

    out: int

    @nn.compact
    def __call__(self, x, ctx: Context):
        init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
        x = nn.Conv(self.out, (1, 1), use_bias=False, kernel_init=init, name="conv")(x.astype(jnp.float32))
        return _batch_norm(ctx, "bn")(x)


def _ofd_fn(name, student, teacher, ctx):
    s_maps, t_all = _as_list(student), _as_list(teacher)
    if len(t_all) % 2:
        raise ValueError(f"{name}: the teacher features must be the pre-ReLU maps followed by as many "
                         f"margins (e.g. 'preact_stage*,preact_margin*'), got {len(t_all)} features")
    t_maps, margins = t_all[: len(t_all) // 2], t_all[len(t_all) // 2:]
    n = min(len(s_maps), len(t_maps))
    s_maps, t_maps, margins = s_maps[-n:], t_maps[-n:], margins[-n:]
    total = 0.0
    for i, (s, t, m) in enumerate(zip(s_maps, t_maps, margins)):
        if s.ndim != 4 or t.ndim != 4:
            raise ValueError(f"{name}: needs (B, H, W, C) feature maps, got student {s.shape} and teacher {t.shape}")
        s = OFDConnector(t.shape[-1], name=f"{name}_connector{i}")(s, ctx)
        t = losses.feature.adaptive_avg_pool(t.astype(jnp.float32), s.shape[1:3])
        total = total + losses.ofd(s, t, m) / 2.0 ** (n - 1 - i)
    return total


def _ofd(h, temperature, data):
    return [_term("ofd", functools.partial(_ofd_fn, "ofd"), h)]


# AT: Zagoruyko & Komodakis ICLR 2017; RepDistiller `--distill attention -a 0 -b 1000`, p = 2,
# summed over feat[1:-1] (every stage).
def _at(h, temperature, data):
    fn = functools.partial(_pairs_term, "at", losses.attention_transfer, p=float(h["p"]))
    return [_term("at", fn, h, paired=True)]


# SP: Tung & Mori ICCV 2019; RepDistiller `--distill similarity -a 0 -b 3000` on feat[-2] (last stage).
# Global batch: the B x B Gram matrices are over the all-gathered batch under data parallelism.
def _sp(h, temperature, data):
    return [_term("sp", functools.partial(_pairs_term, "sp", losses.similarity_preserving), h, paired=True,
                  global_batch=True)]


# NST: Huang & Wang 2017; RepDistiller `--distill nst -a 0 -b 50`, summed over feat[1:-1].
def _nst(h, temperature, data):
    return [_term("nst", functools.partial(_pairs_term, "nst", losses.nst), h, paired=True)]


# VID: Ahn et al. CVPR 2019; RepDistiller `--distill vid -a 0 -b 1`, one VIDLoss(s, t, t) per
# stage in feat[1:-1] (mid channels = teacher channels, init_pred_var 5), summed. The larger map
# is average-pooled to the smaller one before the regressor, as in the reference.
def _vid_fn(name, student, teacher, ctx, init_pred_var, eps):
    total = 0.0
    for i, (s, t) in enumerate(_pairs(name, student, teacher)):
        s, t = losses.feature.pool_to_common(s.astype(jnp.float32), t.astype(jnp.float32))
        c = t.shape[-1]
        mean, var = VIDRegressor(c, c, init_pred_var, eps, name=f"{name}_regressor{i}")(s)
        total = total + losses.vid(mean, t, var)
    return total


def _vid(h, temperature, data):
    fn = functools.partial(_vid_fn, "vid", init_pred_var=float(h["init_pred_var"]), eps=float(h["eps"]))
    return [_term("vid", fn, h, paired=True)]


# ReviewKD: Chen et al. CVPR 2021; mdistiller ReviewKD (CE_WEIGHT 1, REVIEWKD_WEIGHT 1, linear
# warm-up over 20 epochs; levels = stages + pooled embedding as a 1x1 map, fused deepest first by
# ABF modules with mid channels min(512, student embedding dim); loss hcl).
def _reviewkd_fn(name, student, teacher, ctx, mid_channels):
    as_map = lambda f: f.reshape(f.shape[0], 1, 1, -1) if f.ndim == 2 else f
    pairs = [(as_map(s), as_map(t)) for s, t in _pairs(name, student, teacher)]
    mid = int(mid_channels or min(512, pairs[-1][0].shape[-1]))
    outs, residual = [], None
    for level in reversed(range(len(pairs))):
        s, t = pairs[level]
        abf = ABF(mid, t.shape[-1], fuse=residual is not None, name=f"{name}_abf{level}")
        out, residual = abf(s, residual, t.shape[1:3], ctx)
        outs.insert(0, out)
    return losses.hcl(outs, [t for _, t in pairs])


def _reviewkd(h, temperature, data):
    fn = functools.partial(_reviewkd_fn, "reviewkd", mid_channels=h["mid_channels"])
    return [_term("reviewkd", fn, h, paired=True)]


# KDSVD: Lee et al. ECCV 2018; mdistiller configs/cifar100/kdsvd.yaml with mdistiller/engine/cfg.py
# (KDSVD.K 1, LOSS.CE_WEIGHT 1, LOSS.FEAT_WEIGHT 1) on feats[1:] (every stage). Its student needs
# the teacher's width at every stage (see losses.kdsvd).
def _kdsvd(h, temperature, data):
    return [_term("kdsvd", functools.partial(_loss_term, losses.kdsvd, k=int(h["k"])), h, paired=True)]


# Init-only terms (FSP, AB): RepDistiller train_student.py trains them in its init stage
# (helper/pretrain.py, --init_epochs 30, the summed loss group with weight 1), then distils with
# CE only: its loops.py sets loss_kd = 0 for them, so -a 0 -b <x> is CE alone. Here: the term is
# trained in the student_init stage (student_init.terms), and the student stage has CE only.
# FSP: Yim et al. CVPR 2017; RepDistiller `--distill fsp -a 0 -b 50` on feat[:-1]. kdjax models sow
# no stem feature, so the maps are the stages ('stage*': RepDistiller's feat[1:-1]); the reference
# also relates the stem to the first stage.
def _fsp(h, temperature, data):
    return [dataclasses.replace(_term("fsp", functools.partial(_loss_term, losses.fsp), h, paired=True),
                                init_only=True)]


# AB: Heo et al. AAAI 2019; RepDistiller `--distill abound -a 0 -b 1` (CE only after the init
# stage, see above): ABLoss(margin 1) on feat[1:-1] (every stage), each student map through a
# Connector: identity when its channels and size equal the teacher's, else ConvReg without ReLU.
# The reference reads pre-ReLU maps (preact=True); kdjax models sow post-ReLU stage maps.
def _ab_fn(name, student, teacher, ctx, margin):
    pairs = _pairs(name, student, teacher)
    out = []
    for i, (s, t) in enumerate(pairs):
        if s.shape[-1] != t.shape[-1] or s.shape[1] != t.shape[1]:
            s = ConvReg(tuple(t.shape[1:]), use_relu=False, term=name, name=f"{name}_connector{i}")(s, ctx)
        out.append(s)
    return losses.activation_boundary(out, [t for _, t in pairs], margin=margin)


def _ab(h, temperature, data):
    fn = functools.partial(_ab_fn, "ab", margin=float(h["margin"]))
    return [dataclasses.replace(_term("ab", fn, h, paired=True), init_only=True)]


# FT: Kim et al. NeurIPS 2018; RepDistiller `--distill factor -a 0 -b 200` on feat[-2] (the last
# stage): Paraphraser(rate 0.5) pre-trained in the init stage on the teacher's map alone (MSE
# reconstruction, weight 1, at lr 0.01 where kdjax uses the student's rate; the student is not
# trained), then frozen while the student and its
# Translator(rate 0.5) learn with FactorTransfer(p1 2, p2 1).
def _ft_fn(name, student, teacher, ctx, rate, p1, p2):
    factor_t = Paraphraser(rate, name=f"{name}_paraphraser")(teacher)
    factor_s = Translator(int(teacher.shape[-1] * rate), name=f"{name}_translator")(student, ctx)
    return losses.factor_transfer(factor_s, factor_t, p1=p1, p2=p2)


def _ft_init_fn(name, student, teacher, ctx, rate):
    _, rec = Paraphraser(rate, name=f"{name}_paraphraser")(teacher, decode=True)
    return losses.fitnet(rec, teacher)  # nn.MSELoss(): mean squared error


def _ft(h, temperature, data):
    rate = float(h["rate"])
    fn = functools.partial(_ft_fn, "ft", rate=rate, p1=float(h["p1"]), p2=float(h["p2"]))
    init_fn = functools.partial(_ft_init_fn, "ft", rate=rate)
    return [dataclasses.replace(_term("ft", fn, h), init_fn=init_fn, init_weight=1.0, frozen=("ft_paraphraser",),
                                init_frozen=("student",))]


# --- embeddings -------------------------------------------------------------------------------

# RKD: Park et al. CVPR 2019; RepDistiller `--distill rkd -a 0 -b 1` on feat[-1] (pooled
# embedding), RKDLoss(w_d=25, w_a=50). Global batch: distances and angles between all pairs and
# triplets of the all-gathered batch under data parallelism.
def _rkd(h, temperature, data):
    fn = functools.partial(_loss_term, losses.rkd, distance_weight=float(h["distance_weight"]),
                           angle_weight=float(h["angle_weight"]))
    return [_term("rkd", fn, h, global_batch=True)]


# PKT: Passalis & Tefas ECCV 2018; RepDistiller `--distill pkt -a 0 -b 30000` on feat[-1].
# Global batch: the B x B similarity distributions are over the all-gathered batch.
def _pkt(h, temperature, data):
    return [_term("pkt", functools.partial(_loss_term, losses.pkt), h, global_batch=True)]


# CC: Peng et al. ICCV 2019, as torchdistill CCKDLoss (configs/sample/ilsvrc2012/cckd: trainable
# Linear(D, 128) on the student's and the teacher's pooled embedding, gaussian kernel gamma 0.4,
# max_p 2, weight 0.003, CE 1). RepDistiller's CC (-b 0.02) uses a different loss formula, so its
# weight does not apply to `losses.correlation_congruence`. Global batch: the B x B correlation
# matrices are over the all-gathered batch (the embeddings are projected after the gather).
def _cc_fn(name, student, teacher, ctx, dim, gamma, order, normalize):
    s = Embed(dim, name=f"{name}_embed_s")(student)
    t = Embed(dim, name=f"{name}_embed_t")(teacher)
    return losses.correlation_congruence(s, t, gamma=gamma, order=order, normalize=normalize)


def _cc(h, temperature, data):
    fn = functools.partial(_cc_fn, "cc", dim=int(h["dim"]), gamma=float(h["gamma"]),
                           order=int(h["order"]), normalize=bool(h["normalize"]))
    return [_term("cc", fn, h, global_batch=True)]


# CRD: Tian et al. ICLR 2020; RepDistiller `--distill crd -a 0 -b 0.8` (CRD+KD: -a 1), feat_dim
# 128, nce_k 16384, nce_t 0.07, nce_m 0.5, mode 'exact' (negatives from other classes). Combine
# with KD as 'crd+kd' and distill.kd.weight=1.0 for RepDistiller's CRD+KD.
def _crd_fn(name, student, teacher, ctx, *, head_kwargs, dataset_labels):
    if head_kwargs["num_data"] is None:
        raise ValueError("crd needs the training-set size: pass build_terms(..., num_data=N) "
                         "or set distill.crd.num_data")
    return CRD(**head_kwargs, name=name)(student, teacher, ctx, dataset_labels)


def _crd(h, temperature, data):
    labels = data.get("dataset_labels")
    labels = None if labels is None else np.asarray(labels, np.int32)
    num_data = h["num_data"] if h["num_data"] is not None else data.get("num_data")
    if num_data is None and labels is not None:
        num_data = len(labels)
    if labels is not None and len(labels) != num_data:
        raise ValueError(f"crd: dataset_labels has {len(labels)} entries but num_data is {num_data}")
    k = h["num_negatives"]
    if num_data is not None:
        allowed = int(num_data) - 1
        if h["exclude_same_class"] and labels is not None:
            allowed = int(num_data) - int(np.bincount(labels).max())
        k = min(int(k), allowed)
    head = {"num_data": None if num_data is None else int(num_data), "dim": int(h["dim"]),
            "num_negatives": int(k), "temperature": float(h["temperature"]),
            "momentum": float(h["momentum"]), "exclude_same_class": bool(h["exclude_same_class"])}
    fn = functools.partial(_crd_fn, "crd", head_kwargs=head, dataset_labels=labels)
    return [_term("crd", fn, h)]


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
    return [_term("adv", fn, h)]


METHODS: dict[str, Method] = {
    "kd": Method(
        paper="Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network (2015)",
        ce_weight=0.1, defaults=_defaults(0.9, temperature=None), build=_kd, temperature=True),
    "dkd": Method(
        paper="Zhao, Cui, Song, Qiu, Liang. Decoupled Knowledge Distillation (CVPR 2022)",
        ce_weight=1.0, defaults=_defaults(1.0, warmup_epochs=20.0, alpha=1.0, beta=8.0, temperature=None),
        build=_dkd, temperature=True),
    "dist": Method(
        paper="Huang, You, Wang, Qian, Xu. Knowledge Distillation from A Stronger Teacher (NeurIPS 2022)",
        ce_weight=1.0, defaults=_defaults(2.0, beta=1.0, gamma=1.0, temperature=None), build=_dist,
        temperature=True),
    "lskd": Method(
        paper="Sun, Ren, Li, Wang, Cao. Logit Standardization in Knowledge Distillation (CVPR 2024)",
        ce_weight=0.1, defaults=_defaults(9.0, temperature=2.0), build=_lskd, temperature=True),
    "wttm": Method(
        paper="Zheng, Yang. Knowledge Distillation Based on Transformed Teacher Matching (ICLR 2024)",
        ce_weight=1.0, defaults=_defaults(4.0, gamma=0.2), build=_wttm),
    "mlkd": Method(
        paper="Jin, Wang, Lin. Multi-Level Logit Distillation (CVPR 2023)",
        ce_weight=0.1,
        defaults=_defaults(0.9, "logits,strong/logits", "logits,strong/logits", temperatures="4,3,5,2,6",
                           strong_temperatures="4,3,5", strong_ce_weight=0.1),
        build=_mlkd, views=True),
    "nkd": Method(
        paper="Yang, Zeng, Yuan, Li. From Knowledge Distillation to Self-Knowledge Distillation: A Unified "
              "Approach with Normalized Loss and Customized Soft Labels (ICCV 2023)",
        ce_weight=1.0, defaults=_defaults(1.0, gamma=3.5, temperature=3.0), build=_nkd, temperature=True),
    "sdd": Method(
        paper="Wei, Luo, Luo. Scale Decoupled Distillation (CVPR 2024)",
        ce_weight=0.1,
        defaults=_defaults(0.9, "class_map", "class_map", scales=(1, 2, 4), base="kd", temperature=None,
                           alpha=1.0, beta=8.0, complementary_weight=2.0),
        build=_sdd, temperature=True),
    "mse_logits": Method(
        paper="Beyer et al. Knowledge distillation: A good teacher is patient and consistent (CVPR 2022)",
        ce_weight=0.0, defaults=_defaults(1.0), build=_mse_logits),
    "fm": Method(
        paper="Beyer et al. Knowledge distillation: A good teacher is patient and consistent (CVPR 2022)",
        ce_weight=0.0, defaults=_defaults(1.0, temperature=1.0), build=_fm, temperature=True),
    "fitnet": Method(
        paper="Romero et al. FitNets: Hints for Thin Deep Nets (ICLR 2015)",
        ce_weight=1.0, defaults=_defaults(100.0, "stage2", "stage2", use_relu=True), build=_fitnet),
    "ofd": Method(
        paper="Heo, Kim, Yun, Park, Kwak, Choi. A Comprehensive Overhaul of Feature Distillation (ICCV 2019)",
        ce_weight=1.0, defaults=_defaults(0.001, "preact_stage*", "preact_stage*,preact_margin*"), build=_ofd),
    "at": Method(
        paper="Zagoruyko, Komodakis. Paying More Attention to Attention (ICLR 2017)",
        ce_weight=1.0, defaults=_defaults(1000.0, "stage*", "stage*", p=2.0), build=_at),
    "sp": Method(
        paper="Tung, Mori. Similarity-Preserving Knowledge Distillation (ICCV 2019)",
        ce_weight=1.0, defaults=_defaults(3000.0, "stage[-1]", "stage[-1]"), build=_sp),
    "nst": Method(
        paper="Huang, Wang. Like What You Like: Knowledge Distill via Neuron Selectivity Transfer (2017)",
        ce_weight=1.0, defaults=_defaults(50.0, "stage*", "stage*"), build=_nst),
    "vid": Method(
        paper="Ahn et al. Variational Information Distillation for Knowledge Transfer (CVPR 2019)",
        ce_weight=1.0, defaults=_defaults(1.0, "stage*", "stage*", init_pred_var=5.0, eps=1e-5),
        build=_vid),
    "reviewkd": Method(
        paper="Chen, Liu, Zhao, Jia. Distilling Knowledge via Knowledge Review (CVPR 2021)",
        ce_weight=1.0,
        defaults=_defaults(1.0, "stage*,embedding", "stage*,embedding", warmup_epochs=20.0,
                           mid_channels=None),
        build=_reviewkd),
    "kdsvd": Method(
        paper="Lee, Kim, Song. Self-supervised Knowledge Distillation Using Singular Value Decomposition (ECCV 2018)",
        ce_weight=1.0, defaults=_defaults(1.0, "stage*", "stage*", k=1), build=_kdsvd),
    "fsp": Method(
        paper="Yim, Joo, Bae, Kim. A Gift from Knowledge Distillation: Fast Optimization, Network Minimization "
              "and Transfer Learning (CVPR 2017)",
        ce_weight=1.0, defaults=_defaults(1.0, "stage*", "stage*"), build=_fsp),
    "ab": Method(
        paper="Heo, Lee, Yun, Choi. Knowledge Transfer via Distillation of Activation Boundaries Formed by "
              "Hidden Neurons (AAAI 2019)",
        ce_weight=1.0, defaults=_defaults(1.0, "stage*", "stage*", margin=1.0), build=_ab),
    "ft": Method(
        paper="Kim, Park, Kwak. Paraphrasing Complex Network: Network Compression via Factor Transfer (NeurIPS 2018)",
        ce_weight=1.0, defaults=_defaults(200.0, "stage[-1]", "stage[-1]", rate=0.5, p1=2.0, p2=1.0),
        build=_ft),
    "rkd": Method(
        paper="Park, Kim, Lu, Cho. Relational Knowledge Distillation (CVPR 2019)",
        ce_weight=1.0,
        defaults=_defaults(1.0, "embedding", "embedding", distance_weight=25.0, angle_weight=50.0),
        build=_rkd),
    "pkt": Method(
        paper="Passalis, Tefas. Learning Deep Representations with Probabilistic Knowledge Transfer (ECCV 2018)",
        ce_weight=1.0, defaults=_defaults(30000.0, "embedding", "embedding"), build=_pkt),
    "cc": Method(
        paper="Peng et al. Correlation Congruence for Knowledge Distillation (ICCV 2019)",
        ce_weight=1.0,
        defaults=_defaults(0.003, "embedding", "embedding", dim=128, gamma=0.4, order=2, normalize=False),
        build=_cc),
    "crd": Method(
        paper="Tian, Krishnan, Isola. Contrastive Representation Distillation (ICLR 2020)",
        ce_weight=1.0,
        defaults=_defaults(0.8, "embedding", "embedding", dim=128, num_negatives=16384,
                           temperature=0.07, momentum=0.5, exclude_same_class=True, num_data=None),
        build=_crd),
    "adv": Method(
        paper="Xu, Hsu, Huang. Training Shallow and Thin Networks for Acceleration via Knowledge Distillation "
              "with Conditional Adversarial Networks (ICLR-W 2018)",
        ce_weight=1.0, defaults=_defaults(1.0, hidden="256,256", conditional=True), build=_adv),
    # Labels only: the teacher / from-scratch objective.
    "ce": Method(paper="(no distillation)", ce_weight=1.0, defaults={}, build=lambda h, t, d: []),
}


# CTKD (Li et al. AAAI 2023), a modifier of the temperature-based methods: zhengli97/CTKD
# scripts/run_cifar_distill.sh and train_student.py (global temperature: --t_start 1 --t_end 20,
# Global_T initialised to 1; --cosine_decay 1 --decay_max 0 --decay_min -1 --decay_loops 10, i.e.
# lambda rises 0 -> 1 over 10 epochs). Its KD run uses -r 0.1 -a 0.9, kd's weights here.
CTKD_DEFAULTS = {"enabled": False, "t_start": 1.0, "t_end": 20.0, "init": 1.0, "lambda_start": 0.0,
                 "lambda_end": 1.0, "lambda_epochs": 10.0, "steps_per_epoch": None}


def _ctkd_fn(_student, _teacher, ctx, **kw):
    return CTKDTemperature(**kw, name="ctkd")(ctx)


def _ctkd_term(h, num_data) -> Term:
    kw = {k: float(h[k]) for k in ("t_start", "t_end", "init", "lambda_start", "lambda_end", "lambda_epochs")}
    if kw["lambda_epochs"] <= 0:
        raise ValueError(f"distill.ctkd.lambda_epochs must be > 0, got {kw['lambda_epochs']}")
    spe = h["steps_per_epoch"]
    fn = functools.partial(_ctkd_fn, **kw, num_data=None if num_data is None else int(num_data),
                           steps_per_epoch=None if spe is None else int(spe))
    return Term("ctkd_temperature", fn, 0.0, (), (), provides_temperature=True)


def _learned_temperature(fn):
    """A temperature-based term's fn that uses ctx.temperature (CTKD's) when it is set."""
    def term(student, teacher, ctx, **kw):
        if ctx.temperature is not None:
            kw["temperature"] = ctx.temperature
        return fn(student, teacher, ctx, **kw)
    term.standardized = getattr(fn, "standardized", False)
    return term


def get_config(method: str = "kd") -> ml_collections.ConfigDict:
    """The `config.distill` block: the chosen method plus every method's default sub-dict."""
    cfg = ml_collections.ConfigDict()
    cfg.method = method
    cfg.temperature = 4.0
    cfg.ce_weight = ml_collections.config_dict.placeholder(float)
    # Frozen teacher outputs computed once and reused every epoch: 'auto' (when the teacher's input
    # is the same every epoch, i.e. no augmentation, and they fit in memory), 'on' (refused with one
    # line when invalid), 'off'. See kdjax.train.Stage._teacher_cache.
    cfg.cache_teacher = "auto"
    # Modifiers of the logit methods (not methods; they change the chosen methods' terms):
    # logit_standardize: z-score the student's and the teacher's logits per sample before every
    #   term that reads both (kd, dkd, dist, wttm, nkd, mse_logits, fm, custom terms), as the
    #   reference's --logit-stand (Sun et al. CVPR 2024); lskd is kd with it always on. The
    #   reference pairs it with T 2 and 9x the KD weight(s): set those yourself.
    # ctkd.enabled: learn the temperature of the temperature-based methods (kd, dkd, dist, lskd,
    #   nkd, fm) with CTKD's curriculum (Li et al. AAAI 2023); see CTKD_DEFAULTS.
    cfg.logit_standardize = False
    cfg.ctkd = dict(CTKD_DEFAULTS)
    for name, m in METHODS.items():
        if m.defaults:
            cfg[name] = dict(m.defaults)
    cfg.terms = ml_collections.ConfigDict()
    return cfg


def method_names(method: str) -> list[str]:
    names = [n.strip() for n in method.split("+") if n.strip()]
    for n in names:
        if n not in METHODS:
            raise ValueError(
                f"unknown distillation method {n!r}; choose one of: {', '.join(sorted(METHODS))} "
                "(combine several with '+', e.g. 'kd+at')"
            )
    if not names:
        raise ValueError("distill.method is empty; choose one of: " + ", ".join(sorted(METHODS)))
    return names


# kdjax.losses functions that relate the examples of a batch to each other: custom terms with
# one of them see the global batch under data parallelism (Term.global_batch).
GLOBAL_BATCH_LOSSES = frozenset({"rkd", "pkt", "correlation_congruence", "similarity_preserving", "dist"})

_TERM_KEYS = ("loss", "weight", "student", "teacher", "warmup_epochs", "kwargs")


def _check_keys(where: str, given, allowed) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def _check_weight(where: str, value) -> float:
    value = float(value)
    if value < 0 or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number >= 0, got {value}")
    return value


def build_terms(distill: Mapping[str, Any], *, label_smoothing: float = 0.0,
                num_data: int | None = None, dataset_labels=None) -> tuple[Term, ...]:
    """Turns the `config.distill` block (as a plain dict) into the tuple of terms to optimise.

    `num_data` (training-set size) and `dataset_labels` ((num_data,) training labels) are only
    used by CRD (memory rows; negatives from other classes); distill.crd.num_data overrides
    `num_data`."""
    temperature = float(distill.get("temperature", 4.0))
    if temperature <= 0:
        raise ValueError(f"distill.temperature must be > 0, got {temperature}")
    names = method_names(distill.get("method", "kd"))
    ce_weight = distill.get("ce_weight")
    if ce_weight is None:
        ce_weight = max(METHODS[n].ce_weight for n in names)
    ce_weight = _check_weight("distill.ce_weight", ce_weight)
    data = {"num_data": num_data, "dataset_labels": dataset_labels}
    standardize = distill.get("logit_standardize", False)
    if not isinstance(standardize, (bool, np.bool_)):
        raise ValueError(f"distill.logit_standardize must be True or False, got {standardize!r}")
    ctkd = dict(distill.get("ctkd") or {})
    _check_keys("distill.ctkd", ctkd, CTKD_DEFAULTS)
    ctkd = {**CTKD_DEFAULTS, **ctkd}
    if ctkd["enabled"] and not any(METHODS[n].temperature for n in names):
        raise ValueError(
            f"distill.ctkd.enabled: CTKD learns a distillation temperature, but {'+'.join(names)} has "
            "none; combine it with one of: " + ", ".join(n for n, m in METHODS.items() if m.temperature))
    terms: list[Term] = []
    if ce_weight:
        ce = functools.partial(_ce_term, label_smoothing=label_smoothing)
        terms.append(Term("ce", ce, ce_weight, ("logits",), ()))
    if ctkd["enabled"]:
        terms.append(_ctkd_term(ctkd, num_data))
    for n in names:
        given = dict(distill.get(n) or {})
        _check_keys(f"distill.{n}", given, METHODS[n].defaults)
        h = {**METHODS[n].defaults, **given}
        if "weight" in h:
            _check_weight(f"distill.{n}.weight", h["weight"])
            _check_weight(f"distill.{n}.warmup_epochs", h["warmup_epochs"])
        built = METHODS[n].build(h, temperature, data)
        if ctkd["enabled"] and METHODS[n].temperature:
            built = [dataclasses.replace(t, fn=_learned_temperature(t.fn)) for t in built]
        terms.extend(built)
    for name, spec in dict(distill.get("terms") or {}).items():
        spec = dict(spec)
        _check_keys(f"distill.terms.{name}", spec, _TERM_KEYS)
        loss_name = spec.get("loss", name)
        loss_fn = getattr(losses, loss_name, None)
        if loss_name not in losses.__all__ or loss_fn is None:
            raise ValueError(
                f"distill.terms.{name}: unknown loss {loss_name!r}; choose one of: "
                + ", ".join(sorted(losses.__all__))
            )
        student, teacher = _as_names(spec.get("student", "logits")), _as_names(spec.get("teacher", "logits"))
        wrap = _logit_term if student == teacher == ("logits",) else _loss_term
        fn = functools.partial(wrap, loss_fn, **dict(spec.get("kwargs") or {}))
        terms.append(
            Term(
                name,
                fn,
                _check_weight(f"distill.terms.{name}.weight", spec.get("weight", 1.0)),
                student,
                teacher,
                _check_weight(f"distill.terms.{name}.warmup_epochs", spec.get("warmup_epochs", 0.0)),
                global_batch=loss_name in GLOBAL_BATCH_LOSSES,
            )
        )
    if standardize:  # one place for every logit term (lskd's own is already on)
        # a term with a variant of its own (mlkd: as its reference, the instance level only)
        terms = [dataclasses.replace(t, fn=t.fn.logit_standardized) if hasattr(t.fn, "logit_standardized") else t
                 for t in terms]
        terms = [dataclasses.replace(t, fn=_standardized(t.fn))
                 if t.student == ("logits",) and t.teacher == ("logits",)
                 and not getattr(t.fn, "standardized", False) else t
                 for t in terms]
    seen = set()
    for t in terms:
        if t.name in seen:
            raise ValueError(f"two distillation terms are both named {t.name!r}; rename one")
        seen.add(t.name)
    return tuple(terms)


def needs_teacher(terms: Sequence[Term]) -> bool:
    return any(t.teacher for t in terms)


def init_terms(method: str) -> list[str]:
    """Names of the terms of `method` (with its default settings) that need the `student_init`
    stage: two-stage methods whose term is trained only there (FSP, AB) or whose adapters are
    pre-trained there (FT's paraphraser). Configs use it to add that stage."""
    terms = build_terms({"method": method, "ce_weight": 0.0})
    return [t.name for t in terms if t.init_only or t.init_fn is not None]


def check_features(terms: Sequence[Term], student_names, teacher_names) -> None:
    """Raises a one-line ValueError when a term reads a feature a model does not expose, or when a
    paired term's student and teacher features do not pair up one to one. A model that has a
    feature has it in the strong view too (STRONG + name)."""
    for t in terms:
        found = {}
        for who, wanted, have in (("student", t.student, student_names), ("teacher", t.teacher, teacher_names)):
            shown = [n for n in have if not n.startswith(STRONG)]
            have = shown + [STRONG + n for n in shown]
            for n in wanted:
                try:
                    resolve_features((n,), have)
                except ValueError:
                    raise ValueError(
                        f"term {t.name!r} reads {who} feature {n!r}, which the {who} model does not "
                        f"have; it has: {', '.join(sorted(shown))}"
                    ) from None
            found[who] = resolve_features(wanted, have) if wanted else ()
        if t.paired and len(found["student"]) != len(found["teacher"]):
            raise ValueError(
                f"term {t.name!r} pairs student features ({', '.join(found['student'])}) with teacher "
                f"features ({', '.join(found['teacher'])}) one to one; set distill.{t.name}.student / "
                f".teacher to lists of equal length"
            )
