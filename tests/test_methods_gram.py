"""The Gram-matrix methods (kdjax/distill/gram.py): ICKD (Liu et al. ICCV 2021) against a numpy
statement of the official ICKDLoss (ADLab-AutoDrive/ICKD Cifar100/distiller_zoo/ICKD.py), embedding
included, SKD (Jeong et al. CVPR 2026) against torchdistill's SKDInstanceLoss/SKDDirectionLoss and
SRD (Miles, Mikolajczyk AAAI 2024, kdjax/distill/projector.py) against torchdistill's SRDLoss on
SRDModelWrapper's features and DIST+ (Huang et al. TPAMI 2025) against torchdistill's DISTPlusLoss;
all four trained end to end."""

import functools

import jax
import numpy as np
import pytest

from kdjax import distill, losses


def np_ickd_batch_loss(f_s, f_t):
    """ICKDLoss.batch_loss after embed_s, on NCHW arrays, as written there: view(bsz, ch, -1),
    bmm with its transpose, F.normalize(dim=2), sum of squares / (ch * bsz)."""
    bsz, ch = f_s.shape[0], f_s.shape[1]
    f_s, f_t = f_s.reshape(bsz, ch, -1).astype(np.float64), f_t.reshape(bsz, ch, -1).astype(np.float64)

    def normalized_gram(f):
        g = f @ f.transpose(0, 2, 1)
        return g / np.maximum(np.linalg.norm(g, axis=2, keepdims=True), 1e-12)

    d = normalized_gram(f_s) - normalized_gram(f_t)
    return float((d * d).reshape(bsz, -1).sum() / (ch * bsz))


def _nchw(x):
    return np.transpose(x, (0, 3, 1, 2))


def test_ickd_loss_and_method_match_the_reference():
    rng = np.random.default_rng(0)
    s = rng.standard_normal((3, 4, 4, 6)).astype(np.float32)  # student: 6 channels, 4x4
    t = np.maximum(rng.standard_normal((3, 2, 2, 10)), 0).astype(np.float32)  # teacher: 10 channels, 2x2
    same = rng.standard_normal((3, 5, 5, 10)).astype(np.float32)
    np.testing.assert_allclose(jax.jit(losses.ickd)(same, t), np_ickd_batch_loss(_nchw(same), _nchw(t)), rtol=1e-5)

    terms = distill.build_terms(distill.get_config("ickd").to_dict())
    assert [(x.name, x.weight, x.student, x.teacher) for x in terms] == [
        ("ce", 1.0, ("logits",), ()), ("ickd", 2.5, ("stage[-1]",), ("stage[-1]",))]
    d = distill.Distiller(terms[1:])
    sf, tf = {"stage1": s, "stage2": s}, {"stage1": t, "stage2": t}
    ctx = distill.Context(labels=np.zeros(3, np.int32), train=False)
    variables = jax.jit(lambda k, a, b: d.init(k, a, b, ctx))(jax.random.key(0, impl="rbg"), sf, tf)
    values = jax.jit(lambda v, a, b: d.apply(v, a, b, ctx))(variables, sf, tf)
    kernel = np.asarray(variables["params"]["ickd_embed"]["conv"]["kernel"])[0, 0]  # (6, 10)
    embedded = s @ kernel / np.sqrt(1.0 + 1e-5)  # eval-mode BN at its initial statistics
    np.testing.assert_allclose(values["ickd"], np_ickd_batch_loss(_nchw(embedded), _nchw(t)), rtol=1e-4)
    with pytest.raises(ValueError, match=r"^ickd: student_feat and teacher_feat must have the same last-axis size"):
        losses.ickd(s, t)


def test_ickd_skd_srd_and_dist_plus_train_end_to_end(tmp_path):
    from tests.test_train import read_metrics, tiny_digits_config
    from kdjax import train

    workdir = str(tmp_path / "run")
    summary = train.run(tiny_digits_config(**{"stages": "student", "teacher.source": "ema", "student.model": "cnn_tiny",
                                              "teacher.model": "cnn_tiny", "distill.method": "ickd+skd+srd+dist_plus"}), workdir)
    assert summary["student"]["terms"] == {"ce": 1.0, "ickd": 2.5, "skd": 1.0, "srd": 1.0, "dist_plus": 2.0}
    rows = read_metrics(workdir, "student")
    keys = ("loss/ickd", "loss/skd", "loss/skd/direction", "loss/srd", "loss/dist_plus")
    assert rows and all(np.isfinite(r[k]) for r in rows for k in keys)
    r = rows[0]
    np.testing.assert_allclose(r["loss"], r["loss/ce"] + 2.5 * r["loss/ickd"] + r["loss/skd"] + r["loss/srd"]
                               + 2.0 * r["loss/dist_plus"], rtol=1e-5)


def np_torchdistill_skd(s, t, T=4.0, tikhonov=0.1):
    """torchdistill SKDInstanceLoss + SKDDirectionLoss (mid_level.py @3e4373c), as written there:
    kl_div(batchmean) at T without T^2; normalize(p=2, dim=1) Gram matrices, torch.cov(diff.t())
    + tikhonov I, its inverse (cholesky_inverse), sqrt of the per-row Mahalanobis form, mean."""
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)

    def lsm(z):
        z = z / T - (z / T).max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    instance = (np.exp(lsm(t)) * (lsm(t) - lsm(s))).sum() / s.shape[0]
    gram = lambda z: (z / np.linalg.norm(z, axis=1, keepdims=True)) @ (z / np.linalg.norm(z, axis=1, keepdims=True)).T  # noqa: E731
    diff = gram(s) - gram(t)
    cov = np.cov(diff.T) + tikhonov * np.eye(diff.shape[1])
    chol = np.linalg.cholesky(cov)
    inv = np.linalg.inv(chol @ chol.T)
    direction = np.sqrt(np.einsum("bi,ij,bj->b", diff, inv, diff)).mean()
    return instance, direction


def test_skd_loss_and_method_match_torchdistill():
    rng = np.random.default_rng(1)
    s = (2.0 * rng.standard_normal((8, 5))).astype(np.float32)
    t = (3.0 * rng.standard_normal((8, 5))).astype(np.float32)
    inst, direc = np_torchdistill_skd(s, t)
    got = jax.jit(lambda a, b: (losses.skd(a, b), losses.skd(a, b, 2.0, 0.5, 3.0, parts=True)))(s, t)
    np.testing.assert_allclose(got[0], inst + direc, rtol=1e-4)
    inst2, direc2 = np_torchdistill_skd(s, t, 2.0, 0.5)
    np.testing.assert_allclose(got[1]["instance"], inst2, rtol=1e-4)
    np.testing.assert_allclose(got[1]["direction"], direc2, rtol=1e-4)
    # the method: no CE, weight 1, its two parts logged
    terms = distill.build_terms(distill.get_config("skd").to_dict())
    assert [(x.name, x.weight, x.global_batch) for x in terms] == [("skd", 1.0, True)]
    ctx = distill.Context(labels=np.zeros(8, np.int32), train=False)
    values = jax.jit(lambda a, b: distill.Distiller(terms).apply({}, {"logits": a}, {"logits": b}, ctx))(s, t)
    np.testing.assert_allclose(values["skd"], inst + direc, rtol=1e-4)
    np.testing.assert_allclose(values["skd/direction"], direc, rtol=1e-4)
    # equal logits: the direction term is 0 with a finite (zero) gradient
    g = jax.grad(lambda a: losses.skd(a, t))(t)
    assert np.all(np.isfinite(np.asarray(g)))
    with pytest.raises(ValueError, match=r"^distill.skd.tikhonov must be > 0"):
        distill.build_terms({"method": "skd", "skd": {"tikhonov": 0.0}})


def np_torchdistill_srd(f_s, f_t, s, t, exponent=4.0, T=1.0):
    """torchdistill SRDLoss.forward (mid_level.py @3e4373c) as written there, on the wrapper's
    normalised features: 2 * log(|f_s - f_t|^p summed) + KLDivLoss(batchmean) at T."""
    f_s, f_t, s, t = (np.asarray(a, np.float64) for a in (f_s, f_t, s, t))

    def lsm(z):
        z = z / T - (z / T).max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    feat = np.log((np.abs(f_s - f_t) ** exponent).sum())
    kl = (np.exp(lsm(t)) * (lsm(t) - lsm(s))).sum() / s.shape[0]
    return 2 * feat + kl


def np_batch_norm_train(x, eps=1e-4):  # BatchNorm1d(affine=False) in train mode: batch statistics
    return (x - x.mean(0)) / np.sqrt(x.var(0) + eps)


def test_srd_loss_and_method_match_torchdistill():
    rng = np.random.default_rng(2)
    e_s, e_t = rng.standard_normal((8, 6)).astype(np.float32), rng.standard_normal((8, 4)).astype(np.float32)
    s, t = (2.0 * rng.standard_normal((8, 5))).astype(np.float32), (3.0 * rng.standard_normal((8, 5))).astype(np.float32)
    w = (0.5 * rng.standard_normal((6, 4))).astype(np.float32)
    f_s, f_t = np_batch_norm_train(e_s @ w), np_batch_norm_train(e_t)  # the wrapper in train mode
    got = jax.jit(lambda *a: losses.srd(*a))(f_s.astype(np.float32), f_t.astype(np.float32), s, t)
    np.testing.assert_allclose(got, np_torchdistill_srd(f_s, f_t, s, t), rtol=1e-5)

    terms = distill.build_terms(distill.get_config("srd").to_dict())
    assert [(x.name, x.weight, x.global_batch) for x in terms] == [("ce", 1.0, False), ("srd", 1.0, True)]
    d = distill.Distiller(terms[1:])
    sf, tf = {"embedding": e_s, "logits": s}, {"embedding": e_t, "logits": t}
    ctx = distill.Context(labels=np.zeros(8, np.int32), train=False)
    variables = jax.jit(lambda k, a, b: d.init(k, a, b, ctx))(jax.random.key(0, impl="rbg"), sf, tf)
    values = jax.jit(lambda v, a, b: d.apply(v, a, b, ctx))(variables, sf, tf)
    lin = variables["params"]["srd_student_norm"]["linear"]
    scale = np.sqrt(1.0 + 1e-4)  # eval mode: the running statistics at their initial values
    proj = (e_s @ np.asarray(lin["kernel"]) + np.asarray(lin["bias"])) / scale
    np.testing.assert_allclose(values["srd"], np_torchdistill_srd(proj, e_t / scale, s, t), rtol=1e-4)


def np_torchdistill_dist_plus(zs, zt, fs_nhwc, ft_nhwc, beta, gamma, iota, kappa, tau, eps=1e-8):
    """torchdistill DISTPlusLoss.forward (mid_level.py @3e4373c) as written there, on NCHW maps:
    DISTLoss (softmax at tau, 1 - mean Pearson of rows and of columns, times tau^2) + iota *
    channel_relation (the mean correlation over channels at every position, added as it is) +
    kappa * spatial_relation (DIST's inter-class relation of the channel-summed maps, transposed)."""
    zs, zt = np.asarray(zs, np.float64), np.asarray(zt, np.float64)

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    def inter(a, b):  # 1 - cosine_similarity(a - a.mean(1), b - b.mean(1), eps).mean()
        a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
        return 1 - ((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + eps)).mean()

    ys, yt = softmax(zs / tau), softmax(zt / tau)
    dist = beta * tau ** 2 * inter(ys, yt) + gamma * tau ** 2 * inter(ys.T, yt.T)
    fs, ft = (np.transpose(np.asarray(f, np.float64), (0, 3, 1, 2)) for f in (fs_nhwc, ft_nhwc))
    cs, ct = fs - fs.mean(1, keepdims=True), ft - ft.mean(1, keepdims=True)
    channel = ((cs * ct).sum(1) / (np.sqrt((cs ** 2).sum(1) * (ct ** 2).sum(1)) + eps)).mean()
    a_s, a_t = fs.sum(1).reshape(fs.shape[0], -1), ft.sum(1).reshape(ft.shape[0], -1)
    return dist + iota * channel + kappa * inter(a_s.T, a_t.T)


@pytest.mark.parametrize("beta, gamma, iota, kappa, tau", [(2.0, 2.0, 1.0, 1.0, 1.0), (1.0, 0.5, 0.3, 2.0, 4.0)])
def test_dist_plus_loss_matches_torchdistill(beta, gamma, iota, kappa, tau):
    rng = np.random.default_rng(3)
    zs, zt = (2.0 * rng.standard_normal((6, 5))).astype(np.float32), (2.0 * rng.standard_normal((6, 5))).astype(np.float32)
    fs = rng.standard_normal((6, 3, 4, 7)).astype(np.float32)
    ft = (rng.standard_normal((6, 3, 4, 7)) + 0.3).astype(np.float32)
    got = jax.jit(functools.partial(losses.dist_plus, beta=beta, gamma=gamma, iota=iota, kappa=kappa,
                                    temperature=tau))(zs, zt, fs, ft)
    np.testing.assert_allclose(got, np_torchdistill_dist_plus(zs, zt, fs, ft, beta, gamma, iota, kappa, tau), rtol=1e-5)
    # iota = kappa = 0 is DIST itself
    np.testing.assert_allclose(losses.dist_plus(zs, zt, fs, ft, beta, gamma, 0.0, 0.0, tau),
                               losses.dist(zs, zt, beta, gamma, tau), rtol=1e-6)
    with pytest.raises(ValueError, match=r"^dist_plus: student_feat and teacher_feat must have the same shape"):
        losses.dist_plus(zs, zt, fs, ft[..., :3])
    terms = distill.build_terms(distill.get_config("dist_plus").to_dict())
    assert [(x.name, x.weight, x.student, x.global_batch) for x in terms] == [
        ("ce", 1.0, ("logits",), False), ("dist_plus", 2.0, ("logits", "stage[-1]"), True)]
