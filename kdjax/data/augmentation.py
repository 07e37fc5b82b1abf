"""On-device preprocessing, pure ``jax.numpy`` inside the jitted train step: ``normalize``, the
weak view's crop and flip (``augment``), the strong view of ``config.augment.views``
(``strong_augment``: ``augment`` then ``rand_augment``, RandAugment and Cutout) and the
batch-level ``mixup`` and ``cutmix``. They take uint8 (or normalised float) batches and
per-example keys, so a view depends only on the keys, not on how the batch is sharded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.data.sources import DataError


def normalize(images_uint8, mean, std, dtype=jnp.float32) -> jnp.ndarray:
    """Returns ``(images / 255 - mean) / std`` (per channel, last axis), computed in float32, cast to ``dtype``."""
    x = jnp.asarray(images_uint8).astype(jnp.float32) / 255.0
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return ((x - mean) / std).astype(dtype)


def augment(keys, images, *, crop_padding: int = 0, flip: bool = False):
    """Per-example random crop (with zero padding) and random horizontal flip.

    Each image is zero-padded by ``crop_padding`` pixels on every side and cropped back
    to H x W at a uniformly random offset in [0, 2 * crop_padding] (so content moves by at
    most ``crop_padding`` pixels), then mirrored left-right with probability 1/2 if
    ``flip``. Apply it to the uint8 images before ``normalize`` so padding is black.

    Args:
      keys: per-example PRNG keys, shape (B,) of typed keys (``jax.random.key``) or
        (B, 2) raw uint32 keys. Example i's result depends only on ``keys[i]`` and
        ``images[i]``, so deriving keys from global example positions makes 1-device
        and N-device runs identical.
      images: (B, H, W, C) array of any dtype.
      crop_padding: padding of the random crop; 0 disables cropping.
      flip: whether to randomly flip horizontally.

    Returns:
      Augmented images, same shape and dtype.
    """
    if crop_padding < 0:
        raise DataError(f'crop_padding must be >= 0, got {crop_padding}')
    if crop_padding == 0 and not flip:
        return images
    p = int(crop_padding)

    def one(key, image):
        k_crop, k_flip = jax.random.split(key)
        h, w, c = image.shape
        if p:
            padded = jnp.pad(image, ((p, p), (p, p), (0, 0)))
            oy, ox = jax.random.randint(k_crop, (2,), 0, 2 * p + 1)
            image = jax.lax.dynamic_slice(padded, (oy, ox, 0), (h, w, c))
        if flip:
            image = jnp.where(jax.random.bernoulli(k_flip), image[:, ::-1, :], image)
        return image

    return jax.vmap(one)(keys, images)


# Strong view (augment.views='weak,strong'): RandAugment as the MLKD reference uses it
# (Jin-Ying/Multi-Level-Logit-Distillation mdistiller/dataset/cifar100.py ``RandAugment(2, 10)``,
# FixMatch's variant): after the weak view's crop and flip, two operations drawn uniformly with
# replacement, each with a magnitude drawn uniformly from its range, then Cutout. Pure jnp on one
# uint8 (H, W, C) image; values are computed in float32 and truncated back to uint8.

def _to_u8(x):
    return jnp.clip(jnp.floor(x), 0, 255).astype(jnp.uint8)


def _gray(x):
    """ITU-R 601-2 luma of float (H, W, C) holding integers, rounded as PIL's 'L' conversion,
    (19595 R + 38470 G + 7471 B + 2^15) >> 16; the image itself for C != 3."""
    if x.shape[-1] != 3:
        return x
    weights = jnp.asarray([19595.0, 38470.0, 7471.0], jnp.float32)  # exact in float32: sums < 2^24
    return jnp.floor((jnp.sum(x * weights, -1, keepdims=True) + 32768.0) / 65536.0)


def _blend(degenerate, x, v):
    """PIL ImageEnhance: degenerate + v * (image - degenerate), clipped to [0, 255]."""
    return _to_u8(degenerate + v * (x - degenerate))


def _affine_nearest(image, m):
    """PIL ``Image.transform(AFFINE, m)`` with nearest sampling: output pixel (x, y) takes input
    pixel floor(a (x + .5) + b (y + .5) + c), floor(d (x + .5) + e (y + .5) + f); outside: 0."""
    h, w = image.shape[:2]
    ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) + 0.5, jnp.arange(w, dtype=jnp.float32) + 0.5,
                          indexing="ij")
    xi = jnp.floor(m[0] * xs + m[1] * ys + m[2]).astype(jnp.int32)
    yi = jnp.floor(m[3] * xs + m[4] * ys + m[5]).astype(jnp.int32)
    inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    out = image[jnp.clip(yi, 0, h - 1), jnp.clip(xi, 0, w - 1)]
    return jnp.where(inside[..., None], out, jnp.zeros((), image.dtype))


def _rotation(v, h, w):
    """PIL ``Image.rotate(v)`` (degrees, counter-clockwise about the centre) as an affine map."""
    a = -v * (np.pi / 180.0)
    cos, sin = jnp.cos(a), jnp.sin(a)
    cx, cy = w / 2.0, h / 2.0
    return jnp.stack([cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy])


def _autocontrast(x):
    """PIL ImageOps.autocontrast (cutoff 0): each channel stretched from [min, max] to [0, 255]."""
    lo, hi = jnp.min(x, (0, 1)), jnp.max(x, (0, 1))
    return jnp.where(hi > lo, _to_u8((x - lo) * 255.0 / jnp.maximum(hi - lo, 1.0)), _to_u8(x))


def _posterize(x, v):
    bits = jnp.clip(jnp.floor(v), 1, 8).astype(jnp.int32)
    mask = (0xFF << (8 - bits)) & 0xFF
    return (x.astype(jnp.int32) & mask).astype(jnp.uint8)


# name -> (fn(image uint8 (H, W, C), magnitude) -> uint8, magnitude range): the reference's list
# (FixMatch ranges) without Equalize and Sharpness.
RANDAUGMENT_OPS = {
    "identity": (lambda im, v: im, (0.0, 1.0)),
    "autocontrast": (lambda im, v: _autocontrast(im.astype(jnp.float32)), (0.0, 1.0)),
    "brightness": (lambda im, v: _blend(0.0, im.astype(jnp.float32), v), (0.05, 0.95)),
    "color": (lambda im, v: _blend(_gray(im.astype(jnp.float32)), im.astype(jnp.float32), v), (0.05, 0.95)),
    "contrast": (lambda im, v: _blend(jnp.floor(jnp.mean(_gray(im.astype(jnp.float32))) + 0.5),
                                      im.astype(jnp.float32), v), (0.05, 0.95)),
    "posterize": (_posterize, (4.0, 8.0)),
    "rotate": (lambda im, v: _affine_nearest(im, _rotation(v, *im.shape[:2])), (-30.0, 30.0)),
    "shear_x": (lambda im, v: _affine_nearest(im, jnp.stack([1.0, v, 0.0, 0.0, 1.0, 0.0])), (-0.3, 0.3)),
    "shear_y": (lambda im, v: _affine_nearest(im, jnp.stack([1.0, 0.0, 0.0, v, 1.0, 0.0])), (-0.3, 0.3)),
    "solarize": (lambda im, v: jnp.where(im.astype(jnp.float32) < v, im, 255 - im), (0.0, 256.0)),
    "translate_x": (lambda im, v: _affine_nearest(im, jnp.stack([1.0, 0.0, v * im.shape[1], 0.0, 1.0, 0.0])),
                    (-0.3, 0.3)),
    "translate_y": (lambda im, v: _affine_nearest(im, jnp.stack([1.0, 0.0, 0.0, 0.0, 1.0, v * im.shape[0]])),
                    (-0.3, 0.3)),
}
CUTOUT_FILL = (125, 123, 114)  # the reference's grey; single-channel images get their mean, 121


def cutout(image, v, cy, cx):
    """The reference's Cutout: a square of side s = v * W (v in [0, 0.5]) at top-left
    (max(0, int(cy - s/2)), max(0, int(cx - s/2))), cut at the border, filled with `CUTOUT_FILL`.
    `cy`, `cx` are the (float) centre drawn uniformly in [0, H) x [0, W)."""
    h, w, c = image.shape
    s = v * w
    y0, x0 = jnp.floor(jnp.maximum(0.0, cy - s / 2)), jnp.floor(jnp.maximum(0.0, cx - s / 2))
    ys, xs = jnp.arange(h, dtype=jnp.float32)[:, None], jnp.arange(w, dtype=jnp.float32)[None, :]
    box = (ys >= y0) & (ys < y0 + s) & (xs >= x0) & (xs < x0 + s)
    fill = CUTOUT_FILL if c == 3 else (round(sum(CUTOUT_FILL) / 3),) * c
    return jnp.where(box[..., None], jnp.asarray(fill, image.dtype), image)


def rand_augment(keys, images, *, num_ops: int = 2, max_cutout: float = 0.5):
    """Per-example RandAugment + Cutout of uint8 (B, H, W, C) images (the strong view's ops after
    its crop and flip). Example i: `num_ops` operations drawn uniformly with replacement from
    `RANDAUGMENT_OPS`, magnitude v ~ U[lo, hi) of each op's range, applied in order; then
    ``cutout(v ~ U[0, max_cutout), centre uniform over the image)``. Keys as in `augment`: example
    i's result depends only on keys[i] and images[i]."""
    ops = list(RANDAUGMENT_OPS.values())
    lo = jnp.asarray([r[0] for _, r in ops], jnp.float32)
    hi = jnp.asarray([r[1] for _, r in ops], jnp.float32)
    branches = [fn for fn, _ in ops]

    def one(key, image):
        h, w = image.shape[:2]
        k_op, k_mag, k_cut = jax.random.split(key, 3)
        which = jax.random.randint(k_op, (num_ops,), 0, len(ops))
        u = jax.random.uniform(k_mag, (num_ops,))
        for i in range(num_ops):
            v = lo[which[i]] + (hi[which[i]] - lo[which[i]]) * u[i]
            image = jax.lax.switch(which[i], branches, image, v)
        c = jax.random.uniform(k_cut, (3,))
        return cutout(image, c[0] * max_cutout, c[1] * h, c[2] * w)

    return jax.vmap(one)(keys, jnp.asarray(images).astype(jnp.uint8))


def strong_augment(keys, images, *, crop_padding: int = 0, flip: bool = False):
    """The strong view of uint8 images: `augment` (crop and flip; its own draw, not the weak
    view's) then `rand_augment`, as the reference's strong transform (RandomCrop(32, padding=4),
    RandomHorizontalFlip, RandAugment(2, 10) with Cutout). Keys as in `augment`."""
    keys = jnp.asarray(keys)
    split = jax.vmap(lambda k: jax.random.split(k))(keys)
    x = augment(split[:, 0], images, crop_padding=crop_padding, flip=flip)
    return rand_augment(split[:, 1], x)


def _beta_lam(key, alpha: float):
    """lam ~ Beta(alpha, alpha) as G1 / (G1 + G2), G ~ Gamma(alpha), computed in log space.

    One ``loggamma`` draw of shape (2,) instead of ``jax.random.beta``'s two gamma draws:
    same distribution, stable for small alpha (no 0/0), and about half the compile time.
    """
    log_g = jax.random.loggamma(key, jnp.full((2,), alpha, jnp.float32))
    return jax.nn.sigmoid(log_g[0] - log_g[1])


def mixup(key, images, alpha: float):
    """Batch-level mixup (Zhang et al., 2018).

    Draws ``lam ~ Beta(alpha, alpha)`` and a random permutation of the batch and returns
    ``lam * images + (1 - lam) * images[perm]``. Train with
    ``lam * loss(labels) + (1 - lam) * loss(labels[perm])`` (and feed the teacher the
    same mixed images). Expects floating images (after ``normalize``). ``alpha <= 0``
    disables it (identity permutation, lam = 1).

    Returns:
      (mixed_images same shape/dtype, perm int32 (B,), lam float32 scalar in [0, 1]).
    """
    b = images.shape[0]
    if alpha <= 0:
        return images, jnp.arange(b, dtype=jnp.int32), jnp.float32(1.0)
    k_lam, k_perm = jax.random.split(key)
    lam = _beta_lam(k_lam, alpha)
    perm = jax.random.permutation(k_perm, b).astype(jnp.int32)
    mixed = lam * images.astype(jnp.float32) + (1.0 - lam) * images[perm].astype(jnp.float32)
    return mixed.astype(images.dtype), perm, lam


def cutmix(key, images, alpha: float):
    """Batch-level CutMix (Yun et al., 2019).

    Draws ``lam ~ Beta(alpha, alpha)``, a random permutation, and one box of size
    ``(H * sqrt(1 - lam), W * sqrt(1 - lam))`` centred at a uniform random pixel and
    clipped to the image; pixels inside the box come from ``images[perm]``, the rest
    from ``images``. The returned lam is adjusted to the clipped box:
    ``1 - box_area / (H * W)``, the fraction of each image that is still its own. Train
    with ``lam * loss(labels) + (1 - lam) * loss(labels[perm])``. Works on any dtype.
    ``alpha <= 0`` disables it.

    Returns:
      (mixed_images same shape/dtype, perm int32 (B,), lam float32 scalar in [0, 1]).
    """
    b, h, w = images.shape[:3]
    if alpha <= 0:
        return images, jnp.arange(b, dtype=jnp.int32), jnp.float32(1.0)
    k_lam, k_perm, k_y, k_x = jax.random.split(key, 4)
    lam = _beta_lam(k_lam, alpha)
    perm = jax.random.permutation(k_perm, b).astype(jnp.int32)
    ratio = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(h * ratio).astype(jnp.int32)
    cut_w = jnp.floor(w * ratio).astype(jnp.int32)
    cy = jax.random.randint(k_y, (), 0, h)
    cx = jax.random.randint(k_x, (), 0, w)
    y0, y1 = jnp.clip(cy - cut_h // 2, 0, h), jnp.clip(cy + cut_h - cut_h // 2, 0, h)
    x0, x1 = jnp.clip(cx - cut_w // 2, 0, w), jnp.clip(cx + cut_w - cut_w // 2, 0, w)
    ys = jnp.arange(h)[:, None]
    xs = jnp.arange(w)[None, :]
    box = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)  # (H, W)
    mixed = jnp.where(box[None, :, :, None], images[perm], images)
    lam_adj = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / float(h * w)
    return mixed, perm, lam_adj
