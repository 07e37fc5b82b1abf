"""Feature-map methods: fitnet, ofd, at, sp, nst, vid, reviewkd, kdsvd, fsp, ab, ft (registered in
this order), each with its adapters (Linen modules) beside it: ConvReg (FitNets' regressor, AB's
connector), OFDConnector, VIDRegressor, ABF (ReviewKD), Paraphraser and Translator (FT)."""

from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdjax import losses
from kdjax.distill.core import Context, _as_list, _pairs
from kdjax.distill.layers import _batch_norm, _torch_bias, _torch_kernel
from kdjax.distill.registry import defaults, loss_term, pairs_term, register, term
from kdjax.losses.feature import adaptive_avg_pool, pool_to_common


# FitNets: Romero et al. ICLR 2015; RepDistiller `--distill hint -a 0 -b 100`, hint_layer 2
# (= stage2), regressor ConvReg (trained with the student).
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


def _fitnet_fn(name, student, teacher, ctx, use_relu):
    s = ConvReg(tuple(teacher.shape[1:]), use_relu, name=f"{name}_regressor")(student, ctx)
    return losses.fitnet(s, teacher)


@register("fitnet", paper="Romero et al. FitNets: Hints for Thin Deep Nets (ICLR 2015)", ce_weight=1.0,
          defaults=defaults(100.0, "stage2", "stage2", use_relu=True), loss="fitnet", feature_maps=True)
def _fitnet(h, temperature, data):
    return [term("fitnet", functools.partial(_fitnet_fn, "fitnet", use_relu=bool(h["use_relu"])), h)]


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
        t = adaptive_avg_pool(t.astype(jnp.float32), s.shape[1:3])
        total = total + losses.ofd(s, t, m) / 2.0 ** (n - 1 - i)
    return total


@register("ofd", paper="Heo, Kim, Yun, Park, Kwak, Choi. A Comprehensive Overhaul of Feature Distillation (ICCV 2019)",
          ce_weight=1.0, defaults=defaults(0.001, "preact_stage*", "preact_stage*,preact_margin*"), loss="ofd",
          feature_maps=True)
def _ofd(h, temperature, data):
    return [term("ofd", functools.partial(_ofd_fn, "ofd"), h)]


# AT: Zagoruyko & Komodakis ICLR 2017; RepDistiller `--distill attention -a 0 -b 1000`, p = 2,
# summed over feat[1:-1] (every stage).
@register("at", paper="Zagoruyko, Komodakis. Paying More Attention to Attention (ICLR 2017)", ce_weight=1.0,
          defaults=defaults(1000.0, "stage*", "stage*", p=2.0), loss="attention_transfer", feature_maps=True)
def _at(h, temperature, data):
    fn = functools.partial(pairs_term, "at", losses.attention_transfer, p=float(h["p"]))
    return [term("at", fn, h, paired=True)]


# SP: Tung & Mori ICCV 2019; RepDistiller `--distill similarity -a 0 -b 3000` on feat[-2] (last stage).
# Global batch: the B x B Gram matrices are over the all-gathered batch under data parallelism.
@register("sp", paper="Tung, Mori. Similarity-Preserving Knowledge Distillation (ICCV 2019)", ce_weight=1.0,
          defaults=defaults(3000.0, "stage[-1]", "stage[-1]"), loss="similarity_preserving", feature_maps=True,
          global_batch=True)
def _sp(h, temperature, data):
    return [term("sp", functools.partial(pairs_term, "sp", losses.similarity_preserving), h, paired=True)]


# NST: Huang & Wang 2017; RepDistiller `--distill nst -a 0 -b 50`, summed over feat[1:-1].
@register("nst", paper="Huang, Wang. Like What You Like: Knowledge Distill via Neuron Selectivity Transfer (2017)",
          ce_weight=1.0, defaults=defaults(50.0, "stage*", "stage*"), loss="nst", feature_maps=True)
def _nst(h, temperature, data):
    return [term("nst", functools.partial(pairs_term, "nst", losses.nst), h, paired=True)]


# VID: Ahn et al. CVPR 2019; RepDistiller `--distill vid -a 0 -b 1`, one VIDLoss(s, t, t) per
# stage in feat[1:-1] (mid channels = teacher channels, init_pred_var 5), summed. The larger map
# is average-pooled to the smaller one before the regressor, as in the reference.
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


def _vid_fn(name, student, teacher, ctx, init_pred_var, eps):
    total = 0.0
    for i, (s, t) in enumerate(_pairs(name, student, teacher)):
        s, t = pool_to_common(s.astype(jnp.float32), t.astype(jnp.float32))
        c = t.shape[-1]
        mean, var = VIDRegressor(c, c, init_pred_var, eps, name=f"{name}_regressor{i}")(s)
        total = total + losses.vid(mean, t, var)
    return total


@register("vid", paper="Ahn et al. Variational Information Distillation for Knowledge Transfer (CVPR 2019)",
          ce_weight=1.0, defaults=defaults(1.0, "stage*", "stage*", init_pred_var=5.0, eps=1e-5), loss="vid",
          feature_maps=True)
def _vid(h, temperature, data):
    fn = functools.partial(_vid_fn, "vid", init_pred_var=float(h["init_pred_var"]), eps=float(h["eps"]))
    return [term("vid", fn, h, paired=True)]


# ReviewKD: Chen et al. CVPR 2021; mdistiller ReviewKD (CE_WEIGHT 1, REVIEWKD_WEIGHT 1, linear
# warm-up over 20 epochs; levels = stages + pooled embedding as a 1x1 map, fused deepest first by
# ABF modules with mid channels min(512, student embedding dim); loss hcl).
def _resize_nearest(x: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """torch F.interpolate(mode='nearest') of an NHWC map: source index floor(i * in / out)."""
    h, w = x.shape[1:3]
    rows = (np.arange(hw[0]) * h) // hw[0]
    cols = (np.arange(hw[1]) * w) // hw[1]
    return x[:, rows][:, :, cols]


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


@register("reviewkd", paper="Chen, Liu, Zhao, Jia. Distilling Knowledge via Knowledge Review (CVPR 2021)",
          ce_weight=1.0, defaults=defaults(1.0, "stage*,embedding", "stage*,embedding", warmup_epochs=20.0,
                                           mid_channels=None),
          loss="hcl", feature_maps=True)
def _reviewkd(h, temperature, data):
    fn = functools.partial(_reviewkd_fn, "reviewkd", mid_channels=h["mid_channels"])
    return [term("reviewkd", fn, h, paired=True)]


# KDSVD: Lee et al. ECCV 2018; mdistiller configs/cifar100/kdsvd.yaml with mdistiller/engine/cfg.py
# (KDSVD.K 1, LOSS.CE_WEIGHT 1, LOSS.FEAT_WEIGHT 1) on feats[1:] (every stage). Its student needs
# the teacher's width at every stage (see losses.kdsvd).
@register("kdsvd", paper="Lee, Kim, Song. Self-supervised Knowledge Distillation Using Singular Value "
                         "Decomposition (ECCV 2018)",
          ce_weight=1.0, defaults=defaults(1.0, "stage*", "stage*", k=1), loss="kdsvd", feature_maps=True,
          same_widths=True)
def _kdsvd(h, temperature, data):
    return [term("kdsvd", functools.partial(loss_term, losses.kdsvd, k=int(h["k"])), h, paired=True)]


# Init-only terms (FSP, AB): RepDistiller train_student.py trains them in its init stage
# (helper/pretrain.py, --init_epochs 30, the summed loss group with weight 1), then distils with
# CE only: its loops.py sets loss_kd = 0 for them, so -a 0 -b <x> is CE alone. Here: the term is
# trained in the student_init stage (student_init.terms), and the student stage has CE only.
# FSP: Yim et al. CVPR 2017; RepDistiller `--distill fsp -a 0 -b 50` on feat[:-1]. kdjax models sow
# no stem feature, so the maps are the stages ('stage*': RepDistiller's feat[1:-1]); the reference
# also relates the stem to the first stage.
@register("fsp", paper="Yim, Joo, Bae, Kim. A Gift from Knowledge Distillation: Fast Optimization, Network "
                       "Minimization and Transfer Learning (CVPR 2017)",
          ce_weight=1.0, defaults=defaults(1.0, "stage*", "stage*"), loss="fsp", feature_maps=True, same_widths=True)
def _fsp(h, temperature, data):
    return [term("fsp", functools.partial(loss_term, losses.fsp), h, paired=True, init_only=True)]


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


@register("ab", paper="Heo, Lee, Yun, Choi. Knowledge Transfer via Distillation of Activation Boundaries Formed by "
                      "Hidden Neurons (AAAI 2019)",
          ce_weight=1.0, defaults=defaults(1.0, "stage*", "stage*", margin=1.0), loss="activation_boundary",
          feature_maps=True)
def _ab(h, temperature, data):
    fn = functools.partial(_ab_fn, "ab", margin=float(h["margin"]))
    return [term("ab", fn, h, paired=True, init_only=True)]


# FT: Kim et al. NeurIPS 2018; RepDistiller `--distill factor -a 0 -b 200` on feat[-2] (the last
# stage): Paraphraser(rate 0.5) pre-trained in the init stage on the teacher's map alone (MSE
# reconstruction, weight 1, at lr 0.01 where kdjax uses the student's rate; the student is not
# trained), then frozen while the student and its
# Translator(rate 0.5) learn with FactorTransfer(p1 2, p2 1).
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


def _ft_fn(name, student, teacher, ctx, rate, p1, p2):
    factor_t = Paraphraser(rate, name=f"{name}_paraphraser")(teacher)
    factor_s = Translator(int(teacher.shape[-1] * rate), name=f"{name}_translator")(student, ctx)
    return losses.factor_transfer(factor_s, factor_t, p1=p1, p2=p2)


def _ft_init_fn(name, student, teacher, ctx, rate):
    _, rec = Paraphraser(rate, name=f"{name}_paraphraser")(teacher, decode=True)
    return losses.fitnet(rec, teacher)  # nn.MSELoss(): mean squared error


@register("ft", paper="Kim, Park, Kwak. Paraphrasing Complex Network: Network Compression via Factor Transfer "
                      "(NeurIPS 2018)",
          ce_weight=1.0, defaults=defaults(200.0, "stage[-1]", "stage[-1]", rate=0.5, p1=2.0, p2=1.0),
          loss="factor_transfer", feature_maps=True)
def _ft(h, temperature, data):
    rate = float(h["rate"])
    fn = functools.partial(_ft_fn, "ft", rate=rate, p1=float(h["p1"]), p2=float(h["p2"]))
    init_fn = functools.partial(_ft_init_fn, "ft", rate=rate)
    return [term("ft", fn, h, init_fn=init_fn, init_weight=1.0, frozen=("ft_paraphraser",), init_frozen=("student",))]
