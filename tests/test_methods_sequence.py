"""The language-model divergences as methods (kdjax/distill/sequence.py): all seven trained end to
end through the real trainer in one run, and TAID's interpolation t carried in the checkpointed
distiller state, step by step as SakanaAI/TAID's update_t (restated in tests/test_losses_sequence.py)."""

import os

import numpy as np
import pytest

from kdjax import checkpoint as kckpt
from kdjax import distill, train
from tests.test_losses_sequence import np_taid_update_t
from tests.test_train import read_metrics, tiny_digits_config

NEW = ("taid", "reverse_kl", "generalized_jsd", "skew_kl", "skew_reverse_kl", "ab_divergence", "topk_kd")


def test_lm_divergence_methods_train_end_to_end_and_taid_carries_its_t(tmp_path):
    workdir = str(tmp_path / "run")
    summary = train.run(tiny_digits_config(**{"stages": "student", "teacher.source": "ema",
                                              "distill.method": "+".join(NEW)}), workdir)
    weights = summary["student"]["terms"]
    assert set(weights) == {"ce", *NEW}
    rows = read_metrics(workdir, "student")
    for r in rows:
        assert all(np.isfinite(r[f"loss/{n}"]) for n in weights), r
        np.testing.assert_allclose(r["loss"], sum(w * r[f"loss/{n}"] for n, w in weights.items()), rtol=1e-5)
    # TAID's t: the reference's update, replayed on the logged TAID losses, ends where the
    # checkpointed state of the distiller ends
    ckpts = kckpt.StageCheckpoints(os.path.join(workdir, "student", "checkpoints"))
    state, _ = ckpts.restore(ckpts.latest_step())
    ckpts.close()
    taid = state["model_state"]["distiller"]["taid"]["taid_schedule"]
    steps = [r for r in rows if "step" in r]
    assert int(taid["step"]) == len(steps) == summary["student"]["steps"]
    ref = {"t": 0.4, "prev_loss": np.inf, "momentum": 0.0}
    for i, r in enumerate(steps):
        ref = np_taid_update_t(ref, r["loss/taid"], i, len(steps))
    assert float(taid["t"]) > 0.4
    np.testing.assert_allclose(float(taid["t"]), ref["t"], rtol=1e-5)
    np.testing.assert_allclose(float(taid["momentum"]), ref["momentum"], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("method, bad, message", [
    ("generalized_jsd", {"beta": 1.5}, r"^distill.generalized_jsd.beta must be in \[0, 1\], got 1.5$"),
    ("skew_kl", {"alpha": -0.5}, r"^distill.skew_kl.alpha must be in \[0, 1\], got -0.5$"),
    ("taid", {"t_start": 0.9, "t_end": 0.5}, r"^distill.taid.t_start=0.9 must be < distill.taid.t_end=0.5$"),
    ("topk_kd", {"k": 0}, r"^distill.topk_kd.k must be an integer >= 1, got 0$"),
    ("topk_kd", {"remainder": "rest"}, r"^distill.topk_kd.remainder must be 'zero' or 'bucket', got 'rest'$"),
])
def test_bad_settings_are_refused_in_one_line(method, bad, message):
    with pytest.raises(ValueError, match=message):
        distill.build_terms({"method": method, method: bad})
