"""MLKD (Jin, Wang, Lin CVPR 2023): losses.mlkd and the method against a numpy restatement of the
official KD_ours.forward_train (Jin-Ying/Multi-Level-Logit-Distillation), term by term."""

import jax
import numpy as np
import pytest

from kdjax import distill, losses

B, K = 8, 5


def _softmax(z, t=1.0):
    z = np.asarray(z, np.float64) / t
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _kd(s, t, temp):  # F.kl_div(log_softmax(s/T), softmax(t/T)).sum(1).mean() * T^2
    ps, pt = _softmax(s, temp), _softmax(t, temp)
    return float((pt * (np.log(pt) - np.log(ps))).sum(1).mean() * temp**2)


def _cc(s, t, temp):
    ps, pt = _softmax(s, temp), _softmax(t, temp)
    return float(((pt.T @ pt - ps.T @ ps) ** 2).sum() / s.shape[1])


def _bc(s, t, temp):
    ps, pt = _softmax(s, temp), _softmax(t, temp)
    return float(((pt @ pt.T - ps @ ps.T) ** 2).sum() / s.shape[0])


def _np_zscore(z):
    z = np.asarray(z, np.float64)
    return (z - z.mean(1, keepdims=True)) / (1e-7 + z.std(1, ddof=1, keepdims=True))


def _reference(sw, ss, tw, ts, weight=0.9, stand=False):
    """KD_ours.forward_train's loss_kd + loss_cc + loss_bc, written as the reference writes it:
    kd_loss with reduce=True times a bool mask, then .mean(); T = 4 (cfg.KD.TEMPERATURE), 3, 5, 2, 6;
    the strong-view KD at T = 2, 6 reads the weak view; only the weak view's cc and bc count."""
    p = _softmax(tw)
    conf = p.max(1)
    mask = conf <= np.percentile(conf, 50)
    class_conf = p.sum(0)
    class_mask = class_conf <= np.percentile(class_conf, 50)
    kd = (lambda s, t, T: _kd(_np_zscore(s), _np_zscore(t), T)) if stand else _kd
    temps = (4.0, 3.0, 5.0, 2.0, 6.0)
    kd_weak = sum(weight * (kd(sw, tw, T) * mask).mean() for T in temps)
    kd_strong = sum(weight * kd(ss, ts, T) for T in (4.0, 3.0, 5.0)) + sum(weight * kd(sw, tw, T) for T in (2.0, 6.0))
    cc_weak = sum(weight * (_cc(sw, tw, T) * class_mask).mean() for T in temps)
    bc_weak = sum(weight * (_bc(sw, tw, T) * mask).mean() for T in temps)
    return kd_weak + kd_strong + cc_weak + bc_weak


def _logits(seed=0, b=B):
    rng = np.random.default_rng(seed)
    return [(3.0 * rng.standard_normal((b, K))).astype(np.float32) for _ in range(4)]


def _ctx(labels):
    return distill.Context(labels=labels, train=False)


def test_mlkd_loss_equals_the_reference_forward():
    sw, ss, tw, ts = _logits()
    got = jax.jit(losses.mlkd)(sw, ss, tw, ts)
    np.testing.assert_allclose(got, _reference(sw, ss, tw, ts, weight=1.0), rtol=2e-5)
    # The paper's reading (the strong view at every T) differs: the reference's T = 2, 6 slip matters.
    paper = jax.jit(lambda *a: losses.mlkd(*a, strong_temperatures=(4.0, 3.0, 5.0, 2.0, 6.0)))(sw, ss, tw, ts)
    assert abs(float(paper) - float(got)) > 1e-3
    with pytest.raises(ValueError, match=r"mlkd: student_weak and teacher_strong must have the same shape"):
        losses.mlkd(sw, ss, tw, ts[:, :3])


def test_mlkd_method_terms_weights_and_logit_standardize():
    sw, ss, tw, ts = _logits(1)
    labels = np.arange(B, dtype=np.int32) % K
    s = {"logits": sw, "strong/logits": ss}
    t = {"logits": tw, "strong/logits": ts}
    for stand in (False, True):
        cfg = distill.get_config("mlkd").to_dict()
        cfg["logit_standardize"] = stand
        terms = distill.build_terms(cfg)
        assert [(x.name, x.weight) for x in terms] == [("ce", 0.1), ("mlkd_ce_strong", 0.1), ("mlkd", 0.9)]
        assert terms[2].global_batch and not terms[1].global_batch
        d = distill.Distiller(terms)
        got = jax.jit(lambda s, t, y: d.apply({}, s, t, _ctx(y)))(s, t, labels)
        total = sum(x.weight * got[x.name] for x in terms)
        ce = lambda z: float(-np.log(_softmax(z)[np.arange(B), labels]).mean())  # noqa: E731
        want = 0.1 * (ce(sw) + ce(ss)) + _reference(sw, ss, tw, ts, stand=stand)
        np.testing.assert_allclose(total, want, rtol=2e-5, err_msg=f"logit_standardize={stand}")


def test_mlkd_with_an_ensemble_combines_the_teachers_at_each_temperature():
    sw, ss, tw, ts = _logits(2)
    tw2, ts2 = tw[::-1] * 0.5, ts[::-1] * 0.5
    d = distill.Distiller(distill.build_terms({"method": "mlkd", "ce_weight": 0.0}), teacher_weights=(3.0, 1.0))
    got = jax.jit(lambda s, t: d.apply({}, s, t, _ctx(np.zeros(B, np.int32))))(
        {"logits": sw, "strong/logits": ss},
        {"logits": np.stack([tw, tw2], 1), "strong/logits": np.stack([ts, ts2], 1)})

    def mix(a, b, T):  # logits whose softmax at T is 3/4 softmax(a/T) + 1/4 softmax(b/T)
        return T * np.log(0.75 * _softmax(a, T) + 0.25 * _softmax(b, T))

    p = _softmax(mix(tw, tw2, 1.0))  # the masks: from the teachers' T = 1 average
    m_s = (p.max(1) <= np.percentile(p.max(1), 50)).mean()
    m_c = (p.sum(0) <= np.percentile(p.sum(0), 50)).mean()
    want = 0.0
    for T in (4.0, 3.0, 5.0, 2.0, 6.0):
        w, s_ = (sw, mix(tw, tw2, T)), (ss, mix(ts, ts2, T))
        want += m_s * _kd(*w, T) + _kd(*(s_ if T in (4.0, 3.0, 5.0) else w), T) + m_c * _cc(*w, T) + m_s * _bc(*w, T)
    np.testing.assert_allclose(got["mlkd"], want, rtol=2e-5)


def test_mlkd_without_views_and_views_without_a_reader_are_refused():
    terms = distill.build_terms(distill.get_config("mlkd").to_dict())
    with pytest.raises(ValueError, match=r"^distill.method=mlkd needs two augmented views: set "
                                         r"--config.augment.views=weak,strong$"):
        distill.check_views(terms, "")
    assert distill.check_views(terms, "weak,strong") is True
    with pytest.raises(ValueError, match="no distillation term reads the strong view.*mlkd"):
        distill.check_views(distill.build_terms({"method": "kd"}), "weak,strong")
    with pytest.raises(ValueError, match="unknown config.augment.views 'strong'"):
        distill.check_views(terms, "strong")
    with pytest.raises(ValueError, match="distill.mlkd.temperatures must be temperatures > 0"):
        distill.build_terms({"method": "mlkd", "mlkd": {"temperatures": "4,-1"}})
    with pytest.raises(ValueError, match="strong_temperatures='4,7' must be among"):
        distill.build_terms({"method": "mlkd", "mlkd": {"strong_temperatures": "4,7"}})
