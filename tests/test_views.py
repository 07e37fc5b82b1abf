"""Two augmented views (config.augment.views='weak,strong'): the strong view's RandAugment ops
against PIL (the reference applies them to PIL images) or a numpy statement, its determinism in
the per-example keys, and a tiny MLKD run end to end (views in the step, the teacher cache bypassed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from kdjax import config as kconfig
from kdjax import data as kdata
from kdjax import train
from tests.test_train import read_metrics, tiny_digits_config

H = W = 12

# (op, magnitude, the reference's PIL statement, tolerance in grey levels)
PIL_OPS = [
    ("identity", 0.5, lambda im, v: im, 0),
    ("autocontrast", 0.5, lambda im, v: ImageOps.autocontrast(im), 1),
    ("brightness", 0.37, lambda im, v: ImageEnhance.Brightness(im).enhance(v), 1),
    ("color", 0.41, lambda im, v: ImageEnhance.Color(im).enhance(v), 1),
    ("contrast", 0.63, lambda im, v: ImageEnhance.Contrast(im).enhance(v), 1),
    ("posterize", 5.7, lambda im, v: ImageOps.posterize(im, int(v)), 0),
    ("rotate", 17.0, lambda im, v: im.rotate(v), 0),
    ("shear_x", 0.23, lambda im, v: im.transform(im.size, Image.AFFINE, (1, v, 0, 0, 1, 0)), 0),
    ("shear_y", -0.19, lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, 0, v, 1, 0)), 0),
    ("solarize", 100.5, lambda im, v: ImageOps.solarize(im, v), 0),
    ("translate_x", 0.21, lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, v * im.size[0], 0, 1, 0)), 0),
    ("translate_y", -0.27, lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, 0, 0, 1, v * im.size[1])), 0),
]


def _images(c, n=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(20, 230, (n, H, W, c)).astype(np.uint8)
    x[0, :3] = rng.integers(0, 256, (3, W, c))  # full range in places
    return x


def _all_ops(images):
    """Every op on every image at its test magnitude: one compile."""
    return {name: jax.vmap(lambda im, v=v, name=name: kdata.RANDAUGMENT_OPS[name][0](im, jnp.float32(v)))(images)
            for name, v, _, _ in PIL_OPS}


def test_each_strong_op_equals_pil_on_rgb_and_grey_images():
    assert sorted(kdata.RANDAUGMENT_OPS) == sorted(n for n, *_ in PIL_OPS)
    for c, mode in ((3, "RGB"), (1, "L")):
        images = _images(c)
        got = jax.device_get(jax.jit(_all_ops)(images))
        for name, v, pil, tol in PIL_OPS:
            lo, hi = kdata.RANDAUGMENT_OPS[name][1]
            assert lo <= v <= hi, name
            assert got[name].dtype == np.uint8 and got[name].shape == images.shape, name
            for im, out in zip(images, got[name]):
                want = np.asarray(pil(Image.fromarray(im.squeeze(-1) if c == 1 else im, mode), v)).reshape(im.shape)
                diff = np.abs(out.astype(int) - want.astype(int))
                assert diff.max() <= tol and (diff > 0).mean() < 0.05, (name, mode, diff.max(), (diff > 0).mean())


def _np_cutout(im, v, cy, cx):
    im = im.copy()
    s = v * im.shape[1]
    y0, x0 = int(max(0.0, cy - s / 2)), int(max(0.0, cx - s / 2))
    fill = (125, 123, 114) if im.shape[-1] == 3 else (121,)
    for y in range(im.shape[0]):
        for x in range(im.shape[1]):
            if y0 <= y < y0 + s and x0 <= x < x0 + s:
                im[y, x] = fill
    return im


def test_strong_view_is_keyed_ops_then_cutout_and_deterministic():
    """The strong view (no crop/flip here) of example i: two ops drawn from its key with their
    magnitudes, then Cutout (a numpy restatement of the draws); the same keys give the same views,
    another key another view, and examples do not influence each other."""
    images = _images(3, n=4, seed=1)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(7), i))(jnp.arange(4))
    fn = jax.jit(lambda k, x: kdata.strong_augment(k, x, crop_padding=0, flip=False))
    got = np.asarray(fn(keys, images))
    assert got.dtype == np.uint8 and got.shape == images.shape
    np.testing.assert_array_equal(np.asarray(fn(keys, images)), got)
    np.testing.assert_array_equal(np.asarray(fn(keys[::-1], images[::-1]))[::-1], got)  # per example
    assert not np.array_equal(np.asarray(fn(keys[::-1], images)), got)
    names = list(kdata.RANDAUGMENT_OPS)
    op = jax.jit(lambda i, im, v: jax.lax.switch(i, [f for f, _ in kdata.RANDAUGMENT_OPS.values()], im, v))
    for key, im, out in zip(keys, images, got):
        k_op, k_mag, k_cut = jax.random.split(jax.random.split(key)[1], 3)  # [0]: the crop and flip
        which = np.asarray(jax.random.randint(k_op, (2,), 0, len(names)))
        u = np.asarray(jax.random.uniform(k_mag, (2,)))
        for i, w in enumerate(which):
            lo, hi = kdata.RANDAUGMENT_OPS[names[w]][1]
            im = np.asarray(op(w, im, np.float32(lo + (hi - lo) * u[i])))
        c = np.asarray(jax.random.uniform(k_cut, (3,)))
        np.testing.assert_array_equal(out, _np_cutout(im, c[0] * 0.5, c[1] * H, c[2] * W))


def test_views_bypass_or_refuse_the_teacher_cache():
    kw = dict(crop_padding=0, flip=False, mixup_alpha=0.0, cutmix_alpha=0.0, teacher_source="trained")
    assert kdata.cache_obstacle(**kw) is None
    assert "strong augmented view" in kdata.cache_obstacle(**kw, views="weak,strong")
    with pytest.raises(ValueError, match="cache_teacher='on' is invalid here: the strong augmented view"):
        kconfig.validate(tiny_digits_config(**{"distill.method": "mlkd", "augment.views": "weak,strong",
                                             "distill.cache_teacher": "on"}))


def test_mlkd_on_two_views_end_to_end(tmp_path):
    """mlkd on the two views (no crop/flip: only the strong view is random) with a Mean Teacher
    (one stage): finite MLKD terms that add up, and the two views really differ."""
    workdir = str(tmp_path / "run")
    summary = train.run(tiny_digits_config(**{"stages": "student", "teacher.source": "ema", "distill.method": "mlkd",
                                              "augment.views": "weak,strong"}), workdir)
    assert summary["student"]["terms"] == {"ce": 0.1, "mlkd": 0.9, "mlkd_ce_strong": 0.1}
    rows = read_metrics(workdir, "student")
    for r in rows:
        assert all(np.isfinite(r[k]) for k in ("loss", "loss/mlkd", "loss/mlkd_ce_strong")), r
        np.testing.assert_allclose(r["loss"], 0.1 * r["loss/ce"] + 0.9 * r["loss/mlkd"] + 0.1 * r["loss/mlkd_ce_strong"],
                                   rtol=1e-5)
        # its three levels are logged beside it and add up to it (not in the total)
        np.testing.assert_allclose(sum(r[f"loss/mlkd/{k}"] for k in ("instance", "class", "batch")), r["loss/mlkd"],
                                   rtol=1e-5)
    assert rows[0]["loss/mlkd_ce_strong"] != pytest.approx(rows[0]["loss/ce"], rel=1e-3)  # another view
