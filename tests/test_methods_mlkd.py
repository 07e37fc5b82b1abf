"""MLKD (Jin, Wang, Lin CVPR 2023): losses.mlkd and the method against a numpy restatement of the
official KD_ours.forward_train (Jin-Ying/Multi-Level-Logit-Distillation), term by term, and of
sunshangquan/logit-standardization-KD's MLKD.forward_train with --logit-stand (base temperature 2)."""

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


def _reference(sw, ss, tw, ts, weight=0.9, stand=False, base=4.0, parts=False):
    """KD_ours.forward_train's loss_kd + loss_cc + loss_bc, written as the reference writes it:
    kd_loss with reduce=True times a bool mask, then .mean(); T = base (cfg.KD.TEMPERATURE), 3, 5,
    2, 6; the strong-view KD reads the strong view at base, 3, 5 and the weak view at 2, 6 (five
    calls written out one by one, so with base = 2 the weak view's T = 2 call stays a weak one);
    only the weak view's cc and bc count. logit-standardization-KD's MLKD.py (@f6e5aa5, lines
    155-179 for loss_kd_strong) is the same with ``logit_stand`` z-scoring kd_loss's inputs; its
    tools/train.py sets cfg.KD.TEMPERATURE = --base-temp (default 2) with --logit-stand."""
    p = _softmax(tw)
    conf = p.max(1)
    mask = conf <= np.percentile(conf, 50)
    class_conf = p.sum(0)
    class_mask = class_conf <= np.percentile(class_conf, 50)
    kd = (lambda s, t, T: _kd(_np_zscore(s), _np_zscore(t), T)) if stand else _kd
    temps = (base, 3.0, 5.0, 2.0, 6.0)
    kd_weak = sum(weight * (kd(sw, tw, T) * mask).mean() for T in temps)
    kd_strong = (weight * kd(ss, ts, base) + weight * kd(ss, ts, 3.0) + weight * kd(ss, ts, 5.0)
                 + weight * kd(sw, tw, 2.0) + weight * kd(sw, tw, 6.0))
    cc_weak = sum(weight * (_cc(sw, tw, T) * class_mask).mean() for T in temps)
    bc_weak = sum(weight * (_bc(sw, tw, T) * mask).mean() for T in temps)
    if parts:  # the reference's losses_dict: loss_kd, loss_cc, loss_bc
        return {"instance": kd_weak + kd_strong, "class": cc_weak, "batch": bc_weak}
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


def test_mlkd_official_list_semantics_with_logit_standardization():
    """logit-standardization-KD's MLKD with --logit-stand: temperatures (2, 3, 5, 2, 6), the
    strong-view KD on the strong view at 2, 3, 5 and on the weak view at the second 2 and at 6."""
    sw, ss, tw, ts = _logits(3)
    want = _reference(sw, ss, tw, ts, weight=1.0, stand=True, base=2.0)
    got = jax.jit(lambda *a: losses.mlkd(*a, (2.0, 3.0, 5.0, 2.0, 6.0), (2.0, 3.0, 5.0), standardize=True))(
        sw, ss, tw, ts)
    np.testing.assert_allclose(got, want, rtol=2e-5)
    # the defaults of the function with standardize=True are that list
    np.testing.assert_allclose(jax.jit(lambda *a: losses.mlkd(*a, standardize=True))(sw, ss, tw, ts), want,
                               rtol=2e-5)
    # the method with distill.logit_standardize=True and mlkd's defaults: the same, weighted 0.9
    cfg = distill.get_config("mlkd").to_dict()
    cfg.update(logit_standardize=True, ce_weight=0.0)
    terms = distill.build_terms(cfg)
    s, t = {"logits": sw, "strong/logits": ss}, {"logits": tw, "strong/logits": ts}
    d = distill.Distiller(terms)
    values = jax.jit(lambda s, t: d.apply({}, s, t, _ctx(np.zeros(B, np.int32))))(s, t)
    np.testing.assert_allclose(values["mlkd"], want, rtol=2e-5)


def test_mlkd_returns_its_three_levels_for_logging():
    sw, ss, tw, ts = _logits(4)
    want = _reference(sw, ss, tw, ts, weight=1.0, parts=True)
    parts = jax.jit(lambda *a: losses.mlkd(*a, parts=True))(sw, ss, tw, ts)
    assert sorted(parts) == ["batch", "class", "instance"]
    for k in want:
        np.testing.assert_allclose(parts[k], want[k], rtol=2e-5, err_msg=k)
    total = jax.jit(losses.mlkd)(sw, ss, tw, ts)
    np.testing.assert_allclose(total, parts["instance"] + parts["class"] + parts["batch"], rtol=1e-6)
    # the method logs them as loss/mlkd/<level> beside its (unchanged) total
    d = distill.Distiller(distill.build_terms({"method": "mlkd", "ce_weight": 0.0}))
    values = jax.jit(lambda s, t: d.apply({}, s, t, _ctx(np.zeros(B, np.int32))))(
        {"logits": sw, "strong/logits": ss}, {"logits": tw, "strong/logits": ts})
    np.testing.assert_allclose(values["mlkd"], total, rtol=1e-6)
    for k in want:
        np.testing.assert_allclose(values[f"mlkd/{k}"], parts[k], rtol=1e-6)


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
        want = 0.1 * (ce(sw) + ce(ss)) + _reference(sw, ss, tw, ts, stand=stand, base=2.0 if stand else 4.0)
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
    # the ensemble path reads the strong view at the first 2 only, as the single-teacher loss
    cfg = {"method": "mlkd", "ce_weight": 0.0, "mlkd": {"temperatures": "2,3,5,2,6"}}
    d = distill.Distiller(distill.build_terms(cfg), teacher_weights=(1.0, 0.0))
    got = jax.jit(lambda s, t: d.apply({}, s, t, _ctx(np.zeros(B, np.int32))))(
        {"logits": sw, "strong/logits": ss},
        {"logits": np.stack([tw, tw2], 1), "strong/logits": np.stack([ts, ts2], 1)})
    np.testing.assert_allclose(got["mlkd"], _reference(sw, ss, tw, ts, weight=1.0, base=2.0), rtol=2e-5)


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
    with pytest.raises(ValueError, match="^distill.mlkd.temperatures must be 'auto' or temperatures > 0"):
        distill.build_terms({"method": "mlkd", "mlkd": {"temperatures": "4,-1"}})
    with pytest.raises(ValueError, match=r"^distill.mlkd.strong_temperatures='4,7' must be among distill.mlkd."
                                         r"temperatures='auto' \(4,3,5,2,6\), each value at most as often"):
        distill.build_terms({"method": "mlkd", "mlkd": {"strong_temperatures": "4,7"}})
    # a list with multiplicity: 2 occurs twice in 2,3,5,2,6, so a third 2 is refused
    distill.build_terms({"method": "mlkd", "mlkd": {"temperatures": "2,3,5,2,6", "strong_temperatures": "2,2"}})
    with pytest.raises(ValueError, match="strong_temperatures='2,2,2' must be among"):
        distill.build_terms({"method": "mlkd", "mlkd": {"temperatures": "2,3,5,2,6", "strong_temperatures": "2,2,2"}})
    # 'auto' under logit_standardize is 2,3,5,2,6: 4 is not in it
    with pytest.raises(ValueError, match=r"temperatures='auto' \(2,3,5,2,6\)"):
        distill.build_terms({"method": "mlkd", "logit_standardize": True, "mlkd": {"strong_temperatures": "4"}})
    sw, ss, tw, ts = _logits()
    with pytest.raises(ValueError, match=r"^mlkd: strong_temperatures \(2.0, 2.0, 2.0\) must be among temperatures"):
        losses.mlkd(sw, ss, tw, ts, (2.0, 3.0, 5.0, 2.0, 6.0), (2.0, 2.0, 2.0))
