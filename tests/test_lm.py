"""experiments.lm (kdjax.lm) shrunk to seconds: every method end to end through the command, a
rerun that skips every stage, an interrupted stage that resumes to the uninterrupted result, and
bad settings in one line."""

import json
import os
import signal
import subprocess
import sys

import pytest

from experiments.configs.lm import stdlib_bytes
from kdjax import lm, train
from tests.test_train import REPO


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "experiments.lm",
                           "--config=experiments/configs/lm/stdlib_bytes.py:smoke", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def test_every_method_end_to_end_then_a_rerun_skips_every_stage(tmp_path):
    workdir = str(tmp_path / "lm")
    out = _cli(f"--workdir={workdir}")
    assert out.returncode == 0, out.stderr[-3000:]
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    stages = summary["stages"]
    assert summary["order"] == ["teacher", "scratch", *lm.METHODS] and set(stages) == set(summary["order"])
    assert stages["teacher"]["params"] > stages["scratch"]["params"]
    for name, r in stages.items():
        assert 0 < r["heldout_bits_per_byte"] < 8.5, name  # a uniform guess is 8 bits per byte
        if name != "teacher":
            assert 0 <= r["teacher_agreement"] <= 1 and r["kl_teacher_per_byte"] >= 0
    # The teacher learnt something, and distillation pulls a student towards it.
    assert stages["teacher"]["heldout_bits_per_byte"] < 7.5
    assert stages["kd"]["kl_teacher_per_byte"] < stages["scratch"]["kl_teacher_per_byte"]
    for name in ("teacher", "scratch", "kd"):
        with open(os.path.join(workdir, name, "result.json")) as f:
            assert json.load(f)["heldout_bits_per_byte"] == stages[name]["heldout_bits_per_byte"]
    assert "| gkd_onpolicy | gkd_onpolicy |" in out.stdout
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert {r["role"] for r in rows} == set(stages)
    assert {r["onpolicy"] for r in rows if r["role"] == "gkd_onpolicy"} <= {0.0, 1.0}
    assert all(0 <= r["taid_t"] <= 1 for r in rows if r["role"] == "taid")
    again = _cli(f"--workdir={workdir}")
    assert again.returncode == 0 and again.stderr.count("already finished") == len(stages), again.stderr[-3000:]
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f)["stages"] == stages


def test_an_interrupted_stage_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    config = stdlib_bytes.get_config("smoke")
    config.methods = "kd"
    reference = lm.run(config, str(tmp_path / "plain"))["stages"]
    batch = lm.train_batch

    def signalled_at_step_5_of_kd(data, seed, step, *args):
        if step == 5 and signalled_at_step_5_of_kd.stage == "kd":
            os.kill(os.getpid(), signal.SIGTERM)  # as a TPU VM's preemption notice
        return batch(data, seed, step, *args)

    signalled_at_step_5_of_kd.stage = None
    train_stage = lm._train_stage

    def tracking(config, workdir, stage, *args, **kwargs):
        signalled_at_step_5_of_kd.stage = stage
        return train_stage(config, workdir, stage, *args, **kwargs)

    monkeypatch.setattr(lm, "train_batch", signalled_at_step_5_of_kd)
    monkeypatch.setattr(lm, "_train_stage", tracking)
    workdir = str(tmp_path / "interrupted")
    with pytest.raises(train.Preempted, match="stage 'kd' saved at step 6 of 12"):
        lm.run(config, workdir)
    assert not os.path.exists(os.path.join(workdir, "kd", "result.json"))
    monkeypatch.setattr(lm, "train_batch", batch)
    resumed = lm.run(config, workdir)["stages"]
    for name in ("teacher", "scratch", "kd"):
        for key in ("heldout_bits_per_byte", "teacher_agreement", "kl_teacher_per_byte"):
            assert resumed[name].get(key) == reference[name].get(key), (name, key)


@pytest.mark.parametrize("override, message", [
    ("--config.methods=kd,nope", "config.methods: unknown method 'nope'; choose from kd, reverse_kl"),
    ("--config.student.heads=3", "config.student.width=16 is not a multiple of config.student.heads=3"),
    ("--config.gkd_onpolicy.fraction=1.5", "config.gkd_onpolicy.fraction=1.5: must be in [0, 1]"),
    ("--config.corpus.num_bytes=100000000", "corpus.num_bytes=100000000: this Python's standard library files"),
])
def test_bad_settings_are_one_line_and_exit_2(tmp_path, override, message):
    out = _cli(f"--workdir={tmp_path / 'lm'}", override)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1 and message in errors[0], out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert not os.path.exists(tmp_path / "lm" / "teacher")


def test_cached_sampling_draws_what_the_full_forward_predicts():
    """The attention-cache decoder of kdjax.models.transformer gives the full forward's logits,
    and the prompt's bytes are kept."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from kdjax.models.transformer import CausalLM, init_cache

    model = CausalLM(vocab=lm.VOCAB, width=16, depth=2, heads=2, max_len=12)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (3, 12)), jnp.int32)
    params = model.init(jax.random.PRNGKey(0), tokens)["params"]
    full = model.apply({"params": params}, tokens)
    decoder, cache, steps = model.clone(decode=True), init_cache(model.clone(decode=True), 3), []
    for i in range(12):
        logits, updated = decoder.apply({"params": params, "cache": cache}, tokens[:, i:i + 1], mutable=["cache"])
        cache = updated["cache"]
        steps.append(logits[:, 0])
    np.testing.assert_allclose(np.stack(steps, 1), full, rtol=1e-5, atol=1e-5)
    sampled = lm._sample_continuations(model, params, tokens, 5, jax.random.PRNGKey(1))
    np.testing.assert_array_equal(sampled[:, :5], tokens[:, :5])
    assert not np.array_equal(sampled[:, 5:], tokens[:, 5:])


def test_a_missing_config_file_and_another_runs_folder_are_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "experiments.lm", "--config=experiments/configs/lm/nope.py"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "nope.py" in out.stderr, out.stderr[-2000:]
    workdir = tmp_path / "lm"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps({"seed": 5, "seq_len": 32}))
    out = _cli(f"--workdir={workdir}")
    assert out.returncode == 2 and "holds a run with a different config (differs in: seed" in out.stderr, out.stderr
