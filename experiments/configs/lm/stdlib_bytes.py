"""Byte-level language-model distillation on Python's own standard library (kdjax.lm).

    python -m experiments.lm
    python -m experiments.lm --config=experiments/configs/lm/stdlib_bytes.py:smoke   # seconds

A 4-layer, width-128 causal transformer teacher (0.8M parameters) trained with cross-entropy on
600 kB of standard-library source; a 2-layer, width-64 student (0.1M) trained from scratch and
distilled with forward KD, reverse KL, generalized JSD (β = 0.5), skew KL (α = 0.1), TAID, and
on-policy GKD (λ = 0.5 of the sequences continued by the student after 64 bytes). Every student
stage starts from the same initialisation and sees the same batches. Measured results:
docs/lm.md. Config-string argument: ``smoke`` (a model and step count small enough for a test).
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.corpus = ml_collections.ConfigDict({"num_bytes": 600_000, "heldout_fraction": 0.1})
    c.seq_len = 128  # bytes of context; each training window is seq_len + 1 bytes
    c.batch_size = 32
    c.teacher = ml_collections.ConfigDict({"width": 128, "depth": 4, "heads": 4, "steps": 1500,
                                           "learning_rate": 3e-3})
    c.student = ml_collections.ConfigDict({"width": 64, "depth": 2, "heads": 2, "steps": 800,
                                           "learning_rate": 3e-3})
    c.methods = "kd,reverse_kl,generalized_jsd,skew_kl,taid,gkd_onpolicy"  # one student stage each
    c.temperature = 1.0  # of kd, reverse_kl and the JSDs (skew_kl and taid have none)
    c.generalized_jsd = ml_collections.ConfigDict({"beta": 0.5})
    c.skew_kl = ml_collections.ConfigDict({"alpha": 0.1})
    # kdjax.losses.taid_update's schedule (SakanaAI/TAID's defaults), over the student's steps
    c.taid = ml_collections.ConfigDict({"t_start": 0.4, "t_end": 1.0, "alpha": 5e-4, "beta": 0.99,
                                        "adaptive": True})
    # λ: the fraction of each batch's sequences continued by the student after prompt_len bytes.
    c.gkd_onpolicy = ml_collections.ConfigDict({"fraction": 0.5, "beta": 0.5, "prompt_len": 64})
    c.eval_windows = 256  # held-out windows of seq_len bytes
    c.log_every = 50
    c.checkpoint_every = 200
    c.tensorboard = True
    if arg == "smoke":
        c.corpus.num_bytes = 40_000
        c.seq_len, c.batch_size = 32, 8
        c.teacher.update(width=32, depth=1, heads=2, steps=30)
        c.student.update(width=16, depth=1, heads=2, steps=12)
        c.gkd_onpolicy.prompt_len = 16
        c.eval_windows, c.log_every, c.checkpoint_every = 16, 4, 5
        c.tensorboard = False
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; the only one is 'smoke'")
    return c
