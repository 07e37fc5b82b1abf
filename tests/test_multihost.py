"""Multi-process (multi-host) training: the same command scales across processes.

Two processes of `python -m experiments.digits`, one CPU device each (one with a fast clock), joined by
jax.distributed (--coordinator_address/--num_processes/--process_id) and writing into one shared
workdir (as on a pod with a shared filesystem), must give the same numbers as one process with
two devices over the same global batch (config.batch_size is global: each process feeds half),
and only process 0 writes the logs. All three processes run at the same time, to keep it short.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np

from kdjax import checkpoint as kckpt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 480  # for all three processes together; they take ~1-2 min on 2 busy CPU cores
TINY = [
    "--config.teacher.model=cnn_tiny",  # BatchNorm: the batch statistics are synchronised across processes
    "--config.student.model=mlp",
    "--config.teacher.epochs=1",
    "--config.student.epochs=1",
    "--config.stages=teacher,student",
    "--config.log_every_steps=1",
    "--config.throughput_batch=16",
    "--config.log.report=False",  # (the one-process run's evaluation report: tests/test_evaluate.py)
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONPATH=os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")])),
    )
    return env


# A process whose wall clock runs 200x fast (its `time.time`): with checkpoint.every_minutes it would
# decide to save long before the others and wait for them in the collective save forever, unless
# the decision is agreed across processes.
FAST_CLOCK = ("import runpy, time; t0 = time.time(); real = time.time; "
              "time.time = lambda: t0 + 200 * (real() - t0); "
              "runpy.run_module('experiments.digits', run_name='__main__', alter_sys=True)")


def _start(name, args, devices, logdir, fast_clock=False):
    out = open(os.path.join(logdir, f"{name}.out"), "w")
    err = open(os.path.join(logdir, f"{name}.err"), "w")
    command = ["-c", FAST_CLOCK] if fast_clock else ["-m", "experiments.digits"]
    proc = subprocess.Popen([sys.executable, *command, *args, *TINY], cwd=REPO,
                            env=_env(devices), stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    return {"name": name, "proc": proc, "files": (out, err), "logdir": logdir}


def _read(job, ext) -> str:
    with open(os.path.join(job["logdir"], f"{job['name']}.{ext}")) as f:
        return f.read()


def _logs(job) -> str:
    """The tails of a job's stdout and stderr, for failure messages."""
    return "\n".join(f"--- {job['name']} std{ext} (tail) ---\n" + "\n".join(_read(job, ext).splitlines()[-60:])
                     for ext in ("out", "err"))


def _wait_all(jobs, timeout_s):
    """Waits for every job; a failure or the deadline stops the others (a process whose partner
    died would wait in a collective forever) and fails with their stderr."""
    deadline = time.monotonic() + timeout_s
    try:
        while any(j["proc"].poll() is None for j in jobs):
            if any(j["proc"].returncode not in (None, 0) for j in jobs) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        for job in jobs:  # only the processes started here
            if job["proc"].poll() is None:
                job["proc"].kill()
                job["proc"].wait()
            for f in job["files"]:
                f.close()
    codes = {j["name"]: j["proc"].returncode for j in jobs}
    if any(codes.values()):
        timed_out = time.monotonic() > deadline
        raise AssertionError(
            ("timed out after %ds; " % timeout_s if timed_out else "")
            + "exit codes " + ", ".join(f"{n}={c}" for n, c in codes.items()) + "\n"
            + "\n".join(_logs(j) for j in jobs if j["proc"].returncode)
        )


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _summary(workdir):
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)


def _final_state(workdir, role):
    ckpts = kckpt.StageCheckpoints(os.path.join(workdir, role, "checkpoints"))
    step = ckpts.latest_step()
    state, meta = ckpts.restore(step)  # no target: the saved arrays as they are
    ckpts.close()
    return step, state, meta


def test_two_processes_match_one_process_with_two_devices(tmp_path):
    multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
    logdir = str(tmp_path)
    port = _free_port()
    dist = [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--workdir={multi}"]
    every = ["--config.checkpoint.every_minutes=5"]  # process 0's clock never reaches it (a stage takes
    # well under 5 minutes even on a loaded machine); process 1's reaches it after 1.5 s
    jobs = [
        _start("process0", dist + every + ["--process_id=0"], 1, logdir),
        _start("process1", dist + every + ["--process_id=1"], 1, logdir, fast_clock=True),
        _start("single", every + [f"--workdir={single}"], 2, logdir),
    ]
    _wait_all(jobs, TIMEOUT_S)

    # They really ran as two processes of one job, each finishing the whole run.
    logs = {j["name"]: _read(j, "out") + _read(j, "err") for j in jobs}
    assert "Connecting to JAX distributed service" in logs["process1"], _logs(jobs[1])
    for job in jobs[:2]:
        assert "22 steps of batch 64" in logs[job["name"]], _logs(job)
        assert "summary:" in logs[job["name"]], _logs(job)

    # Only process 0 writes: one line per (stage, kind, step), none missing, none twice.
    rows_m, rows_s = _metrics(multi), _metrics(single)
    keys_m = [(r["role"], r["kind"], r["step"]) for r in rows_m]
    keys_s = [(r["role"], r["kind"], r["step"]) for r in rows_s]
    assert len(keys_m) == len(set(keys_m)), "duplicate log lines: more than one process wrote metrics.jsonl"
    assert keys_m == keys_s
    assert {k[0] for k in keys_m} == {"teacher", "student"}
    assert sum(k[1] == "train" for k in keys_m) == 44 and sum(k[1] == "eval" for k in keys_m) == 2
    for a, b in zip(rows_m, rows_s):
        assert set(a) == set(b), (a, b)
        for k in ("loss", "accuracy", "grad_norm", "test_accuracy", "test_loss"):
            assert (k in a) == (k in b)
        for k, v in b.items():
            if isinstance(v, float):
                np.testing.assert_allclose(a[k], v, rtol=1e-4, atol=1e-6,
                                           err_msg=f"{a['role']} {a['kind']} step {a['step']}: {k}")
    assert not [f for f in os.listdir(multi) if f.endswith(".tmp")]

    sum_m, sum_s = _summary(multi), _summary(single)
    assert set(sum_m) == set(sum_s) == {"teacher", "student"}
    for role in sum_s:
        for k in ("test_accuracy", "best_test_accuracy", "selected_test_accuracy"):
            np.testing.assert_allclose(sum_m[role][k], sum_s[role][k], rtol=1e-4, err_msg=f"{role} {k}")
        for k in ("model", "num_params", "steps", "epochs", "terms", "selected_epoch"):
            assert sum_m[role][k] == sum_s[role][k], (role, k)
        with open(os.path.join(multi, role, "result.json")) as f:
            assert json.load(f)["test_accuracy"] == sum_m[role]["test_accuracy"]

    # The checkpoints the two processes wrote together are complete and hold the same model; the
    # fast clock of process 1 added no time-based checkpoint (process 0's clock decides).
    for role in ("teacher", "student"):
        assert sorted(os.listdir(os.path.join(multi, role, "checkpoints"))) == ["22"], role
        step_m, state_m, meta_m = _final_state(multi, role)
        step_s, state_s, meta_s = _final_state(single, role)
        assert step_m == step_s == 22
        assert meta_m["best_step"] == meta_s["best_step"]
        flat_m, flat_s = dict(_flatten(state_m["params"])), dict(_flatten(state_s["params"]))
        assert flat_m.keys() == flat_s.keys()
        for path in flat_s:
            np.testing.assert_allclose(flat_m[path], flat_s[path], rtol=1e-4, atol=1e-6, err_msg=f"{role} {path}")


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, f"{prefix}/{k}")
    else:
        yield prefix, np.asarray(tree)


def test_processes_that_do_not_share_the_workdir_are_refused(tmp_path):
    """Process 0 sees a finished run in its workdir, process 1 an empty one (no shared
    filesystem): both stop at once with one line instead of restoring different states."""
    logdir = str(tmp_path)
    done = str(tmp_path / "done")
    _wait_all([_start("first", [f"--workdir={done}", "--config.stages=teacher"], 1, logdir)], TIMEOUT_S)
    port = _free_port()
    dist = [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", "--config.stages=teacher"]
    jobs = [_start("process0", dist + ["--process_id=0", f"--workdir={done}"], 1, logdir),
            _start("process1", dist + ["--process_id=1", f"--workdir={tmp_path / 'elsewhere'}"], 1, logdir)]
    # Both are expected to fail, each on its own: _wait_all would kill the slower one as soon as the
    # first has exited, so wait for each.
    deadline = time.monotonic() + TIMEOUT_S
    for job in jobs:
        try:
            job["proc"].wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            job["proc"].kill()
            job["proc"].wait()
        for f in job["files"]:
            f.close()
    for job in jobs:
        assert job["proc"].returncode == 2, _logs(job)
        errors = [line for line in _read(job, "err").splitlines() if line.startswith("error:")]
        assert len(errors) == 1, _logs(job)
        assert "is there a run" in errors[0] and "(process 0: yes, process 1: no)" in errors[0], errors[0]
        assert "shared filesystem" in errors[0]
    assert json.load(open(os.path.join(done, "summary.json")))["teacher"]["model"] == "cnn_tiny"  # untouched
