"""Logit methods: kd, dkd, dist, lskd, wttm, mlkd, nkd, sdd, mse_logits, fm (registered in this
order), and the logit-standardisation modifier's wrapper (`standardized`, used by lskd and by
``distill.logit_standardize``)."""

from __future__ import annotations

import functools

import jax.numpy as jnp

from kdjax import losses
from kdjax.distill.core import STRONG, Term, _pairs
from kdjax.distill.ensemble import _teacher_logits
from kdjax.losses.logit import MLKD_STANDARDIZED_TEMPERATURES, MLKD_TEMPERATURES, mlkd_strong_flags
from kdjax.distill.registry import (
    as_floats,
    ce_term,
    check_weight,
    defaults,
    logit_term,
    own_temperature,
    register,
    term,
)


# KD: Hinton, Vinyals, Dean 2015. RepDistiller `-r 0.1 -a 0.9 -b 0` (CE 0.1, KD 0.9), T = 4.
@register("kd", paper="Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network (2015)",
          ce_weight=0.1, defaults=defaults(0.9, temperature=None), loss="kd", temperature=True)
def _kd(h, temperature, data):
    return [term("kd", functools.partial(logit_term, losses.kd, temperature=own_temperature(h, temperature)), h)]


# DKD: Zhao et al. CVPR 2022; mdistiller configs/cifar100/dkd (CE_WEIGHT 1, ALPHA 1, BETA 8 for
# res32x4->res8x4, 2 for res56->res20 / res110->res32, 6 for wrn40_2/vgg13 pairs; T 4; the DKD
# weight warms up linearly over WARMUP = 20 epochs). alpha/beta are DKD's TCKD/NCKD weights.
def _dkd_fn(student, teacher, ctx, **kw):
    teacher = _teacher_logits(student, teacher, ctx, kw["temperature"])
    return losses.dkd(student, teacher, ctx.labels, **kw)


@register("dkd", paper="Zhao, Cui, Song, Qiu, Liang. Decoupled Knowledge Distillation (CVPR 2022)",
          ce_weight=1.0, defaults=defaults(1.0, warmup_epochs=20.0, alpha=1.0, beta=8.0, temperature=None),
          loss="dkd", temperature=True)
def _dkd(h, temperature, data):
    fn = functools.partial(_dkd_fn, alpha=float(h["alpha"]), beta=float(h["beta"]),
                           temperature=own_temperature(h, temperature))
    return [term("dkd", fn, h)]


# DIST: Huang et al. NeurIPS 2022; hunto/image_classification_sota dist_cifar.yaml: CE 1
# (ori_loss_weight), DIST 2 (kd_loss_weight), 'dist_t4' = DIST(beta=1, gamma=1, tau=4).
# Global batch: its per-class (column) correlation is over the examples of the batch (the
# paper's "intra-class relation"; the per-sample "inter-class" part is per example), so the whole
# term is evaluated on the all-gathered global batch under data parallelism.
@register("dist", paper="Huang, You, Wang, Qian, Xu. Knowledge Distillation from A Stronger Teacher (NeurIPS 2022)",
          ce_weight=1.0, defaults=defaults(2.0, beta=1.0, gamma=1.0, temperature=None), loss="dist",
          temperature=True, global_batch=True)
def _dist(h, temperature, data):
    fn = functools.partial(logit_term, losses.dist, beta=float(h["beta"]), gamma=float(h["gamma"]),
                           temperature=own_temperature(h, temperature))
    return [term("dist", fn, h)]


# Logit standardisation: Sun et al. CVPR 2024; sunshangquan/logit-standardization-KD README
# (KD + --logit-stand --base-temp 2 --kd-weight 9, CE_WEIGHT 0.1 from its KD config). It is KD
# with the logit-standardisation modifier (the one `distill.logit_standardize` applies to any
# logit method) always on: losses.logit_standardized_kd, computed the same way.
def standardize(logits):
    """losses.logit_standardize over the last axis of logits of any rank (an ensemble's (B, n, K):
    each teacher on its own)."""
    z = jnp.asarray(logits)
    return losses.logit_standardize(z.reshape(-1, z.shape[-1])).reshape(z.shape)


def standardized(fn):
    """A logit term's fn on per-sample z-scored student and teacher logits (before its
    temperature; an ensemble's teachers each z-scored before they are combined); extra keywords
    (CTKD's learned temperature) pass through. Its `Term` says so: ``standardized=True``."""
    def on_standardized(student, teacher, ctx, **kw):
        return fn(standardize(student), standardize(teacher), ctx, **kw)
    return on_standardized


@register("lskd", paper="Sun, Ren, Li, Wang, Cao. Logit Standardization in Knowledge Distillation (CVPR 2024)",
          ce_weight=0.1, defaults=defaults(9.0, temperature=2.0), loss="logit_standardized_kd", temperature=True)
def _lskd(h, temperature, data):
    fn = functools.partial(logit_term, losses.kd, temperature=own_temperature(h, temperature))
    return [term("lskd", standardized(fn), h, standardized=True)]


# WTTM: Zheng & Yang ICLR 2024; zkxufo/TTM README's WTTM command (`--add wttm --ttm_l 0.2 -a 4`,
# CE weight -r 1, the train_student.py default): gamma 0.2, weight 4. The student is at T = 1
# and the teacher is power-transformed (gamma = 1/T), so the shared temperature does not apply.
@register("wttm", paper="Zheng, Yang. Knowledge Distillation Based on Transformed Teacher Matching (ICLR 2024)",
          ce_weight=1.0, defaults=defaults(4.0, gamma=0.2), loss="wttm")
def _wttm(h, temperature, data):
    return [term("wttm", functools.partial(logit_term, losses.wttm, gamma=float(h["gamma"])), h)]


# MLKD: Jin, Wang, Lin CVPR 2023; Jin-Ying/Multi-Level-Logit-Distillation KD_ours.py with the
# defaults of its mdistiller/engine/cfg.py (KD.TEMPERATURE 4, LOSS.CE_WEIGHT 0.1, LOSS.KD_WEIGHT
# 0.9: every one of its KD/CC/BC losses is weighted 0.9) and its configs/cifar100/ours/*.yaml
# (TRAINER 'ours': the weak and the strong view). Its CE is 0.1 x (CE(weak) + CE(strong)): the
# method's 'ce' term is the weak view's, its 'mlkd_ce_strong' term (weight strong_ce_weight) the
# strong view's. A batch-level term (medians, the B x B and K x K correlations): global batch.
def _mlkd_fn(student, teacher, ctx, *, temperatures, strong_temperatures, standardize=False):
    """The mlkd term: its value is the sum of its three levels, which the Distiller logs as
    'mlkd/instance', 'mlkd/class' and 'mlkd/batch' (a dict of parts, see `Term`)."""
    (sw, tw), (ss, ts) = _pairs("mlkd", student, teacher)  # (weak pair), (strong pair)
    if temperatures is None:  # 'auto': the reference's list for this standardisation
        temperatures = MLKD_STANDARDIZED_TEMPERATURES if standardize else MLKD_TEMPERATURES
    if strong_temperatures is None:
        strong_temperatures = tuple(temperatures)[:3]
    if jnp.ndim(tw) == jnp.ndim(sw):  # one teacher
        return losses.mlkd(sw, ss, tw, ts, temperatures, strong_temperatures, standardize=standardize, parts=True)
    # an ensemble: its teachers combined at each temperature; the masks from their T = 1 average
    # (with standardize, the combined logits are z-scored for the instance level)
    conf = _teacher_logits(sw, tw, ctx, 1.0)
    levels = {}
    for t, on_strong in zip(temperatures, mlkd_strong_flags(temperatures, strong_temperatures)):
        one = losses.mlkd(sw, ss, _teacher_logits(sw, tw, ctx, t), _teacher_logits(ss, ts, ctx, t), (t,),
                          (t,) if on_strong else (), confidence_logits=conf, standardize=standardize, parts=True)
        levels = {k: levels.get(k, 0.0) + v for k, v in one.items()}
    return levels


def _mlkd_temperatures(h, key):
    """distill.mlkd.<key>: 'auto' -> None (the reference's, see _mlkd_fn), else a tuple of floats."""
    value = h[key]
    if isinstance(value, str) and value.strip() == "auto":
        return None
    try:
        temps = tuple(float(t) for t in as_floats(value))
    except (TypeError, ValueError):
        temps = ()
    if not temps and key == "temperatures" or any(t <= 0 for t in temps):
        raise ValueError(f"distill.mlkd.{key} must be 'auto' or temperatures > 0, e.g. '2,3,5,2,6', "
                         f"got {value!r}")
    return temps


@register("mlkd", paper="Jin, Wang, Lin. Multi-Level Logit Distillation (CVPR 2023)", ce_weight=0.1,
          defaults=defaults(0.9, "logits,strong/logits", "logits,strong/logits", temperatures="auto",
                            strong_temperatures="auto", strong_ce_weight=0.1),
          loss="mlkd", views=True, global_batch=True)
def _mlkd(h, temperature, data):
    # temperatures 'auto': the reference's 4,3,5,2,6 (KD_ours, cfg.KD.TEMPERATURE 4), and with
    # distill.logit_standardize 2,3,5,2,6 (logit-standardization-KD: --logit-stand sets
    # cfg.KD.TEMPERATURE = --base-temp 2); strong_temperatures 'auto': the first three entries.
    kw = {"temperatures": _mlkd_temperatures(h, "temperatures"),
          "strong_temperatures": _mlkd_temperatures(h, "strong_temperatures")}
    # refuse strong temperatures that the list in use lacks, in one line
    standardize = bool(data.get("logit_standardize", False))
    temps = kw["temperatures"] or (MLKD_STANDARDIZED_TEMPERATURES if standardize else MLKD_TEMPERATURES)
    strong = temps[:3] if kw["strong_temperatures"] is None else kw["strong_temperatures"]
    try:
        mlkd_strong_flags(temps, strong)
    except ValueError:
        raise ValueError(
            f"distill.mlkd.strong_temperatures={h['strong_temperatures']!r} must be among distill.mlkd.temperatures="
            f"{h['temperatures']!r} ({','.join(f'{t:g}' for t in temps)}), each value at most as often as there"
        ) from None
    fn = functools.partial(_mlkd_fn, **kw)
    ce = functools.partial(ce_term, label_smoothing=0.0)
    return [Term("mlkd_ce_strong", ce, check_weight("distill.mlkd.strong_ce_weight", h["strong_ce_weight"]),
                 (STRONG + "logits",), ()),
            term("mlkd", fn, h, paired=True, standardized_fn=functools.partial(_mlkd_fn, **kw, standardize=True))]


# NKD: Yang et al. ICCV 2023; yzd-v/cls_KD configs/distillers/cifar100/res34_distill_res18_cifar.py
# (NKDLoss temp 3, gamma 3.5; the student's CE weight 1, NKD weight 1). Its ImageNet configs use
# temp 1, gamma 1.5 (the class defaults; DeiT: gamma 1). NKD carries its own temperature.
def _nkd_fn(student, teacher, ctx, **kw):
    teacher = _teacher_logits(student, teacher, ctx, kw["temperature"])
    return losses.nkd(student, teacher, ctx.labels, **kw)


@register("nkd", paper="Yang, Zeng, Yuan, Li. From Knowledge Distillation to Self-Knowledge Distillation: A Unified "
                       "Approach with Normalized Loss and Customized Soft Labels (ICCV 2023)",
          ce_weight=1.0, defaults=defaults(1.0, gamma=3.5, temperature=3.0), loss="nkd", temperature=True)
def _nkd(h, temperature, data):
    fn = functools.partial(_nkd_fn, gamma=float(h["gamma"]), temperature=own_temperature(h, temperature))
    return [term("nkd", fn, h)]


# SDD: Wei, Luo, Luo CVPR 2024; shicaiwei123/SDD-CVPR2024 README command (``--M [1,2,4]``: 1x1,
# 2x2, 4x4 cells) with mdistiller/engine/cfg.py's KD block for SD-KD (CE_WEIGHT 0.1, KD_WEIGHT
# 0.9, T 4; no warm-up, distillers/KD.py ``SDD_KD``), complementary regions weighted 2. base='dkd'
# is SD-DKD (distillers/SDD_DKD.py: DKD's CE 1, alpha 1, beta 8, T 4, linear warm-up over
# tools/train_origin.py's --warm_up 30 epochs): set distill.sdd.weight=1, warmup_epochs=30 and
# distill.ce_weight=1 with it. base='nkd' is SDD's NKD (distillers/SDD_nkd.py ``SDD_NKDLoss``: the
# same DKD block, CE 1, T = DKD.T, NKD's gamma = DKD.BETA, warm-up DKD.WARMUP; see losses.sdd).
# Reads both models' 'class_map' (the on-request class activation
# map; `losses.multiscale_logits` pools it into the cells' logits).
def _sdd_fn(student, teacher, ctx, **kw):
    scales = kw.pop("scales")
    return losses.sdd(losses.multiscale_logits(student, scales), losses.multiscale_logits(teacher, scales),
                      ctx.labels, **kw)


@register("sdd", paper="Wei, Luo, Luo. Scale Decoupled Distillation (CVPR 2024)", ce_weight=0.1,
          defaults=defaults(0.9, "class_map", "class_map", scales=(1, 2, 4), base="kd", temperature=None,
                            alpha=1.0, beta=8.0, complementary_weight=2.0),
          loss="sdd", temperature=True, feature_maps=True)
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
    if h["base"] not in ("kd", "dkd", "nkd"):
        raise ValueError(f"distill.sdd.base must be 'kd', 'dkd' or 'nkd', got {h['base']!r}")
    fn = functools.partial(_sdd_fn, scales=scales, base=h["base"], temperature=own_temperature(h, temperature),
                           alpha=float(h["alpha"]), beta=float(h["beta"]),
                           complementary_weight=float(h["complementary_weight"]))
    return [term("sdd", fn, h)]


# Function matching, Beyer et al. CVPR 2022 (big_vision proj/distill): no labels (CE 0).
# mse_logits = big_vision distance 'l2'; fm = distance 'kl' with t=1 (bit_i1k.py), i.e. KL of the
# softened distributions without kd's T^2 factor (identical to kd at T = 1).
@register("mse_logits", paper="Beyer et al. Knowledge distillation: A good teacher is patient and consistent (CVPR 2022)",
          ce_weight=0.0, defaults=defaults(1.0), loss="mse_logits")
def _mse_logits(h, temperature, data):
    return [term("mse_logits", functools.partial(logit_term, losses.mse_logits), h)]


def _fm_fn(student, teacher, ctx, temperature):
    teacher = _teacher_logits(student, teacher, ctx, temperature)
    return losses.kd(student, teacher, temperature) / temperature**2


@register("fm", paper="Beyer et al. Knowledge distillation: A good teacher is patient and consistent (CVPR 2022)",
          ce_weight=0.0, defaults=defaults(1.0, temperature=1.0), loss="kd", temperature=True)
def _fm(h, temperature, data):
    return [term("fm", functools.partial(_fm_fn, temperature=own_temperature(h, temperature)), h)]
