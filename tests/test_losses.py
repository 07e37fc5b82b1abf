"""Tests for kdjax.losses against independent float64 numpy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import losses as L

TOL = dict(rtol=1e-5, atol=1e-6)


def rnd(*shape, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def labels_for(b, k, seed=0):
    return np.random.default_rng(seed).integers(0, k, size=b).astype(np.int32)


# ---------------------------------------------------------------------------
# numpy references (float64, loop-based where that makes them obviously right)
# ---------------------------------------------------------------------------


def np_softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max()
    return z - m - np.log(np.sum(np.exp(z - m)))


def np_kl(p, log_q):
    """sum p (log p - log q) with 0 log 0 = 0 (torch kl_div semantics)."""
    out = 0.0
    for pk, lq in zip(p, log_q):
        if pk > 0:
            out += pk * (math.log(pk) - lq)
    return out


def np_ce(logits, labels, ls=0.0):
    b, k = logits.shape
    tot = 0.0
    for i in range(b):
        y = np.full(k, ls / k)
        y[labels[i]] += 1.0 - ls
        tot += -np.sum(y * np_log_softmax(logits[i]))
    return tot / b


def np_soft_ce(s, t, T):
    return np.mean([-np.sum(np_softmax(t[i] / T) * np_log_softmax(s[i] / T))
                    for i in range(len(s))])


def np_kd(s, t, T):
    return T * T * np.mean([np_kl(np_softmax(t[i] / T), np_log_softmax(s[i] / T))
                            for i in range(len(s))])


def np_dkd(s, t, y, alpha, beta, T):
    """Literal transcription of mdistiller dkd_loss."""
    b, k = s.shape
    tckd = nckd = 0.0
    for i in range(b):
        ps, pt = np_softmax(s[i] / T), np_softmax(t[i] / T)
        bs = np.array([ps[y[i]], ps.sum() - ps[y[i]]])
        bt = np.array([pt[y[i]], pt.sum() - pt[y[i]]])
        tckd += np_kl(bt, np.log(bs))
        mask = np.zeros(k)
        mask[y[i]] = 1.0
        qt = np_softmax(t[i] / T - 1000.0 * mask)
        lqs = np_log_softmax(s[i] / T - 1000.0 * mask)
        nckd += np_kl(qt, lqs)
    return alpha * tckd * T * T / b + beta * nckd * T * T / b


def np_pearson(u, v, eps=1e-8):
    u = u - u.mean()
    v = v - v.mean()
    return np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v) + eps)


def np_dist(s, t, beta, gamma, T):
    ys = np.stack([np_softmax(r / T) for r in s])
    yt = np.stack([np_softmax(r / T) for r in t])
    inter = 1 - np.mean([np_pearson(ys[i], yt[i]) for i in range(ys.shape[0])])
    intra = 1 - np.mean([np_pearson(ys[:, j], yt[:, j]) for j in range(ys.shape[1])])
    return T * T * (beta * inter + gamma * intra)


def np_lskd(s, t, T):
    def z(x):
        x = np.asarray(x, np.float64)
        return (x - x.mean(1, keepdims=True)) / (1e-7 + x.std(1, ddof=1, keepdims=True))
    return np_kd(z(s), z(t), T)


def np_standardize(x):
    x = np.asarray(x, np.float64)
    return (x - x.mean(1, keepdims=True)) / (1e-7 + x.std(1, ddof=1, keepdims=True))


def np_wttm(s, t, gamma):
    """Literal transcription of zkxufo/TTM WTTM.forward (pow of the teacher's probabilities)."""
    tot = 0.0
    for i in range(len(s)):
        p = np_softmax(t[i]) ** gamma
        norm = p.sum()
        tot += norm * np_kl(p / norm, np_log_softmax(s[i]))
    return tot / len(s)


def np_nkd(s, t, y, gamma, temp):
    """Literal transcription of yzd-v/cls_KD NKDLoss.forward (mask out the target, reshape)."""
    b, k = s.shape
    loss_t = 0.0
    loss_non = 0.0
    for i in range(b):
        loss_t += np_softmax(t[i])[y[i]] * np_log_softmax(s[i])[y[i]]
        keep = np.arange(k) != y[i]
        log_sn = np_log_softmax(s[i][keep] / temp)
        tn = np_softmax(t[i][keep] / temp)
        loss_non += np.sum(tn * log_sn)
    return -loss_t / b - gamma * temp**2 * loss_non / b


def np_pool(x, oh, ow):
    """torch adaptive_avg_pool2d on NHWC, loops."""
    b, h, w, c = x.shape
    out = np.zeros((b, oh, ow, c))
    for i in range(oh):
        h0, h1 = math.floor(i * h / oh), math.ceil((i + 1) * h / oh)
        for j in range(ow):
            w0, w1 = math.floor(j * w / ow), math.ceil((j + 1) * w / ow)
            out[:, i, j, :] = x[:, h0:h1, w0:w1, :].astype(np.float64).mean(axis=(1, 2))
    return out


def np_match_hw_repdistiller(fs, ft):
    """RepDistiller: compare H only, pool the larger to a square (H_min, H_min)."""
    sh, th = fs.shape[1], ft.shape[1]
    if sh > th:
        fs = np_pool(fs, th, th)
    elif sh < th:
        ft = np_pool(ft, sh, sh)
    return np.asarray(fs, np.float64), np.asarray(ft, np.float64)


def np_at(fs, ft, p=2.0):
    fs, ft = np_match_hw_repdistiller(fs, ft)

    def att(f):
        a = (f ** p).mean(axis=3).reshape(f.shape[0], -1)
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    return np.mean((att(fs) - att(ft)) ** 2)


def np_sp(fs, ft):
    b = fs.shape[0]

    def g(f):
        q = np.asarray(f, np.float64).reshape(b, -1)
        gm = q @ q.T
        return gm / np.linalg.norm(gm, axis=1, keepdims=True)

    return np.sum((g(ft) - g(fs)) ** 2) / (b * b)


def np_nst(fs, ft):
    fs, ft = np_match_hw_repdistiller(fs, ft)

    def chans(f):  # list over batch of (C, HW), each row unit norm
        out = []
        for i in range(f.shape[0]):
            m = f[i].reshape(-1, f.shape[3]).T
            out.append(m / np.linalg.norm(m, axis=1, keepdims=True))
        return out

    def kmean(xs, ys):
        vals = []
        for x, y in zip(xs, ys):
            for a in x:
                for bb in y:
                    vals.append(np.dot(a, bb) ** 2)
        return np.mean(vals)

    s, t = chans(fs), chans(ft)
    return kmean(t, t) + kmean(s, s) - 2 * kmean(s, t)


def np_vid(mu, t, var):
    mu, t, var = (np.asarray(a, np.float64) for a in (mu, t, var))
    return np.mean(0.5 * ((mu - t) ** 2 / var + np.log(var)))


def np_hcl(fss, fts):
    total = 0.0
    for fs, ft in zip(fss, fts):
        fs, ft = np.asarray(fs, np.float64), np.asarray(ft, np.float64)
        h = fs.shape[1]
        loss, cnt, tot = np.mean((fs - ft) ** 2), 1.0, 1.0
        for l in [4, 2, 1]:
            if l >= h:
                continue
            cnt /= 2.0
            loss += np.mean((np_pool(fs, l, l) - np_pool(ft, l, l)) ** 2) * cnt
            tot += cnt
        total += loss / tot
    return total


def np_huber_mean(a, b):
    d = np.abs(np.asarray(a) - np.asarray(b))
    return np.mean(np.where(d < 1, 0.5 * d * d, d - 0.5))


def np_rkd(s, t, wd, wa):
    s = np.asarray(s, np.float64).reshape(s.shape[0], -1)
    t = np.asarray(t, np.float64).reshape(t.shape[0], -1)
    b = s.shape[0]

    def pd(e):
        d = np.zeros((b, b))
        for i in range(b):
            for j in range(b):
                if i != j:
                    d[i, j] = np.linalg.norm(e[i] - e[j])
        return d / d[d > 0].mean()

    def ang(e):
        a = np.zeros((b, b, b))
        for i in range(b):
            for j in range(b):
                for k in range(b):
                    u, v = e[j] - e[i], e[k] - e[i]
                    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
                    if nu > 0 and nv > 0:
                        a[i, j, k] = np.dot(u, v) / (nu * nv)
        return a

    return wd * np_huber_mean(pd(s), pd(t)) + wa * np_huber_mean(ang(s), ang(t))


def np_pkt(s, t, eps=1e-7):
    def cp(e):
        e = np.asarray(e, np.float64).reshape(e.shape[0], -1)
        e = e / (np.linalg.norm(e, axis=1, keepdims=True) + eps)
        sim = (e @ e.T + 1) / 2
        return sim / sim.sum(1, keepdims=True)

    ps, pt = cp(s), cp(t)
    return np.mean(pt * np.log((pt + eps) / (ps + eps)))


def np_cc(s, t, gamma, order, normalize=False):
    def corr(e):
        e = np.asarray(e, np.float64).reshape(e.shape[0], -1)
        if normalize:
            e = e / np.linalg.norm(e, axis=1, keepdims=True)
        b = e.shape[0]
        c = np.zeros((b, b))
        for i in range(b):
            for j in range(b):
                x = np.dot(e[i], e[j])
                c[i, j] = math.exp(-2 * gamma) * sum(
                    (2 * gamma) ** p / math.factorial(p) * x ** p for p in range(order + 1))
        return c

    b = s.shape[0]
    return np.sqrt(np.sum((corr(s) - corr(t)) ** 2)) / (b * b)


def np_cos(s, t):
    s = np.asarray(s, np.float64).reshape(s.shape[0], -1)
    t = np.asarray(t, np.float64).reshape(t.shape[0], -1)
    return np.mean([1 - np.dot(a, c) / (np.linalg.norm(a) * np.linalg.norm(c))
                    for a, c in zip(s, t)])


def np_contrast(x, n_data, eps=1e-7):
    x = np.asarray(x, np.float64)
    b, m = x.shape[0], x.shape[1] - 1
    pn = 1.0 / n_data
    tot = 0.0
    for i in range(b):
        tot += math.log(x[i, 0] / (x[i, 0] + m * pn + eps))
        for j in range(1, m + 1):
            tot += math.log(m * pn / (x[i, j] + m * pn + eps))
    return -tot / b


# ---------------------------------------------------------------------------
# Shared inputs (tiny) and the table of cases
# ---------------------------------------------------------------------------

B, K = 6, 7
S_LOG, T_LOG = rnd(B, K, seed=1, scale=2.0), rnd(B, K, seed=2, scale=3.0)
Y = labels_for(B, K)
W_LOG = rnd(B, K, seed=17)  # weights that turn an array-valued function into a scalar
FS = rnd(B, 4, 4, 3, seed=3)           # student NHWC
FT_SAME = rnd(B, 4, 4, 3, seed=4)
FT_BIG = rnd(B, 6, 6, 5, seed=5)       # teacher: larger spatial (non-divisible) + more channels
FT_SMALL = rnd(B, 2, 2, 5, seed=6)     # teacher: smaller spatial + more channels
ES, ET = rnd(B, 5, seed=7), rnd(B, 9, seed=8)   # embeddings with different dims
ET_SAME = rnd(B, 5, seed=9)
VAR = (np.abs(rnd(3, seed=10)) + 0.5).astype(np.float32)
HCL_S = [rnd(B, 8, 8, 2, seed=11), rnd(B, 2, 2, 3, seed=12), rnd(B, 1, 1, 4, seed=13)]
HCL_T = [rnd(B, 8, 8, 2, seed=14), rnd(B, 2, 2, 3, seed=15), rnd(B, 1, 1, 4, seed=16)]

# name -> (jax fn of the student input, student input, numpy reference value)
CASES = {
    "cross_entropy": (lambda s: L.cross_entropy(s, Y), S_LOG, np_ce(S_LOG, Y)),
    "cross_entropy_ls": (lambda s: L.cross_entropy(s, Y, label_smoothing=0.1), S_LOG,
                         np_ce(S_LOG, Y, 0.1)),
    "soft_cross_entropy": (lambda s: L.soft_cross_entropy(s, T_LOG, 2.0), S_LOG,
                           np_soft_ce(S_LOG, T_LOG, 2.0)),
    "kd": (lambda s: L.kd(s, T_LOG, 4.0), S_LOG, np_kd(S_LOG, T_LOG, 4.0)),
    "dkd": (lambda s: L.dkd(s, T_LOG, Y, 1.0, 8.0, 4.0), S_LOG,
            np_dkd(S_LOG, T_LOG, Y, 1.0, 8.0, 4.0)),
    "dist": (lambda s: L.dist(s, T_LOG, 1.0, 2.0, 4.0), S_LOG,
             np_dist(S_LOG, T_LOG, 1.0, 2.0, 4.0)),
    "logit_standardized_kd": (lambda s: L.logit_standardized_kd(s, T_LOG, 2.0), S_LOG,
                              np_lskd(S_LOG, T_LOG, 2.0)),
    "logit_standardize": (lambda s: jnp.sum(L.logit_standardize(s) * W_LOG), S_LOG,
                          np.sum(np_standardize(S_LOG) * W_LOG)),
    "wttm": (lambda s: L.wttm(s, T_LOG, 0.2), S_LOG, np_wttm(S_LOG, T_LOG, 0.2)),
    "wttm_gamma_0p5": (lambda s: L.wttm(s, T_LOG, 0.5), S_LOG, np_wttm(S_LOG, T_LOG, 0.5)),
    # gamma = 1: no transform, U = 1, i.e. KL at T = 1.
    "wttm_gamma_1_is_kd_at_1": (lambda s: L.wttm(s, T_LOG, 1.0), S_LOG, np_kd(S_LOG, T_LOG, 1.0)),
    "nkd": (lambda s: L.nkd(s, T_LOG, Y, 3.5, 3.0), S_LOG, np_nkd(S_LOG, T_LOG, Y, 3.5, 3.0)),
    "nkd_reference_class_defaults": (lambda s: L.nkd(s, T_LOG, Y), S_LOG,
                                     np_nkd(S_LOG, T_LOG, Y, 1.5, 1.0)),
    "mse_logits": (lambda s: L.mse_logits(s, T_LOG), S_LOG,
                   np.mean(np.sum((S_LOG.astype(np.float64) - T_LOG) ** 2, axis=1))),
    "fitnet": (lambda s: L.fitnet(s, FT_SAME), FS,
               np.mean((FS.astype(np.float64) - FT_SAME) ** 2)),
    "at_teacher_bigger": (lambda s: L.attention_transfer(s, FT_BIG), FS, np_at(FS, FT_BIG)),
    "at_teacher_smaller_p4": (lambda s: L.attention_transfer(s, FT_SMALL, p=4.0), FS,
                              np_at(FS, FT_SMALL, 4.0)),
    "sp_diff": (lambda s: L.similarity_preserving(s, FT_BIG), FS, np_sp(FS, FT_BIG)),
    "sp_rank2": (lambda s: L.similarity_preserving(s, ET), ES, np_sp(ES, ET)),
    "nst_teacher_bigger": (lambda s: L.nst(s, FT_BIG), FS, np_nst(FS, FT_BIG)),
    "nst_teacher_smaller": (lambda s: L.nst(s, FT_SMALL), FS, np_nst(FS, FT_SMALL)),
    "vid": (lambda s: L.vid(s, FT_SAME, VAR), FS, np_vid(FS, FT_SAME, VAR)),
    "hcl": (lambda s0: L.hcl([s0] + HCL_S[1:], HCL_T), HCL_S[0], np_hcl(HCL_S, HCL_T)),
    "rkd": (lambda s: L.rkd(s, FT_SMALL), ES, np_rkd(ES, FT_SMALL, 25.0, 50.0)),  # (B,2,2,5)
    "pkt": (lambda s: L.pkt(s, ET), ES, np_pkt(ES, ET)),
    "cc": (lambda s: L.correlation_congruence(s, ET), ES, np_cc(ES, ET, 0.4, 2)),
    "cc_order3_norm": (lambda s: L.correlation_congruence(s, ET, 0.2, 3, normalize=True), ES,
                       np_cc(ES, ET, 0.2, 3, normalize=True)),
    "cosine_distance": (lambda s: L.cosine_distance(s, ET_SAME), ES, np_cos(ES, ET_SAME)),
    # student == teacher: zero differences hit sqrt(0); loss 0 and finite (zero) gradients.
    "cc_equal": (lambda s: L.correlation_congruence(s, ES), ES, 0.0),
    "dist_equal": (lambda s: L.dist(s, S_LOG), S_LOG, 0.0),
    "lskd_constant_logits": (lambda s: L.logit_standardized_kd(s, np.ones((B, K), np.float32)),
                             np.ones((B, K), np.float32), 0.0),
}

@pytest.fixture(scope="module")
def jitted_results():
    """Value and student-gradient of every case, from ONE jitted function (one compile)."""
    run = jax.jit(lambda xs: {name: jax.value_and_grad(fn)(xs[name])
                              for name, (fn, _, _) in CASES.items()})
    return run({name: jnp.asarray(x) for name, (_, x, _) in CASES.items()})


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_numpy_reference_under_jit_with_finite_grad(name, jitted_results):
    _, x, ref = CASES[name]
    value, grad = jitted_results[name]
    assert value.shape == () and value.dtype == jnp.float32
    np.testing.assert_allclose(float(value), ref, **TOL)
    assert grad.shape == np.shape(x)
    assert bool(jnp.all(jnp.isfinite(grad)))
    if ref != 0.0:
        assert float(jnp.max(jnp.abs(grad))) > 0


def test_eager_matches_reference():
    fn, x, ref = CASES["kd"]
    np.testing.assert_allclose(float(fn(x)), ref, **TOL)


# ---------------------------------------------------------------------------
# Hand-worked values and specific behaviours
# ---------------------------------------------------------------------------


def test_kd_hand_values():
    z = jnp.asarray(S_LOG)
    assert float(L.kd(z, z)) == pytest.approx(0.0, abs=1e-6)
    # s = [0, 0] -> q = [1/2, 1/2]; t = [2 ln 3, 0], T = 2 -> p = [3/4, 1/4].
    s = jnp.zeros((1, 2))
    t = jnp.asarray([[2 * math.log(3.0), 0.0]])
    expected = 4.0 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5))  # 0.523248...
    assert float(L.kd(s, t, temperature=2.0)) == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(0.523248, abs=1e-6)


def test_wttm_hand_values():
    # t = [ln 3, 0] -> p = [3/4, 1/4]; gamma = 1/2 -> p^g = [sqrt(3)/2, 1/2], U = (sqrt(3) + 1)/2,
    # p~ = [sqrt(3), 1] / (sqrt(3) + 1); s = [0, 0] -> q = [1/2, 1/2].
    t = jnp.asarray([[math.log(3.0), 0.0]])
    u = (math.sqrt(3.0) + 1.0) / 2.0
    a, b = math.sqrt(3.0) / (math.sqrt(3.0) + 1.0), 1.0 / (math.sqrt(3.0) + 1.0)
    expected = u * (a * math.log(2 * a) + b * math.log(2 * b))
    assert float(L.wttm(jnp.zeros((1, 2)), t, gamma=0.5)) == pytest.approx(expected, rel=1e-5)
    # A confident teacher (p ~ one-hot) gets weight ~1, a uniform one K^(1 - gamma).
    assert float(L.wttm(jnp.zeros((1, 4)), jnp.zeros((1, 4)), 0.5)) == pytest.approx(0.0, abs=1e-6)
    v, g = jax.value_and_grad(L.wttm)(jnp.zeros((1, 4)), jnp.asarray([[300.0, 0, 0, 0]]), 0.2)
    assert np.isfinite(float(v)) and bool(jnp.all(jnp.isfinite(g)))


def test_nkd_hand_values():
    # K = 3, label 0. Student [0, 0, ln 3] -> S = [1, 1, 3]/5, log S_0 = -ln 5; its non-target
    # part [0, ln 3] -> [1/4, 3/4]. Teacher [ln 2, 0, 0] -> T_0 = 1/2; non-target [1/2, 1/2].
    s = jnp.asarray([[0.0, 0.0, math.log(3.0)]])
    t = jnp.asarray([[math.log(2.0), 0.0, 0.0]])
    y = jnp.asarray([0])
    expected = 0.5 * math.log(5.0) - 1.5 * (0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert float(L.nkd(s, t, y, gamma=1.5, temperature=1.0)) == pytest.approx(expected, rel=1e-5)
    # The non-target part ignores the target logits entirely.
    s2, t2 = s.at[0, 0].set(-5.0), t.at[0, 0].set(9.0)
    non = lambda s, t: float(L.nkd(s, t, y, 1.0, 2.0)) - float(L.nkd(s, t, y, 0.0, 2.0))
    assert non(s, t) == pytest.approx(non(s2, t2), rel=1e-5)


def test_gradient_reversal_and_ctkd_temperature():
    x = jnp.asarray([0.5, -2.0])
    y, g = jax.value_and_grad(lambda x: jnp.sum(L.gradient_reversal(x, 0.3) ** 2))(x)
    assert float(y) == pytest.approx(4.25)
    np.testing.assert_allclose(np.asarray(g), -0.3 * 2 * np.asarray(x), rtol=1e-6)
    # lambda gets no gradient; lambda = 0 stops the parameter's gradient.
    assert float(jax.grad(lambda lam: L.gradient_reversal(2.0, lam) * 3.0)(0.7)) == 0.0
    assert float(jax.grad(lambda r: L.ctkd_temperature(r, 0.0))(1.0)) == 0.0
    # Reference Global_T init 1, --t_start 1 --t_end 20: T0 = 1 + 20 sigmoid(1).
    t0 = 1.0 + 20.0 / (1.0 + math.exp(-1.0))
    assert float(L.ctkd_temperature(1.0, 0.0)) == pytest.approx(t0, rel=1e-6)
    dsig = 20.0 * math.exp(-1.0) / (1.0 + math.exp(-1.0)) ** 2
    assert float(jax.grad(lambda r: L.ctkd_temperature(r, 0.25))(1.0)) == pytest.approx(-0.25 * dsig, rel=1e-5)


def test_ctkd_lambda_matches_reference_cosine_decay():
    def cosine_decay(i, max_value=0.0, min_value=-1.0, num_loops=10):  # zhengli97/CTKD CosineDecay
        i = min(max(i, 0), num_loops)
        value = (math.cos(i * math.pi / num_loops) + 1.0) * 0.5
        return value * (max_value - min_value) + min_value

    lam = jax.jit(L.ctkd_lambda)(jnp.arange(0, 14, dtype=jnp.float32))
    np.testing.assert_allclose(np.asarray(lam), [-cosine_decay(e) for e in range(14)], atol=1e-6)
    assert float(L.ctkd_lambda(3, 0.2, 0.6, 6)) == pytest.approx(0.2 + 0.4 * 0.5, rel=1e-6)


def test_kd_bf16_inputs_computed_in_float32():
    s16, t16 = jnp.asarray(S_LOG, jnp.bfloat16), jnp.asarray(T_LOG, jnp.bfloat16)
    out = L.kd(s16, t16)
    assert out.dtype == jnp.float32
    ref = np_kd(np.asarray(s16.astype(jnp.float32)), np.asarray(t16.astype(jnp.float32)), 4.0)
    np.testing.assert_allclose(float(out), ref, **TOL)


def test_dkd_confident_teacher_is_finite():
    t = np.zeros((2, 4), np.float32)
    t[:, 0] = 200.0  # teacher target prob == 1 in float32
    y = np.zeros(2, np.int32)
    v, g = jax.jit(jax.value_and_grad(L.dkd))(jnp.asarray(S_LOG[:2, :4]), t, y)
    assert np.isfinite(float(v)) and bool(jnp.all(jnp.isfinite(g)))


def test_adaptive_pool_helper_matches_torch_bins():
    x = rnd(2, 7, 5, 3, seed=20)
    for oh, ow in [(3, 2), (1, 1), (4, 5), (7, 5)]:
        np.testing.assert_allclose(np.asarray(L.feature.adaptive_avg_pool(jnp.asarray(x), (oh, ow))),
                                   np_pool(x, oh, ow), **TOL)


def test_penalties():
    params = {"dense": {"kernel": rnd(3, 4, seed=21), "bias": rnd(4, seed=22)},
              "conv": [rnd(2, 2, 1, 3, seed=23)], "scale": jnp.ones(3, jnp.bfloat16)}
    leaves = [params["dense"]["kernel"], params["dense"]["bias"], params["conv"][0],
              np.ones(3)]
    kernels = [params["dense"]["kernel"], params["conv"][0]]
    sq = lambda ls: sum(float(np.sum(np.asarray(a, np.float64) ** 2)) for a in ls)
    ab = lambda ls: sum(float(np.sum(np.abs(np.asarray(a, np.float64)))) for a in ls)
    run = jax.jit(lambda p: (L.l2_penalty(p), L.l2_penalty(p, kernels_only=True),
                             L.l1_penalty(p), L.l1_penalty(p, True), jax.grad(L.l2_penalty)(p)))
    l2, l2k, l1, l1k, g = run(params)
    np.testing.assert_allclose(float(l2), 0.5 * sq(leaves), **TOL)
    np.testing.assert_allclose(float(l2k), 0.5 * sq(kernels), **TOL)
    np.testing.assert_allclose(float(l1), ab(leaves), **TOL)
    np.testing.assert_allclose(float(l1k), ab(kernels), **TOL)
    np.testing.assert_allclose(np.asarray(g["dense"]["kernel"]), params["dense"]["kernel"])
    assert float(L.l2_penalty({})) == 0.0


# ---------------------------------------------------------------------------
# CRD
# ---------------------------------------------------------------------------

N_DATA, DIM, M = 20, 4, 5
sample_negatives = jax.jit(L.crd_sample_negatives, static_argnums=(2, 3),
                           static_argnames="replace")


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


init_memory = jax.jit(L.crd_init_memory, static_argnums=(1, 2))


def test_crd_init_memory():
    mem = init_memory(jax.random.key(0), N_DATA, 12)
    stdv = 1.0 / math.sqrt(12 / 3)
    for k in ("bank_s", "bank_t"):
        assert mem[k].shape == (N_DATA, 12) and mem[k].dtype == jnp.float32
        assert float(jnp.max(jnp.abs(mem[k]))) <= stdv
    assert not np.allclose(mem["bank_s"], mem["bank_t"])
    assert float(mem["z_s"]) < 0 and float(mem["z_t"]) < 0


def test_crd_contrast_loss_matches_numpy():
    x = np.random.default_rng(30).uniform(1e-3, 2.0, size=(3, 1 + M)).astype(np.float32)
    np.testing.assert_allclose(float(L.crd_contrast_loss(x, N_DATA)), np_contrast(x, N_DATA),
                               **TOL)


def test_crd_nce_and_update_match_numpy():
    mem = init_memory(jax.random.key(1), N_DATA, DIM)
    bank_s, bank_t = np.asarray(mem["bank_s"], np.float64), np.asarray(mem["bank_t"], np.float64)
    s, t = _unit(rnd(3, DIM, seed=31)), _unit(rnd(3, DIM, seed=32))
    idx = np.array([2, 7, 11], np.int32)
    neg = sample_negatives(jax.random.key(2), idx, N_DATA, M)
    neg_np = np.asarray(neg)
    T = 0.5

    def np_scores(bank, emb):
        out = np.zeros((3, 1 + M))
        for i in range(3):
            rows = [idx[i]] + list(neg_np[i])
            for j, r in enumerate(rows):
                out[i, j] = math.exp(np.dot(bank[r], emb[i]) / T)
        return out

    out_s, out_t = np_scores(bank_t, s), np_scores(bank_s, t)
    z_s, z_t = out_s.mean() * N_DATA, out_t.mean() * N_DATA
    ref = np_contrast(out_s / z_s, N_DATA) + np_contrast(out_t / z_t, N_DATA)

    nce = jax.jit(L.crd_nce, static_argnames="temperature")
    loss, mem2 = nce(s, t, mem, idx, neg, temperature=T)
    np.testing.assert_allclose(float(loss), ref, **TOL)
    np.testing.assert_allclose([float(mem2["z_s"]), float(mem2["z_t"])], [z_s, z_t], rtol=1e-5)
    np.testing.assert_array_equal(mem2["bank_s"], mem["bank_s"])  # banks untouched

    # Z is frozen once set: a second batch is normalised by the stored Z.
    s2, t2 = _unit(rnd(3, DIM, seed=33)), _unit(rnd(3, DIM, seed=34))
    ref2 = (np_contrast(np_scores(bank_t, s2) / z_s, N_DATA)
            + np_contrast(np_scores(bank_s, t2) / z_t, N_DATA))
    loss2, mem3 = nce(s2, t2, mem2, idx, neg, temperature=T)
    np.testing.assert_allclose(float(loss2), ref2, **TOL)
    assert float(mem3["z_s"]) == float(mem2["z_s"])

    # gradients flow to the embeddings only, and are finite
    gs, gt = jax.grad(lambda a, b: nce(a, b, mem2, idx, neg, temperature=T)[0],
                      argnums=(0, 1))(s2, t2)
    assert bool(jnp.all(jnp.isfinite(gs))) and bool(jnp.all(jnp.isfinite(gt)))

    # memory update
    new = jax.jit(L.crd_update_memory)(mem2, s2, t2, idx, 0.3)
    exp_s, exp_t = bank_s.copy(), bank_t.copy()
    for i, r in enumerate(idx):
        for bank, emb in ((exp_s, s2), (exp_t, t2)):
            v = 0.3 * bank[r] + 0.7 * emb[i]
            bank[r] = v / np.sqrt(np.sum(v ** 2))
    np.testing.assert_allclose(np.asarray(new["bank_s"]), exp_s, **TOL)
    np.testing.assert_allclose(np.asarray(new["bank_t"]), exp_t, **TOL)
    assert float(new["z_s"]) == float(mem2["z_s"])


@pytest.mark.parametrize("replace", [False, True])
def test_crd_sample_negatives(replace):
    idx = np.arange(8, dtype=np.int32) * 3
    neg = np.asarray(sample_negatives(jax.random.key(3), idx, 30, 12, replace=replace))
    assert neg.shape == (8, 12) and neg.dtype == np.int32
    assert neg.min() >= 0 and neg.max() < 30
    assert not np.any(neg == idx[:, None])
    if not replace:
        assert all(len(set(row)) == 12 for row in neg)
    # class-exclusive sampling (RepDistiller mode='exact'); 3 classes over 30 samples
    data_labels = np.random.default_rng(4).integers(0, 3, size=30).astype(np.int32)
    k = 8 if not replace else 2000
    neg = np.asarray(sample_negatives(jax.random.key(5), idx, 30, k, labels=data_labels[idx],
                                      dataset_labels=data_labels, replace=replace))
    assert np.all(data_labels[neg] != data_labels[idx][:, None])
    if replace:  # every allowed index is reachable, roughly uniformly
        allowed = np.flatnonzero(data_labels != data_labels[idx[0]])
        counts = np.bincount(neg[0], minlength=30)[allowed]
        assert counts.min() > 0.5 * k / len(allowed)
    else:
        assert all(len(set(row)) == k for row in neg)


# ---------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("call, message", [
    (lambda: L.kd(np.zeros((8, 10)), np.zeros((8, 100))),
     "kd: student_logits and teacher_logits must have the same shape, got (8, 10) and (8, 100)"),
    (lambda: L.kd(np.zeros(()), np.zeros(())),
     "kd: student_logits must have rank >= 1 (..., K), got shape ()"),
    (lambda: L.dist(np.zeros(10), np.zeros(10)),
     "dist: student_logits must have rank >= 2 (B, ..., K), got shape (10,)"),
    (lambda: L.dist(np.zeros((8, 10)), np.zeros((8, 10)), reduction="none"),
     "dist: reduction must be 'mean' (its intra-class term correlates each class over the whole "
     "batch, so there is no per-position value), got 'none'"),
    (lambda: L.kd(np.zeros((8, 10)), np.zeros((8, 10)), reduction="avg"),
     "kd: reduction must be one of 'mean', 'sum', 'none', got 'avg'"),
    (lambda: L.kd(np.zeros((2, 5, 10)), np.zeros((2, 5, 10)), where=np.ones((2, 5))),
     "kd: where must be a boolean mask, got dtype float32 (for per-position weights use "
     "reduction='none' and weight the result)"),
    (lambda: L.kd(np.zeros((2, 5, 10)), np.zeros((2, 5, 10)), where=np.ones((2, 4), bool)),
     "kd: where must have shape (2, 5) (the leading axes of student_logits (2, 5, 10)), got "
     "(2, 4)"),
    (lambda: L.dkd(np.zeros((8, 10)), np.zeros((8, 10)), np.zeros(6, np.int32)),
     "dkd: labels must have shape (8,) (the leading axes of student_logits (8, 10)), got (6,)"),
    (lambda: L.nkd(np.zeros((8, 10)), np.zeros((8, 10)), np.zeros(6, np.int32)),
     "nkd: labels must have shape (8,) (the leading axes of student_logits (8, 10)), got (6,)"),
    (lambda: L.wttm(np.zeros((8, 10)), np.zeros((8, 100))),
     "wttm: student_logits and teacher_logits must have the same shape, got (8, 10) and (8, 100)"),
    (lambda: L.cross_entropy(np.zeros((8, 10)), np.zeros((8, 1), np.int32)),
     "cross_entropy: labels must have shape (8,) (the leading axes of logits (8, 10)), got "
     "(8, 1)"),
    (lambda: L.attention_transfer(np.zeros((8, 4, 4)), np.zeros((8, 4, 4, 3))),
     "attention_transfer: student_feat must have rank 4 (B, H, W, C), got shape (8, 4, 4)"),
    (lambda: L.nst(np.zeros((8, 4, 4, 3)), np.zeros((6, 4, 4, 3))),
     "nst: student_feat and teacher_feat must have the same batch size, got (8, 4, 4, 3) and "
     "(6, 4, 4, 3)"),
    (lambda: L.similarity_preserving(np.zeros((8,)), np.zeros((8, 3))),
     "similarity_preserving: student_feat must have rank >= 2 (B, ...), got shape (8,)"),
    (lambda: L.fitnet(np.zeros((8, 4, 4, 3)), np.zeros((8, 4, 4, 5))),
     "fitnet: student_feat and teacher_feat must have the same shape, got (8, 4, 4, 3) and "
     "(8, 4, 4, 5)"),
    (lambda: L.rkd(np.zeros((8, 3)), np.zeros((7, 3))),
     "rkd: student_emb and teacher_emb must have the same batch size, got (8, 3) and (7, 3)"),
    (lambda: L.vid(np.zeros((8, 4, 4, 3)), np.zeros((8, 4, 4, 3)), np.ones(5)),
     "vid: teacher_feat and variance must have the same last-axis size, got (8, 4, 4, 3) and "
     "(5,)"),
    (lambda: L.hcl([np.zeros((2, 4, 4, 3))], []),
     "hcl: student_feats and teacher_feats must have the same length, got 1 and 0"),
    (lambda: L.crd_nce(np.zeros((4, 8)), np.zeros((4, 8)),
                       {"bank_s": np.zeros((10, 8)), "bank_t": np.zeros((10, 8)),
                        "z_s": -1.0, "z_t": -1.0}, np.zeros(4, np.int32),
                       np.zeros((3, 2), np.int32)),
     "crd_nce: student_emb and negative_indices must have the same batch size, got (4, 8) and "
     "(3, 2)"),
])
def test_value_errors(call, message):
    with pytest.raises(ValueError) as e:
        call()
    assert str(e.value) == message


def test_value_error_raised_at_trace_time_under_jit():
    with pytest.raises(ValueError, match="pkt: student_emb and teacher_emb must have the same"):
        jax.jit(L.pkt)(jnp.zeros((4, 3)), jnp.zeros((5, 3)))


def test_all_lists_exactly_the_public_functions():
    # the functions defined in the family modules (kdjax.losses.logit, .feature, ...) and re-exported
    public = {n for n, v in vars(L).items()
              if not n.startswith("_") and callable(v) and getattr(v, "__module__", "").startswith(L.__name__ + ".")}
    assert set(L.__all__) == public
    assert len(L.__all__) == len(set(L.__all__))
    namespace = {}
    exec("from kdjax.losses import *", namespace)
    assert not {"jax", "jnp", "np", "optax", "math"} & set(namespace)


def test_import_needs_neither_flax_nor_the_config():
    """`kdjax.losses` is usable in anyone's JAX code: importing it (and its family modules) brings in
    neither Flax nor ml_collections."""
    import subprocess
    import sys

    code = ("import sys, kdjax.losses, kdjax.losses.feature, kdjax.losses.relation, kdjax.losses.contrastive; "
            "print('flax' in sys.modules, 'ml_collections' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def _np_log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _np_deit(cls, dist, teacher, labels, mode, alpha, tau, smoothing):
    """facebookresearch/deit losses.py DistillationLoss, restated in numpy: base criterion
    CrossEntropy(label_smoothing) on the class head; 'soft': kl_div(log_softmax(s/T),
    log_softmax(t/T), reduction='sum', log_target=True) * T * T / outputs_kd.numel(); 'hard':
    cross_entropy(outputs_kd, teacher.argmax(1)); base * (1 - alpha) + distillation * alpha."""
    b, k = cls.shape
    target = (1 - smoothing) * np.eye(k)[labels] + smoothing / k
    base = -(target * _np_log_softmax(cls)).sum(axis=1).mean()
    if mode == "soft":
        lt, ls = _np_log_softmax(teacher / tau), _np_log_softmax(dist / tau)
        d = (np.exp(lt) * (lt - ls)).sum() * tau * tau / dist.size
    else:
        d = -_np_log_softmax(dist)[np.arange(b), teacher.argmax(axis=1)].mean()
    return base * (1 - alpha) + d * alpha


@pytest.mark.parametrize("mode,alpha,tau,smoothing", [("hard", 0.5, 1.0, 0.0), ("hard", 0.3, 1.0, 0.1),
                                                      ("soft", 0.5, 1.0, 0.0), ("soft", 0.7, 3.0, 0.1)])
def test_deit_matches_distillation_loss(mode, alpha, tau, smoothing):
    rng = np.random.default_rng(7)
    cls, dist, teacher = (3 * rng.standard_normal((6, 5)).astype(np.float32) for _ in range(3))
    labels = rng.integers(0, 5, 6)
    got = L.deit(cls, dist, teacher, labels, mode, alpha, tau, smoothing)
    np.testing.assert_allclose(got, _np_deit(cls, dist, teacher, labels, mode, alpha, tau, smoothing), rtol=1e-5)
    # per-example values and padding: a padded row changes nothing
    per = L.deit(cls, dist, teacher, labels, mode, alpha, tau, smoothing, reduction="none")
    np.testing.assert_allclose(per.mean(), got, rtol=1e-6)
    where = np.arange(6) < 4
    masked = L.deit(cls, dist, np.where(where[:, None], teacher, np.nan), labels, mode, alpha, tau, smoothing,
                    where=where)
    np.testing.assert_allclose(masked, _np_deit(cls[:4], dist[:4], teacher[:4], labels[:4], mode, alpha, tau,
                                                smoothing), rtol=1e-5)


def test_deit_hand_values():
    """Hard mode, alpha 1/2: 1/2 CE(cls, y) + 1/2 CE(dist, argmax t). Two classes, logits (0, 0):
    each CE is log 2, whatever the labels; soft mode at equal distributions: the KL part is 0."""
    z = np.zeros((1, 2), np.float32)
    t = np.array([[0.0, 5.0]], np.float32)
    np.testing.assert_allclose(L.deit(z, z, t, np.array([0])), math.log(2), rtol=1e-6)
    np.testing.assert_allclose(L.deit(z, t, t, np.array([0]), "soft", alpha=0.5), 0.5 * math.log(2), rtol=1e-6)
    with pytest.raises(ValueError, match="deit: mode must be 'hard' or 'soft'"):
        L.deit(z, z, t, np.array([0]), "medium")
