"""Distilling a byte-level causal language model (``python -m experiments.lm``).

The same losses users import for language models (`kdjax.losses`), used on a real sequence task
that runs offline on any machine:

- **Text.** The bytes of a fixed list of modules of the running Python's own standard library
  (`CORPUS_FILES`, concatenated in that order, the first ``corpus.num_bytes`` of them). The last
  ``corpus.heldout_fraction`` is held out, as one contiguous block. The Python version and the
  sha256 of the bytes are written into every result, since another Python's standard library
  differs.
- **Batches.** Training windows of ``seq_len + 1`` bytes start at positions drawn from
  ``numpy.random.default_rng([seed, step])``: a batch is a pure function of (seed, step), so a
  resumed stage continues exactly. Held-out windows are the first ``eval_windows``
  non-overlapping ones of the held-out block.
- **Stages**, each in ``<workdir>/<stage>/`` with Orbax checkpoints (`kdjax.checkpoint`),
  ``result.json`` and its lines in ``<workdir>/metrics.jsonl`` (`kdjax.logs`): ``teacher``
  (cross-entropy), ``scratch`` (the student's architecture with cross-entropy), then one student
  per distillation method (`METHODS`): the loss is the method's divergence between student and
  frozen teacher next-byte distributions, averaged over positions, with no cross-entropy term
  (as GKD and DistiLLM train). A finished stage is skipped on a rerun; an interrupted one resumes
  from its latest checkpoint.
- **On-policy.** ``gkd_onpolicy`` (GKD, Agarwal et al., ICLR 2024), as TRL's ``GKDTrainer``
  does it: with probability λ (``gkd_onpolicy.fraction``, drawn per step) the batch's bytes after
  the first ``prompt_len`` are replaced by continuations sampled from the current student
  (temperature 1, no gradient, through the model's attention cache), and the generalized JSD is
  taken on the sampled positions only; otherwise the batch is the data's.
- **Figures.** Held-out bits per byte (cross-entropy / ln 2 of the next byte), top-1 agreement
  with the teacher (the argmax next byte is the same), and KL(teacher ‖ student) per byte, for
  every stage; ``<workdir>/lm.md`` holds the table, ``<workdir>/summary.json`` the numbers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import sys
import sysconfig
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from kdjax import checkpoint as kckpt
from kdjax import losses, paths, runs
from kdjax.logs import StageLog
from kdjax.models.transformer import CausalLM, init_cache

# Modules of the standard library whose source is the corpus (in this order): plain, long-lived
# modules of ordinary Python prose and code, present in every CPython 3.10+.
CORPUS_FILES = ("textwrap.py", "string.py", "shlex.py", "fnmatch.py", "glob.py", "getopt.py", "calendar.py",
                "difflib.py", "argparse.py", "dataclasses.py", "inspect.py", "typing.py", "pathlib.py",
                "subprocess.py", "threading.py", "tarfile.py", "configparser.py")
METHODS = ("kd", "reverse_kl", "generalized_jsd", "skew_kl", "taid", "gkd_onpolicy")
VOCAB = 256


# ----------------------------------------------------------------------------------------------
# Text


def corpus(num_bytes: int) -> tuple[np.ndarray, dict]:
    """(the first `num_bytes` bytes of `CORPUS_FILES`, as uint8; where they came from)."""
    root = sysconfig.get_paths()["stdlib"]
    parts, used = [], []
    for name in CORPUS_FILES:
        path = os.path.join(root, name)
        if os.path.exists(path):
            with open(path, "rb") as f:
                parts.append(f.read())
            used.append(name)
        if sum(map(len, parts)) >= num_bytes:
            break
    data = b"\n".join(parts)
    if len(data) < num_bytes:
        raise ValueError(f"corpus.num_bytes={num_bytes}: this Python's standard library files {', '.join(used)} "
                         f"hold only {len(data)} bytes; ask for at most that")
    data = data[:num_bytes]
    info = {"python": sys.version.split()[0], "files": used, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}
    return np.frombuffer(data, np.uint8), info


def split(data: np.ndarray, heldout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    cut = len(data) - int(round(heldout_fraction * len(data)))
    return data[:cut], data[cut:]


def train_batch(data: np.ndarray, seed: int, step: int, batch: int, seq_len: int) -> np.ndarray:
    """(batch, seq_len + 1) int32 windows of `data`, a pure function of (seed, step)."""
    starts = np.random.default_rng([seed, step]).integers(0, len(data) - seq_len - 1, batch)
    return data[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)


def heldout_windows(data: np.ndarray, seq_len: int, count: int) -> np.ndarray:
    n = min(count, (len(data) - 1) // seq_len)
    return np.stack([data[i * seq_len:i * seq_len + seq_len + 1] for i in range(n)]).astype(np.int32)


# ----------------------------------------------------------------------------------------------
# Config


def check(config: ml_collections.ConfigDict) -> list[str]:
    """One-line ValueError for an impossible setting; returns the stages in order."""
    methods = [m.strip() for m in str(config.methods).split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"config.methods: unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"config.methods={config.methods!r} names a method twice")
    for role in ("teacher", "student"):
        m = config[role]
        if m.width % m.heads:
            raise ValueError(f"config.{role}.width={m.width} is not a multiple of config.{role}.heads={m.heads}")
        for key in ("width", "depth", "heads", "steps"):
            if int(m[key]) < 1:
                raise ValueError(f"config.{role}.{key}={m[key]}: must be at least 1")
        if not m.learning_rate > 0:
            raise ValueError(f"config.{role}.learning_rate={m.learning_rate}: must be > 0")
    if not 0 < config.corpus.heldout_fraction < 0.5:
        raise ValueError(f"config.corpus.heldout_fraction={config.corpus.heldout_fraction}: must be in (0, 0.5)")
    if config.seq_len < 2 or config.batch_size < 1:
        raise ValueError(f"config.seq_len={config.seq_len}, config.batch_size={config.batch_size}: need seq_len >= 2 "
                         "and batch_size >= 1")
    held = int(round(config.corpus.heldout_fraction * config.corpus.num_bytes))
    if held < config.seq_len + 1:
        raise ValueError(f"the held-out block ({held} bytes) is shorter than one window (seq_len + 1 = "
                         f"{config.seq_len + 1}): raise corpus.num_bytes or corpus.heldout_fraction")
    g = config.gkd_onpolicy
    if not 0 <= g.fraction <= 1:
        raise ValueError(f"config.gkd_onpolicy.fraction={g.fraction}: must be in [0, 1]")
    if not 1 <= g.prompt_len < config.seq_len:
        raise ValueError(f"config.gkd_onpolicy.prompt_len={g.prompt_len}: must be in [1, seq_len={config.seq_len})")
    return ["teacher", "scratch", *methods]


def model_of(config, role: str) -> CausalLM:
    m = config[role]
    return CausalLM(vocab=VOCAB, width=int(m.width), depth=int(m.depth), heads=int(m.heads),
                    max_len=int(config.seq_len))


# ----------------------------------------------------------------------------------------------
# Losses


def _divergence(method: str, config, student_logits, teacher_logits, where, taid_t=None):
    if method == "kd":
        return losses.kd(student_logits, teacher_logits, temperature=config.temperature, where=where)
    if method == "reverse_kl":
        return losses.reverse_kl(student_logits, teacher_logits, temperature=config.temperature, where=where)
    if method == "generalized_jsd":
        return losses.generalized_jsd(student_logits, teacher_logits, beta=config.generalized_jsd.beta,
                                      temperature=config.temperature, where=where)
    if method == "gkd_onpolicy":
        return losses.generalized_jsd(student_logits, teacher_logits, beta=config.gkd_onpolicy.beta,
                                      temperature=config.temperature, where=where)
    if method == "skew_kl":
        return losses.skew_kl(student_logits, teacher_logits, alpha=config.skew_kl.alpha, where=where)  # no T
    if method == "taid":
        return losses.taid(student_logits, teacher_logits, taid_t, where=where)
    raise ValueError(f"unknown method {method!r}")


def _sample_continuations(model: CausalLM, params, tokens, prompt_len: int, rng):
    """`tokens` (B, T) with the positions from `prompt_len` on replaced by bytes sampled from the
    model (temperature 1), through the attention cache: the prompt is fed one byte at a time, then
    each sampled byte is fed back."""
    decoder = model.clone(decode=True)
    batch, length = tokens.shape

    def body(i, carry):
        seq, cache, key = carry
        logits, updated = decoder.apply({"params": params, "cache": cache},
                                        jax.lax.dynamic_slice_in_dim(seq, i - 1, 1, axis=1), mutable=["cache"])
        key, sub = jax.random.split(key)
        drawn = jax.random.categorical(sub, logits[:, 0]).astype(seq.dtype)
        seq = seq.at[:, i].set(jnp.where(i >= prompt_len, drawn, seq[:, i]))  # the prompt's own bytes stay
        return seq, updated["cache"], key

    seq, _, _ = jax.lax.fori_loop(1, length, body, (tokens, init_cache(decoder, batch), rng))
    return seq


def make_step(config, role: str, method: str | None, model, optimizer, teacher=None):
    """The jitted update of one stage: (state, windows (B, T+1)) -> (state, metrics)."""
    prompt = int(config.gkd_onpolicy.prompt_len)
    fraction = float(config.gkd_onpolicy.fraction)

    def step(state, windows, teacher_params):
        x, y = windows[:, :-1], windows[:, 1:]
        where = jnp.ones(x.shape, bool)
        if method == "gkd_onpolicy":  # as TRL's GKDTrainer: with probability λ this batch is the student's
            key = jax.random.fold_in(state["rng"], state["step"])
            k_coin, k_sample = jax.random.split(key)
            on = jax.random.bernoulli(k_coin, fraction)
            params = jax.lax.stop_gradient(state["params"])
            x = jax.lax.cond(on, lambda: _sample_continuations(model, params, x, prompt, k_sample), lambda: x)
            # On-policy: the predictions of the sampled bytes only (positions prompt-1 .. T-2 predict
            # the bytes at prompt .. T-1; the last position's next byte is not sampled).
            pos = jnp.arange(x.shape[1])
            where = jnp.broadcast_to(jnp.where(on, (pos >= prompt - 1) & (pos < x.shape[1] - 1), True), x.shape)
        t_logits = None if teacher is None else jax.lax.stop_gradient(teacher.apply({"params": teacher_params}, x))
        taid_t = state.get("taid", {}).get("t") if method == "taid" else None

        def loss_fn(params):
            logits = model.apply({"params": params}, x)
            if method is None:
                return losses.cross_entropy(logits, y, where=where), logits
            return _divergence(method, config, logits, t_logits, where, taid_t), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt = optimizer.update(grads, state["opt"], state["params"])
        new = dict(state, params=optax.apply_updates(state["params"], updates), opt=opt, step=state["step"] + 1)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        if method == "taid":
            new["taid"] = losses.taid_update(state["taid"], loss, state["step"], int(config.student.steps),
                                             **config.taid.to_dict())
            metrics["taid_t"] = state["taid"]["t"]
        if method == "gkd_onpolicy":
            metrics["onpolicy"] = on.astype(jnp.float32)
        return new, metrics

    return jax.jit(step, donate_argnums=0)


# ----------------------------------------------------------------------------------------------
# Evaluation


def evaluate(model, params, windows: np.ndarray, teacher_logits: np.ndarray | None = None, batch: int = 64) -> dict:
    """(figures, logits): held-out bits per byte, and with `teacher_logits` top-1 agreement and
    KL(teacher ‖ model); the model's (N, T, V) logits on `windows`."""
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x))
    nll, agree, kl, n = 0.0, 0.0, 0.0, 0
    out_logits = []
    for i in range(0, len(windows), batch):
        w = windows[i:i + batch]
        logits = np.asarray(fn(params, w[:, :-1]), np.float64)
        logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        nll -= np.take_along_axis(logp, w[:, 1:, None], -1).sum()
        n += w[:, 1:].size
        out_logits.append(logits.astype(np.float32))
        if teacher_logits is not None:
            t = teacher_logits[i:i + batch].astype(np.float64)
            tlogp = t - np.logaddexp.reduce(t, axis=-1, keepdims=True)
            agree += float((t.argmax(-1) == logits.argmax(-1)).sum())
            kl += float((np.exp(tlogp) * (tlogp - logp)).sum())
    out = {"heldout_bits_per_byte": nll / n / math.log(2)}
    if teacher_logits is not None:
        out.update(teacher_agreement=agree / n, kl_teacher_per_byte=kl / n)
    return out, np.concatenate(out_logits)


# ----------------------------------------------------------------------------------------------
# A stage


def _optimizer(m) -> optax.GradientTransformation:
    steps = int(m.steps)
    schedule = optax.warmup_cosine_decay_schedule(0.0, float(m.learning_rate), max(1, steps // 20), steps)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))


def _initial_state(config, role: str, method: str | None):
    """The state a stage starts from (also the restore target of its checkpoints)."""
    model, optimizer = model_of(config, role), _optimizer(config[role])
    seed = int(config.seed) + (0 if role == "teacher" else 1)  # every student stage starts from the same init
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, config.seq_len), jnp.int32))["params"]
    state = {"params": params, "opt": optimizer.init(params), "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.PRNGKey(seed + 7)}
    if method == "taid":
        state["taid"] = losses.taid_init(config.taid.t_start)
    return state


def _restore_params(config, workdir: str, stage: str, role: str):
    ckpt = kckpt.StageCheckpoints(os.path.join(workdir, stage, "checkpoints"), keep=1)
    try:
        return ckpt.restore(ckpt.latest_step(), _initial_state(config, role, None))[0]["params"]
    finally:
        ckpt.close()


def _train_stage(config, workdir: str, stage: str, data: np.ndarray, teacher_model=None, teacher_params=None,
                 signalled: list | None = None):
    """Trains (or resumes) one stage; returns its final params."""
    from kdjax import train

    role = "teacher" if stage == "teacher" else "student"
    method = stage if stage in METHODS else None
    m = config[role]
    model, optimizer = model_of(config, role), _optimizer(m)
    state = _initial_state(config, role, method)
    ckpt = kckpt.StageCheckpoints(os.path.join(workdir, stage, "checkpoints"), keep=1)
    start = 0
    if ckpt.latest_step() is not None:
        state, _ = ckpt.restore(ckpt.latest_step(), state)
        start = int(state["step"])
        logging.info("resuming stage %r from step %d", stage, start)
    total = int(m.steps)
    log = StageLog(workdir, stage, total_steps=total, steps_per_epoch=total, batch_size=int(config.batch_size),
                   start_step=start, tensorboard=bool(config.tensorboard), config=None)
    step_fn = make_step(config, role, method, model, optimizer, teacher_model)
    t0 = time.time()
    try:
        for s in range(start, total):
            windows = train_batch(data, int(config.seed), s, int(config.batch_size), int(config.seq_len))
            state, metrics = step_fn(state, windows, teacher_params)
            if (s + 1) % int(config.log_every) == 0 or s + 1 == total:
                log.log(s + 1, {k: float(v) for k, v in metrics.items()})
            if (s + 1) % int(config.checkpoint_every) == 0 or s + 1 == total or (signalled and s + 1 < total):
                ckpt.save(s + 1, state, {"best_step": s + 1})
            if signalled:
                ckpt.wait()
                raise train.Preempted(f"stage {stage!r} saved at step {s + 1} of {total}; rerun the same command "
                                      "to resume", signalled[0])
    finally:
        ckpt.close()
        log.flush()
    return state["params"], time.time() - t0


RUNTIME_FIELDS = ("log_every", "checkpoint_every", "tensorboard")  # where and how often: not the results


def identity(config) -> dict:
    """What determines the results: the flattened config without `RUNTIME_FIELDS` (a ConfigDict
    or the dict of a saved config.json)."""
    if not isinstance(config, dict):
        config = json.loads(config.to_json_best_effort(sort_keys=True))
    return {k: v for k, v in runs.flatten_dict(config).items() if k.split(".")[0] not in RUNTIME_FIELDS}


def digest(config) -> str:
    return hashlib.sha256(json.dumps(identity(config), sort_keys=True, default=str).encode()).hexdigest()[:8]


def run(config: ml_collections.ConfigDict, workdir: str, overwrite: bool = False) -> dict:
    """Every stage of the experiment in `workdir` (see the module docstring); returns the summary.
    A workdir holding a run of another config is refused (with `overwrite`: moved aside), as
    `kdjax.runs.prepare_workdir` does for image runs."""
    from kdjax import train

    stages = check(config)
    paths.check_workdir(workdir)
    data, info = corpus(int(config.corpus.num_bytes))
    train_data, held = split(data, float(config.corpus.heldout_fraction))
    windows = heldout_windows(held, int(config.seq_len), int(config.eval_windows))
    runs.prepare_workdir(config, workdir, overwrite, identity=identity)
    signalled: list[int] = []
    in_main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, lambda n, _f: signalled.append(n)) for sig in train.STOP_SIGNALS} \
        if in_main else {}
    results: dict[str, Any] = {}
    teacher_model, teacher_params, teacher_logits = model_of(config, "teacher"), None, None
    try:
        for stage in stages:
            result_path = os.path.join(workdir, stage, "result.json")
            done = runs.read_json(result_path)
            role = "teacher" if stage == "teacher" else "student"
            if done is not None:
                logging.info("stage %r already finished", stage)
                results[stage] = done
                if stage == "teacher":
                    teacher_params = _restore_params(config, workdir, stage, role)
                    _, teacher_logits = evaluate(teacher_model, teacher_params, windows)
                continue
            logging.info("stage %r: training", stage)
            distilled = stage in METHODS
            params, seconds = _train_stage(config, workdir, stage, train_data, teacher_model if distilled else None,
                                           teacher_params if distilled else None, signalled)
            model = model_of(config, role)
            figures, logits = evaluate(model, params, windows, None if stage == "teacher" else teacher_logits)
            if stage == "teacher":
                teacher_params, teacher_logits = params, logits
            results[stage] = {"stage": stage, "method": stage if stage in METHODS else "cross_entropy",
                              "params": int(sum(x.size for x in jax.tree.leaves(params))),
                              "steps": int(config[role].steps), "train_seconds_this_session": round(seconds, 1),
                              "corpus": info, **figures}
            runs.write_json(result_path, results[stage])
            logging.info("stage %r: held-out %.4f bits/byte", stage, figures["heldout_bits_per_byte"])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    summary = {"order": list(results), "stages": results, "corpus": info, "heldout_windows": int(len(windows)),
               "device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}"}
    runs.write_json(os.path.join(workdir, "summary.json"), summary)
    paths.write_text(os.path.join(workdir, "lm.md"), format_table(summary) + "\n")
    return summary


def format_table(summary: dict) -> str:
    rows = ["| stage | loss | params | held-out bits/byte | agreement with teacher | KL(teacher ‖ student) /byte |",
            "|---|---|---:|---:|---:|---:|"]
    for stage in summary["order"]:  # (the stages' order: summary.json's keys are sorted)
        r = summary["stages"][stage]
        fmt = lambda k: "-" if r.get(k) is None else f"{r[k]:.4f}"  # noqa: E731
        rows.append(f"| {stage} | {r['method']} | {r['params']:,} | {fmt('heldout_bits_per_byte')} | "
                    f"{fmt('teacher_agreement')} | {fmt('kl_teacher_per_byte')} |")
    c = summary["corpus"]
    rows.append("")
    rows.append(f"Corpus: {c['bytes']:,} bytes of Python {c['python']}'s {', '.join(c['files'])} (sha256 "
                f"{c['sha256'][:12]}); held-out: {summary['heldout_windows']} windows. Device: {summary['device']}.")
    return "\n".join(rows)
