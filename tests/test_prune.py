"""kdjax.prune: masks against numpy, the schedule, and zeros that stay zero under any optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import data as kdata
from kdjax import prune


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {"conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 8, 6)), jnp.float32)},
            "dense": {"kernel": jnp.asarray(rng.normal(size=(12, 5)), jnp.float32),
                      "bias": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}}


def test_layer_and_global_magnitude_masks_match_numpy():
    params = _params()
    prunable = prune.select(params, "", "")
    assert prunable == {"conv": {"kernel": True}, "dense": {"kernel": True, "bias": False}}
    masks = prune.magnitude_masks(params, prunable, 0.7, "layer")
    for name in ("conv", "dense"):
        w = np.asarray(params[name]["kernel"]).ravel()
        k = round(0.7 * w.size)
        want = np.ones(w.size, bool)
        want[np.argsort(np.abs(w), kind="stable")[:k]] = False
        np.testing.assert_array_equal(np.asarray(masks[name]["kernel"]).ravel(), want)
    assert bool(masks["dense"]["bias"])  # not prunable: kept
    glob = prune.magnitude_masks(params, prunable, 0.5, "global")
    allw = np.concatenate([np.abs(np.asarray(params[n]["kernel"])).ravel() for n in ("conv", "dense")])
    threshold = np.sort(allw)[round(0.5 * allw.size) - 1]
    for name in ("conv", "dense"):
        w = np.abs(np.asarray(params[name]["kernel"]))
        np.testing.assert_array_equal(np.asarray(glob[name]["kernel"]), w > threshold)


def test_n_m_masks_keep_the_largest_n_of_every_group_along_the_input_dimension():
    params = _params(1)
    masks = prune.nm_masks(params, prune.select(params, "", "bias"), n=2, m=4)
    for name in ("conv", "dense"):
        w, mask = np.abs(np.asarray(params[name]["kernel"])), np.asarray(masks[name]["kernel"])
        fan_in = w.shape[-2]
        gw = np.moveaxis(w, -2, -1).reshape(-1, fan_in // 4, 4)
        gm = np.moveaxis(mask, -2, -1).reshape(-1, fan_in // 4, 4)
        assert (gm.sum(-1) == 2).all()
        np.testing.assert_array_equal(np.sort(np.where(gm, gw, -1), -1)[..., 2:], np.sort(gw, -1)[..., 2:])


def test_polynomial_schedule():
    s = lambda t: float(prune.sparsity_at(t, 0.8, 100, 200, update_every=10))  # noqa: E731
    assert s(0) == 0.0 and s(99) == 0.0 and s(100) == 0.0 and s(250) == pytest.approx(0.8)
    assert s(155) == pytest.approx(0.8 * (1 - (1 - 0.5) ** 3))  # stepped: the value of step 150
    assert float(prune.sparsity_at(5, 0.7, 3, 3)) == pytest.approx(0.7)  # one-shot
    # An end step off the update grid still reaches the target there (it was stuck at step 10's value).
    off = lambda t: float(prune.sparsity_at(t, 0.9, 0, 11, update_every=10))  # noqa: E731
    assert off(10) == pytest.approx(0.9 * (1 - (1 - 10 / 11) ** 3)) and off(11) == pytest.approx(0.9)


@pytest.mark.parametrize("inner", [optax.sgd(0.1, momentum=0.9), optax.adam(0.05)], ids=["sgd_momentum", "adam"])
def test_pruned_weights_stay_exactly_zero(inner):
    params = _params(2)
    prunable = prune.select(params, "", "bias")
    tx = prune.masked(inner, prunable, method="magnitude", sparsity=0.6, begin_step=5, end_step=5)
    state = tx.init(params)
    step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)))
    rng = np.random.default_rng(3)
    for t in range(25):  # 5 steps build momentum / Adam moments, then one-shot pruning, then 20 more
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
        params, state = step(params, state, grads)
        if t >= 5:
            for name in ("conv", "dense"):
                kernel, mask = np.asarray(params[name]["kernel"]), np.asarray(state.masks[name]["kernel"])
                assert (kernel[~mask] == 0).all() and (~mask).sum() == round(0.6 * kernel.size)
    assert np.all(np.asarray(params["dense"]["bias"]) != 0)


def test_bad_settings_are_one_line():
    params = _params()
    prunable = prune.select(params, "", "bias")
    with pytest.raises(ValueError, match=r"prune.sparsity must be in \[0, 1\), got 1.0"):
        prune.check(params, prunable, "magnitude", 1.0, "layer", 2, 4)
    with pytest.raises(ValueError, match="prune.m=5 does not divide the input dimension 8 of conv/kernel"):
        prune.check(params, prunable, "nm", 0.5, "layer", 2, 5)


# ------------------------------------------------------------------ the 'prune' stage, end to end

import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from kdjax import checkpoint as kckpt  # noqa: E402
from kdjax import runs, train  # noqa: E402
from tests.test_reliability import wait_for  # noqa: E402
from tests.test_train import REPO, tiny_digits_config  # noqa: E402

STAGE = {"stages": "teacher,student,prune", "student.model": "cnn_tiny", "prune.epochs": 2,
         "checkpoint.every_steps": 3}
CLI = ["--config.teacher.model=cnn_tiny", "--config.teacher.epochs=1", "--config.student.epochs=1",
       "--config.stages=teacher,student,prune", "--config.student.model=cnn_tiny", "--config.prune.epochs=2",
       "--config.log_every_steps=1", "--config.throughput_batch=16", "--config.checkpoint.every_steps=3",
       "--config.log.report=False", "--verbosity=1"]  # the per-step lines are waited for


def _final(workdir):
    ckpts = kckpt.StageCheckpoints(os.path.join(workdir, "prune", "checkpoints"))
    state, _ = ckpts.restore(ckpts.latest_step())
    ckpts.close()
    return state


def test_prune_stage_kill_and_resume_is_bit_exact(tmp_path):
    reference = str(tmp_path / "reference")
    summary = train.run(tiny_digits_config(**STAGE), reference)
    result = summary["prune"]
    assert result["terms"] == summary["student"]["terms"]  # recovery with the distillation objective
    assert set(result["sparsity"]) == {"conv1_1/kernel", "conv2_0/kernel"}  # not conv1_0 (first), not head
    assert all(abs(v - 0.7) < 1e-3 for v in result["sparsity"].values())
    assert result["nonzero_params"] < result["num_params"]

    killed = str(tmp_path / "killed")
    args = [sys.executable, "-m", "experiments.digits", f"--workdir={killed}", *CLI]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(proc, "[prune] train step 25 ")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ref, got = _final(reference), _final(killed)
    jax.tree.map(np.testing.assert_array_equal, got["params"], ref["params"])
    jax.tree.map(np.testing.assert_array_equal, got["opt_state"], ref["opt_state"])  # masks included
    assert json.load(open(os.path.join(killed, "summary.json")))["prune"]["sparsity"] == result["sparsity"]


def test_prune_settings_are_refused_with_one_line(tmp_path):
    for overrides, message in (({"prune.sparsity": 1.0}, r"prune.sparsity must be in \[0, 1\)"),
                               ({"prune.method": "nm", "prune.m": 3}, "prune.m=3 does not divide"),
                               ({"prune.include": "nothing_matches"}, "select no kernel of cnn_tiny"),
                               ({"stages": "teacher,prune,student"}, "list it after 'student'"),
                               ({"prune.end_epoch": 3.0}, "lie beyond the stage's prune.epochs=2"),
                               ({"prune.method": "channel", "prune.criterion": "l3"}, "unknown prune.criterion 'l3'"),
                               ({"stages": "teacher,student,qat", "quant.mode": "int4"}, "unknown quant.mode"),
                               ({"stages": "teacher,student,qat", "quant.mode": "weights"},
                                "qwix cannot quantise the weights of convolution conv1_0 alone")):
        workdir = tmp_path / message[:12].replace(" ", "_").replace("\\", "")
        with pytest.raises(ValueError, match=message) as err:
            train.run(tiny_digits_config(**{**STAGE, **overrides}), str(workdir))
        assert "\n" not in str(err.value)
        assert not os.path.exists(workdir / "teacher" / "checkpoints")  # refused before training


def test_channel_pruning_and_qat_stages_in_one_run(tmp_path):
    """The in-run paths (the student trained in the same run): channel surgery on a CNN student,
    then QAT of it; the pruned model is rebuilt from <stage>/model.json."""
    workdir = str(tmp_path / "run")
    summary = train.run(tiny_digits_config(**{**STAGE, "stages": "teacher,student,prune,qat", "prune.method": "channel",
                                              "prune.sparsity": 0.5, "prune.criterion": "bn", "prune.epochs": 1,
                                              "quant.epochs": 1}), workdir)
    pruned = summary["prune"]
    assert pruned["channel_widths"] == {"widths": [8, 8, 16]}  # cnn_tiny's (16, 16, 32) halved
    assert pruned["num_params"] < 0.4 * pruned["unpruned_num_params"]
    model, variables, _ = runs.load_trained_model(workdir, "prune", kdata.load("digits"), jnp.float32)
    assert model.widths == (8, 8, 16) and variables["params"]["conv1_0"]["kernel"].shape == (3, 3, 1, 8)
    assert summary["qat"]["num_params"] == summary["student"]["num_params"]  # QAT fine-tunes the full student
    assert 0.0 <= summary["qat"]["test_accuracy"] <= 1.0
