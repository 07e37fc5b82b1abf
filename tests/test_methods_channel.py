"""ICKD (Liu et al. ICCV 2021): losses.ickd and the method against a numpy statement of the
official ICKDLoss (ADLab-AutoDrive/ICKD Cifar100/distiller_zoo/ICKD.py), embedding included."""

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


def test_ickd_trains_end_to_end(tmp_path):
    from tests.test_train import read_metrics, tiny_digits_config
    from kdjax import train

    workdir = str(tmp_path / "run")
    summary = train.run(tiny_digits_config(**{"stages": "student", "teacher.source": "ema", "student.model": "cnn_tiny",
                                              "teacher.model": "cnn_tiny", "distill.method": "ickd"}), workdir)
    assert summary["student"]["terms"] == {"ce": 1.0, "ickd": 2.5}
    rows = read_metrics(workdir, "student")
    assert rows and all(np.isfinite(r["loss/ickd"]) for r in rows)
    np.testing.assert_allclose(rows[0]["loss"], rows[0]["loss/ce"] + 2.5 * rows[0]["loss/ickd"], rtol=1e-5)
