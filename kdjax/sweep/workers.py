"""Workers of one sweep: the sweep lock, liveness of running trials (pid and /proc start ticks on
the same machine, heartbeat files across machines), and retries of interrupted trials.

Any number of processes (on one or several machines sharing the sweep folder and the storage) run
one study. Trials are created under an exclusive `FileLock` in the sweep folder, so the trial count
is exact. Each RUNNING trial names its worker (user attr `WORKER`: machine + pid namespace, pid,
process start time) and its `Heartbeat` file is touched while it runs; `retry_interrupted` marks a
trial whose worker is gone FAIL and queues a retry with the same parameters that resumes the
original's run folder (`root_number`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import threading
import time
from typing import TYPE_CHECKING

from absl import logging

from kdjax import paths

if TYPE_CHECKING:
    from kdjax.sweep.space import Sweep

WORKER = "kdjax_worker"  # user attr of a RUNNING trial: which process runs it


def lock(path: str):
    """The sweep folder's exclusive lock `path`: a `FileLock`, or in a bucket a `bucket.BucketLock`."""
    if paths.is_remote(path):
        from kdjax.sweep import bucket

        return bucket.BucketLock(path)
    return FileLock(path)


class FileLock:
    """An exclusive flock on a file (released by the kernel if the process dies)."""

    def __init__(self, path: str):
        self.path, self._f = path, None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        f = open(self.path, "a+")
        fcntl.flock(f, fcntl.LOCK_EX)
        self._f = f

    def release(self) -> None:
        if self._f is not None:
            fcntl.flock(self._f, fcntl.LOCK_UN)
            self._f.close()
            self._f = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def _namespace() -> str:
    """Identifies the set of processes whose pids this process can check: machine + pid namespace."""
    parts = [socket.gethostname()]
    for path in ("/proc/sys/kernel/random/boot_id",):
        with contextlib.suppress(OSError):
            parts.append(open(path).read().strip())
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return "/".join(parts)


def _start_ticks(pid: int) -> str | None:
    """(state, start time) of a process from /proc, or None where /proc is missing."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return f"{fields[0]}:{fields[19]}"
    except (OSError, IndexError):
        return None


def this_worker() -> dict:
    stat = _start_ticks(os.getpid())
    return {"ns": _namespace(), "host": socket.gethostname(), "pid": os.getpid(),
            "start": stat.split(":")[1] if stat else None}


def _alive(worker: dict) -> bool:
    """Whether the process of `worker` (same machine and pid namespace) still runs."""
    pid = int(worker["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = _start_ticks(pid)
    if stat is None:
        return True
    state, start = stat.split(":")
    return state not in ("Z", "X") and (worker.get("start") is None or start == worker["start"])


class Heartbeat:
    """Touches <sweep>/heartbeats/<trial number> every `interval` seconds while a trial runs."""

    def __init__(self, workdir: str, number: int, interval: float):
        self.path = os.path.join(workdir, "heartbeats", str(number))
        self.interval, self._stop = interval, threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _touch(self):
        if paths.is_remote(self.path):
            from kdjax.sweep import bucket

            bucket.touch(self.path)
        else:
            os.utime(self.path)

    def _beat(self):
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):  # a missed beat is retried at the next interval
                self._touch()

    def __enter__(self):
        if paths.is_remote(self.path):
            self._touch()
        else:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            open(self.path, "a").close()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        if paths.is_remote(self.path):
            from kdjax.sweep import bucket

            with contextlib.suppress(Exception):
                bucket.delete(self.path)
            return
        with contextlib.suppress(OSError):
            os.remove(self.path)


def retried_numbers(trials) -> set[int]:
    """Numbers of the trials that a later trial retries."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}


def root_number(trial) -> int:
    """The number of the trial a retry chain started from (its run folder is trials/<that>)."""
    return int(trial.system_attrs.get("failed_trial", trial.number))


def _stale(p: Sweep, workdir: str, trial) -> str | None:
    """Why the RUNNING `trial` is dead, or None if it may be alive. Called under the sweep lock."""
    worker = trial.user_attrs.get(WORKER)
    if worker is None:  # trials get their worker under the sweep lock: its creator died in between
        return "its worker died before it started"
    if worker.get("ns") == _namespace():
        return None if _alive(worker) else f"its worker (pid {worker['pid']}) is gone"
    beat = os.path.join(workdir, "heartbeats", str(trial.number))
    if paths.is_remote(beat):
        from kdjax.sweep import bucket

        age = bucket.age(beat)
    else:
        try:
            age = time.time() - os.path.getmtime(beat)
        except OSError:
            age = float("inf")
    if age > p.stale_after_s:
        return f"no heartbeat from its worker ({worker.get('host')}, pid {worker.get('pid')}) for {age:.0f} s"
    return None


def retry_interrupted(p: Sweep, workdir: str, study) -> None:
    """Marks dead RUNNING trials FAIL and queues a retry (same parameters, same run folder) of
    every interrupted trial not yet retried. Called under the sweep lock."""
    import optuna

    storage = study._storage
    trials = study.get_trials(deepcopy=False)
    for t in trials:
        if t.state == optuna.trial.TrialState.RUNNING and (why := _stale(p, workdir, t)):
            logging.warning("trial %d was interrupted (%s): marking it failed and retrying it", t.number, why)
            storage.set_trial_user_attr(t._trial_id, "interrupted", why)
            storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    for t in trials:
        if t.state != optuna.trial.TrialState.FAIL or "interrupted" not in t.user_attrs or t.number in retried:
            continue
        history = list(t.system_attrs.get("retry_history", [])) + [t.number]
        if len(history) > p.max_retries:
            logging.warning("trial %d was interrupted %d times: not retried again", root_number(t), len(history))
            continue
        system = {k: v for k, v in t.system_attrs.items() if k not in ("failed_trial", "retry_history")}
        system.update(failed_trial=root_number(t), retry_history=history)
        study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.WAITING, params=t.params, distributions=t.distributions,
            system_attrs=system, intermediate_values=t.intermediate_values))
        logging.info("queued a retry of trial %d (resumes trials/%d)", t.number, root_number(t))


def _counted(trials) -> list:
    """The trials that count towards n_trials: all but those a retry replaces."""
    retried = retried_numbers(trials)
    return [t for t in trials if t.number not in retried]


def progress(p: Sweep, study) -> dict:
    """Trial counts by state (retried ones left out) and whether the sweep has finished."""
    import optuna

    counted = _counted(study.get_trials(deepcopy=False))
    states = {}
    for t in counted:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    unfinished = sum(t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING) for t in counted)
    return {"states": states, "counted": len(counted), "finished": len(counted) >= p.n_trials and not unfinished,
            "waiting": sum(t.state == optuna.trial.TrialState.WAITING for t in counted)}



def last_of_mine(study):
    """The most recent finished trial run by this process."""
    me = this_worker()
    for t in reversed(study.get_trials(deepcopy=False)):
        w = t.user_attrs.get(WORKER) or {}
        if w.get("pid") == me["pid"] and w.get("ns") == me["ns"] and t.state.is_finished():
            return t
    return None

