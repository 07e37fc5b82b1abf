"""Tests for kdjax.data: loaders (digits, tfds mock, manual_dir archives; kdjax.data.sources), batching
(kdjax.data.batches), augmentations (kdjax.data.augmentation)."""

import functools
import gzip
import io
import os
import pickle
import socket
import subprocess
import sys
import tarfile
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import data
from kdjax.data import batches, sources

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- digits


@pytest.fixture(scope='module')
def digits():
    return data.load('digits')


def test_digits_shapes_dtypes_sizes(digits):
    assert digits.name == 'digits'
    assert digits.num_classes == 10
    assert digits.image_shape == (8, 8, 1)
    assert digits.val is None
    assert digits.train.images.shape == (1437, 8, 8, 1)
    assert digits.test.images.shape == (360, 8, 8, 1)
    for split in (digits.train, digits.test):
        assert split.images.dtype == np.uint8
        assert split.labels.dtype == np.int32
        assert split.labels.min() == 0 and split.labels.max() == 9
    assert digits.train.images.max() == 255  # 16 * 255 / 16
    assert len(digits.mean) == len(digits.std) == 1
    assert 0 < digits.mean[0] < 1 and 0 < digits.std[0] < 1


def test_digits_values_scaled_from_sklearn(digits):
    from sklearn.datasets import load_digits

    raw = load_digits().images
    allowed = set(np.rint(np.arange(17) * 255 / 16).astype(int).tolist())
    assert set(np.unique(digits.train.images).tolist()) <= allowed
    # every train/test image is one of sklearn's images, and train+test is all of them exactly once
    expected = {np.rint(im * 255 / 16).astype(np.uint8).tobytes() for im in raw}
    got = [im[..., 0].tobytes() for im in np.concatenate([digits.train.images, digits.test.images])]
    assert len(got) == len(raw) and set(got) == expected


def test_digits_balanced_and_deterministic(digits):
    counts_train = np.bincount(digits.train.labels, minlength=10)
    counts_test = np.bincount(digits.test.labels, minlength=10)
    assert counts_train.max() / counts_train.min() < 1.1
    assert counts_test.max() - counts_test.min() <= 2
    again = data.load('digits', seed=123)  # the test split does not depend on the run seed
    np.testing.assert_array_equal(again.test.images, digits.test.images)
    np.testing.assert_array_equal(again.train.labels, digits.train.labels)
    assert again.mean == digits.mean and again.std == digits.std


def test_validation_split(digits):
    a = data.load('digits', val_size=0.2, seed=1)
    b = data.load('digits', val_size=0.2, seed=1)
    c = data.load('digits', val_size=0.2, seed=2)
    n = len(digits.train)
    assert len(a.val) == round(0.2 * n) and len(a.train) + len(a.val) == n
    np.testing.assert_array_equal(a.val.images, b.val.images)
    assert not np.array_equal(a.val.labels, c.val.labels) or not np.array_equal(a.val.images, c.val.images)
    # stratified: every class in val, roughly 20 % of each
    frac = np.bincount(a.val.labels, minlength=10) / np.bincount(digits.train.labels, minlength=10)
    assert np.all(np.abs(frac - 0.2) < 0.02)
    # train + val is exactly the original train
    both = sorted(im.tobytes() for im in np.concatenate([a.train.images, a.val.images]))
    assert both == sorted(im.tobytes() for im in digits.train.images)
    # normalisation constants come from the full train split: independent of val_size
    assert a.mean == digits.mean
    # absolute count
    assert len(data.load('digits', val_size=100).val) == 100
    assert a.test is not None and len(a.test) == 360


@pytest.mark.parametrize('bad', [-0.1, 1.5, 5000, 'x', True])
def test_bad_val_size(bad):
    with pytest.raises(data.DataError):
        data.load('digits', val_size=bad)


def test_unknown_name():
    with pytest.raises(data.DataError, match='choose one of'):
        data.load('imagenet')


def test_digits_and_manual_dir_work_without_tensorflow(tmp_path):
    _write_idx_set(tmp_path, n_train=5, n_test=3, rows=4, cols=4, gz=True, seed=0)
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules['tensorflow'] = None           # make `import tensorflow` fail
        sys.modules['tensorflow_datasets'] = None
        from kdjax import data
        ds = data.load('digits')
        assert ds.train.images.shape == (1437, 8, 8, 1)
        ds = data.load('mnist', manual_dir={str(tmp_path)!r})
        assert ds.train.images.shape == (5, 4, 4, 1)
        try:
            data.load('cifar10')
        except data.DataError as e:
            assert 'kdjax[tfds]' in str(e) and 'manual_dir' in str(e), e
        else:
            raise AssertionError('expected DataError')
        print('OK')
        """
    )
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and 'OK' in out.stdout, out.stderr[-2000:]


# ----------------------------------------------------------------- manual_dir archives


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, '>u4').tobytes()
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


def _write_idx_set(folder, *, n_train, n_test, rows, cols, gz, seed):
    rng = np.random.default_rng(seed)
    arrays = {
        'train-images-idx3-ubyte': rng.integers(0, 256, (n_train, rows, cols), dtype=np.uint8),
        'train-labels-idx1-ubyte': rng.integers(0, 10, (n_train,), dtype=np.uint8),
        't10k-images-idx3-ubyte': rng.integers(0, 256, (n_test, rows, cols), dtype=np.uint8),
        't10k-labels-idx1-ubyte': rng.integers(0, 10, (n_test,), dtype=np.uint8),
    }
    for stem, arr in arrays.items():
        raw = _idx_bytes(arr)
        if gz:
            with gzip.open(os.path.join(folder, stem + '.gz'), 'wb') as f:
                f.write(raw)
        else:
            with open(os.path.join(folder, stem), 'wb') as f:
                f.write(raw)
    return arrays


@pytest.mark.parametrize('name,gz', [('mnist', True), ('fashion_mnist', False)])
def test_manual_idx_roundtrip(tmp_path, name, gz):
    arrays = _write_idx_set(tmp_path, n_train=12, n_test=7, rows=28, cols=28, gz=gz, seed=1)
    ds = data.load(name, manual_dir=tmp_path)
    assert ds.image_shape == (28, 28, 1) and ds.num_classes == 10
    np.testing.assert_array_equal(ds.train.images[..., 0], arrays['train-images-idx3-ubyte'])
    np.testing.assert_array_equal(ds.train.labels, arrays['train-labels-idx1-ubyte'].astype(np.int32))
    np.testing.assert_array_equal(ds.test.images[..., 0], arrays['t10k-images-idx3-ubyte'])
    np.testing.assert_array_equal(ds.test.labels, arrays['t10k-labels-idx1-ubyte'].astype(np.int32))
    assert ds.train.images.dtype == np.uint8 and ds.train.labels.dtype == np.int32
    x = arrays['train-images-idx3-ubyte'] / 255.0
    np.testing.assert_allclose(ds.mean, [x.mean()], rtol=1e-9)
    np.testing.assert_allclose(ds.std, [x.std()], rtol=1e-9)


def test_manual_idx_missing_files(tmp_path):
    _write_idx_set(tmp_path, n_train=3, n_test=2, rows=4, cols=4, gz=True, seed=0)
    os.remove(tmp_path / 't10k-labels-idx1-ubyte.gz')
    with pytest.raises(data.DataError) as e:
        data.load('fashion_mnist', manual_dir=tmp_path)
    msg = str(e.value)
    assert '\n' not in msg and 't10k-labels-idx1-ubyte.gz' in msg and 'train-images-idx3-ubyte.gz' in msg


def test_manual_idx_corrupt(tmp_path):
    _write_idx_set(tmp_path, n_train=3, n_test=2, rows=4, cols=4, gz=True, seed=0)
    with gzip.open(tmp_path / 'train-images-idx3-ubyte.gz', 'wb') as f:
        f.write(b'\x00\x00\x08\x03' + np.asarray([3, 4, 4], '>u4').tobytes() + b'\x00' * 10)  # truncated
    with pytest.raises(data.DataError, match='IDX header'):
        data.load('mnist', manual_dir=tmp_path)


def _add_pickle(tar, arcname, obj):
    payload = pickle.dumps(obj, protocol=2)
    info = tarfile.TarInfo(arcname)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def _fake_cifar(rng, n, num_classes, fine):
    x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    y = rng.integers(0, num_classes, (n,)).tolist()
    batch = {b'data': x, b'batch_label': b'fake'}
    if fine:
        batch[b'fine_labels'] = y
        batch[b'coarse_labels'] = [v // 5 for v in y]
    else:
        batch[b'labels'] = y
    return batch, x, np.asarray(y, np.int32)


def _expected_nhwc(rows):
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def test_manual_cifar10_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    xs, ys = [], []
    with tarfile.open(tmp_path / 'cifar-10-python.tar.gz', 'w:gz') as tar:
        for i in range(1, 6):
            batch, x, y = _fake_cifar(rng, 3, 10, fine=False)
            _add_pickle(tar, f'cifar-10-batches-py/data_batch_{i}', batch)
            xs.append(x), ys.append(y)
        test_batch, tx, ty = _fake_cifar(rng, 4, 10, fine=False)
        _add_pickle(tar, 'cifar-10-batches-py/test_batch', test_batch)
    ds = data.load('cifar10', manual_dir=tmp_path)
    assert ds.image_shape == (32, 32, 3) and ds.num_classes == 10
    np.testing.assert_array_equal(ds.train.images, _expected_nhwc(np.concatenate(xs)))
    np.testing.assert_array_equal(ds.train.labels, np.concatenate(ys))
    np.testing.assert_array_equal(ds.test.images, _expected_nhwc(tx))
    np.testing.assert_array_equal(ds.test.labels, ty)
    # pixel (0, 0) of image 0: channels R, G, B are at offsets 0, 1024, 2048 of the row
    assert tuple(ds.train.images[0, 0, 0]) == (xs[0][0, 0], xs[0][0, 1024], xs[0][0, 2048])
    assert len(ds.mean) == 3


def test_manual_cifar100_roundtrip_and_extracted_folder(tmp_path):
    rng = np.random.default_rng(1)
    train, x, y = _fake_cifar(rng, 6, 100, fine=True)
    test, tx, ty = _fake_cifar(rng, 2, 100, fine=True)
    archive_dir = tmp_path / 'a'
    archive_dir.mkdir()
    with tarfile.open(archive_dir / 'cifar-100-python.tar.gz', 'w:gz') as tar:
        _add_pickle(tar, 'cifar-100-python/train', train)
        _add_pickle(tar, 'cifar-100-python/test', test)
        _add_pickle(tar, 'cifar-100-python/meta', {b'fine_label_names': []})
    extracted = tmp_path / 'b' / 'cifar-100-python'
    extracted.mkdir(parents=True)
    for fname, obj in (('train', train), ('test', test)):
        (extracted / fname).write_bytes(pickle.dumps(obj, protocol=2))
    for folder in (archive_dir, tmp_path / 'b'):
        ds = data.load('cifar100', manual_dir=folder, val_size=2)
        assert ds.num_classes == 100
        np.testing.assert_array_equal(ds.test.images, _expected_nhwc(tx))
        np.testing.assert_array_equal(ds.test.labels, ty)
        got = sorted(zip(np.concatenate([ds.train.labels, ds.val.labels]).tolist(),
                         [im.tobytes() for im in np.concatenate([ds.train.images, ds.val.images])]))
        assert got == sorted(zip(y.tolist(), [im.tobytes() for im in _expected_nhwc(x)]))


def test_manual_cifar_missing(tmp_path):
    with pytest.raises(data.DataError, match='cifar-10-python.tar.gz') as e:
        data.load('cifar10', manual_dir=tmp_path)
    assert '\n' not in str(e.value)
    with tarfile.open(tmp_path / 'cifar-100-python.tar.gz', 'w:gz') as tar:
        _add_pickle(tar, 'cifar-100-python/train', _fake_cifar(np.random.default_rng(0), 2, 100, True)[0])
    with pytest.raises(data.DataError, match='lacks test'):
        data.load('cifar100', manual_dir=tmp_path)
    with pytest.raises(data.DataError, match='not a folder'):
        data.load('cifar100', manual_dir=tmp_path / 'nope')


# ---------------------------------------------------------------------------- tfds


@pytest.fixture(scope='module')
def tfds():
    return pytest.importorskip('tensorflow_datasets')


@pytest.mark.parametrize('name,shape', [('cifar10', (32, 32, 3)), ('mnist', (28, 28, 1))])
def test_tfds_mock(tfds, tmp_path, name, shape):
    with tfds.testing.mock_data(num_examples=37):
        ds = data.load(name, data_dir=tmp_path, val_size=5, download=False)
    assert ds.image_shape == shape and ds.num_classes == 10
    assert len(ds.train) == 32 and len(ds.val) == 5 and len(ds.test) == 37
    for split in (ds.train, ds.val, ds.test):
        assert split.images.dtype == np.uint8 and split.labels.dtype == np.int32
        assert split.labels.min() >= 0 and split.labels.max() < 10
    assert len(ds.mean) == shape[-1]


def test_tfds_missing_no_download_fails_fast(tfds, tmp_path):
    t0 = time.monotonic()
    with pytest.raises(data.DataError) as e:
        data.load('mnist', data_dir=tmp_path, download=False)
    assert time.monotonic() - t0 < 10
    msg = str(e.value)
    assert '\n' not in msg and 'not prepared' in msg and str(tmp_path) in msg
    assert 'download_and_prepare' in msg and 'manual_dir' in msg and 'train-images-idx3-ubyte.gz' in msg


def test_tfds_no_network_fails_fast(tfds, tmp_path, monkeypatch):
    calls = []

    def unreachable(scheme, host, port, timeout=2.0):
        calls.append(host)
        return False

    monkeypatch.setattr(sources, '_host_reachable', unreachable)
    t0 = time.monotonic()
    with pytest.raises(data.DataError, match='no network') as e:
        data.load('cifar10', data_dir=tmp_path, download=True)
    assert time.monotonic() - t0 < 10
    assert calls == ['www.cs.toronto.edu']
    assert '\n' not in str(e.value) and 'cifar-10-python.tar.gz' in str(e.value)


def test_host_reachable_is_bounded(monkeypatch):
    server = socket.socket()
    server.bind(('127.0.0.1', 0))
    server.listen(1)
    port = server.getsockname()[1]
    monkeypatch.setattr('urllib.request.getproxies', lambda: {})
    try:
        assert sources._host_reachable('http', '127.0.0.1', port, timeout=2)
    finally:
        server.close()
    assert not sources._host_reachable('http', '127.0.0.1', port, timeout=2)  # closed: refused at once

    def hang(*a, **k):  # a resolver/connect that does not answer in time
        time.sleep(3)
        raise OSError('timed out')

    monkeypatch.setattr(socket, 'create_connection', hang)
    t0 = time.monotonic()
    assert not sources._host_reachable('https', 'example.invalid', 443, timeout=0.3)
    assert time.monotonic() - t0 < 2


# ------------------------------------------------------------------------ batching


def test_steps_per_epoch():
    assert data.steps_per_epoch(100, 32) == 3
    assert data.steps_per_epoch(96, 32) == 3
    assert data.steps_per_epoch(10, 32) == 0


def test_batch_indices_epoch_is_permutation_and_deterministic():
    n, b = 103, 10
    steps = data.steps_per_epoch(n, b)
    kw = dict(seed=3, epoch=0)
    epoch = np.concatenate([data.batch_indices(n, b, step_in_epoch=s, **kw) for s in range(steps)])
    assert len(epoch) == steps * b and len(set(epoch.tolist())) == len(epoch)
    assert set(epoch.tolist()) <= set(range(n))
    full = np.random.default_rng((3, 0)).permutation(n)
    np.testing.assert_array_equal(epoch, full[: steps * b])
    batches._epoch_order.cache_clear()  # recomputed from scratch -> same (resume-safe)
    np.testing.assert_array_equal(data.batch_indices(n, b, step_in_epoch=4, **kw), epoch[40:50])
    other = np.concatenate([data.batch_indices(n, b, seed=3, epoch=1, step_in_epoch=s) for s in range(steps)])
    assert not np.array_equal(epoch, other)
    other_seed = data.batch_indices(n, b, seed=4, epoch=0, step_in_epoch=0)
    assert not np.array_equal(epoch[:b], other_seed)
    ordered = data.batch_indices(n, b, seed=3, epoch=0, step_in_epoch=2, shuffle=False)
    np.testing.assert_array_equal(ordered, np.arange(20, 30))


def test_batch_indices_process_slices_partition_global_batch():
    n, b, p = 1000, 64, 4
    for step in (0, 7):
        glob = data.batch_indices(n, b, seed=0, epoch=2, step_in_epoch=step)
        parts = [
            data.batch_indices(n, b, seed=0, epoch=2, step_in_epoch=step, process_index=i, process_count=p)
            for i in range(p)
        ]
        assert all(len(part) == b // p for part in parts)
        np.testing.assert_array_equal(np.concatenate(parts), glob)


def test_batch_indices_errors():
    with pytest.raises(data.DataError, match='not divisible'):
        data.batch_indices(100, 30, seed=0, epoch=0, step_in_epoch=0, process_count=4)
    with pytest.raises(data.DataError, match='exceeds'):
        data.batch_indices(10, 30, seed=0, epoch=0, step_in_epoch=0)
    with pytest.raises(data.DataError, match='step_in_epoch'):
        data.batch_indices(100, 30, seed=0, epoch=0, step_in_epoch=3)


@pytest.mark.parametrize('n,b,p', [(10, 4, 1), (10, 4, 2), (8, 4, 2), (3, 8, 4), (0, 4, 1)])
def test_eval_batches_cover_each_example_once(n, b, p):
    images = np.arange(n * 4, dtype=np.uint8).reshape(n, 2, 2, 1) + 1
    split = data.Split(images, np.arange(n, dtype=np.int32) + 1)
    seen = []
    per_proc = [list(data.eval_batches(split, b, process_index=i, process_count=p)) for i in range(p)]
    assert all(len(batches) == data.num_eval_batches(n, b) for batches in per_proc)
    for batches in per_proc:
        for im, lab, mask in batches:
            assert im.shape == (b // p, 2, 2, 1) and im.dtype == np.uint8
            assert lab.shape == (b // p,) and mask.shape == (b // p,) and mask.dtype == np.float32
            assert np.all(im[mask == 0] == 0) and np.all(lab[mask == 0] == 0)
            for i in np.nonzero(mask)[0]:
                np.testing.assert_array_equal(im[i], images[lab[i] - 1])
                seen.append(int(lab[i]) - 1)
    assert sorted(seen) == list(range(n))


# ---------------------------------------------------------------------- on-device ops


def test_normalize():
    x = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    out = data.normalize(x, mean, std)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, (x / 255.0 - np.array(mean)) / np.array(std), rtol=1e-5, atol=1e-6)
    assert jax.jit(data.normalize, static_argnums=3)(x, mean, std, jnp.bfloat16).dtype == jnp.bfloat16


def _keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


def _find_shift(out, img, p):
    h, w = img.shape[:2]
    padded = np.pad(img, ((p, p), (p, p), (0, 0)))
    for oy in range(2 * p + 1):
        for ox in range(2 * p + 1):
            if np.array_equal(padded[oy : oy + h, ox : ox + w], out):
                return oy - p, ox - p
    return None


@functools.lru_cache(maxsize=None)
def _jit_augment(crop_padding, flip):
    return jax.jit(functools.partial(data.augment, crop_padding=crop_padding, flip=flip))


def test_augment_crop_shift_bounded():
    b, h, w, p = 24, 8, 6, 2
    img = (np.arange(h * w * 2).reshape(1, h, w, 2) % 250 + 1).astype(np.uint8)
    images = np.repeat(img, b, axis=0)
    out = np.asarray(_jit_augment(p, False)(_keys(b), images))
    assert out.shape == images.shape and out.dtype == np.uint8
    shifts = [_find_shift(o, img[0], p) for o in out]
    assert all(s is not None for s in shifts)
    assert len(set(shifts)) > 3  # offsets vary across examples


def test_augment_flip():
    b = 32
    images = np.random.default_rng(0).integers(0, 256, (b, 5, 7, 3), dtype=np.uint8)
    out = np.asarray(_jit_augment(0, True)(_keys(b, 1), images))
    flipped = [np.array_equal(o, im[:, ::-1]) for o, im in zip(out, images)]
    same = [np.array_equal(o, im) for o, im in zip(out, images)]
    assert all(f or s for f, s in zip(flipped, same))
    assert 0 < sum(flipped) < b
    assert data.augment(_keys(b), images) is images  # no-op


def test_augment_per_example_keys_and_jit():
    b = 12
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (b, 8, 8, 3), dtype=np.uint8)
    keys = _keys(b, 5)
    aug = _jit_augment(3, True)
    full = np.asarray(aug(keys, images))
    # example i on its own (a batch of one, as on another device) gives the same result
    singles = np.concatenate([np.asarray(aug(keys[i : i + 1], images[i : i + 1])) for i in range(b)])
    np.testing.assert_array_equal(full, singles)
    # changing the other examples does not change example 0
    other = images.copy()
    other[1:] = rng.integers(0, 256, other[1:].shape, dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(aug(keys, other))[0], full[0])
    assert len({o.tobytes() for o in full}) == b
    raw_keys = jax.random.split(jax.random.PRNGKey(0), b)  # legacy (B, 2) uint32 keys trace too
    assert jax.eval_shape(aug, raw_keys, images).shape == images.shape


def test_mixup():
    images = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4, 4, 3)), jnp.float32)
    keys = _keys(5)
    mixed, perm, lam = jax.jit(jax.vmap(lambda k: data.mixup(k, images, 0.4)))(keys)
    for m, p, l in zip(np.asarray(mixed), np.asarray(perm), np.asarray(lam)):
        assert m.shape == images.shape and m.dtype == np.float32
        assert 0.0 <= float(l) <= 1.0
        assert sorted(p.tolist()) == list(range(8))
        np.testing.assert_allclose(m, l * images + (1 - l) * images[p], rtol=1e-5, atol=1e-6)
    assert len(set(np.asarray(lam).tolist())) > 1
    m, p, l = data.mixup(jax.random.key(0), images, 0.0)
    assert m is images and float(l) == 1.0


def test_cutmix():
    b, h, w = 8, 16, 12
    images = jnp.broadcast_to(jnp.arange(1, b + 1, dtype=jnp.float32)[:, None, None, None], (b, h, w, 3))
    mixed_all, perm_all, lam_all = jax.jit(jax.vmap(lambda k: data.cutmix(k, images, 1.0)))(_keys(10))
    mixed_all, perm_all, lam_all = np.asarray(mixed_all), np.asarray(perm_all), np.asarray(lam_all)
    for mixed, perm, lam in zip(mixed_all, perm_all, lam_all):
        lam = float(lam)
        assert mixed.shape == images.shape and 0.0 <= lam <= 1.0
        assert sorted(perm.tolist()) == list(range(b))
        for i in range(b):
            own, partner = i + 1, perm[i] + 1
            assert np.all((mixed[i] == own) | (mixed[i] == partner))  # every pixel from image or partner
            if partner != own:
                frac_partner = np.mean(mixed[i, ..., 0] == partner)
                assert abs(frac_partner - (1 - lam)) < 1e-6  # lam matches the box area
                ys, xs = np.nonzero(mixed[i, ..., 0] == partner)
                if len(ys):  # the pasted region is one axis-aligned box
                    assert len(ys) == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    assert len(set(lam_all.tolist())) > 1
    u8 = jax.ShapeDtypeStruct((4, 8, 8, 1), jnp.uint8)
    out = jax.eval_shape(lambda x: data.cutmix(jax.random.key(0), x, 1.0), u8)
    assert out[0].dtype == jnp.uint8 and out[0].shape == (4, 8, 8, 1)
