"""kdjax.runtime: the XLA:CPU flags, the host allocator relaunch and the persistent compilation cache."""

import os
import subprocess
import sys

import pytest

from kdjax import runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cpu_flags_are_added_once_and_switchable(monkeypatch):
    monkeypatch.setattr(runtime, "_jaxlib_version", lambda: "0.10.2")
    both = runtime.CPU_CONV_FLAG + " " + runtime.CPU_SCHEDULER_FLAG
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert runtime.configure_xla_cpu(env) == (runtime.CPU_CONV_FLAG, runtime.CPU_SCHEDULER_FLAG)
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2 " + both
    assert runtime.configure_xla_cpu(env) == ()  # already there: unchanged
    assert env["XLA_FLAGS"].count("ynn_fusion_type") == 1 and env["XLA_FLAGS"].count("scheduler_type") == 1

    off = {"KDJAX_CPU_CONV": "ynnpack", "KDJAX_CPU_SCHEDULER": "default"}
    assert runtime.configure_xla_cpu(off) == () and "XLA_FLAGS" not in off
    one = {"KDJAX_CPU_SCHEDULER": "default"}  # each switch alone
    assert runtime.configure_xla_cpu(one) == (runtime.CPU_CONV_FLAG,)
    with pytest.warns(UserWarning, match="KDJAX_CPU_SCHEDULER='memroy' is neither 'memory' .* treats it as 'default'"):
        assert runtime.configure_xla_cpu({"KDJAX_CPU_SCHEDULER": "memroy"}) == (runtime.CPU_CONV_FLAG,)
    own = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT "
                        "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT"}
    assert runtime.configure_xla_cpu(own) == ()  # the user's own choices are kept
    assert own["XLA_FLAGS"].endswith("INDIVIDUAL_DOT --xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT")

    monkeypatch.setattr(runtime, "_jaxlib_version", lambda: "0.11.0")  # not measured there: left alone
    assert runtime.configure_xla_cpu({}) == ()


def test_import_kdjax_sets_the_flags_before_the_backend_starts():
    """Each process prints its XLA_FLAGS and the scratch memory (XLA's memory analysis) of a small
    conv net's compiled gradient: with kdjax's flags on, the memory-optimised scheduler must need
    clearly less than XLA's default order (the point of the flag); switched off, neither flag is set.
    Traced `portable` (no `layers.materialize`): a materialised conv input is kept for the backward
    pass, whatever the order, which leaves the scheduler less to save (122 against 135 MB here)."""
    code = ("import os, kdjax, jax, jax.numpy as jnp; from kdjax import models; from kdjax.models import layers\n"
            "m = models.MODELS['cnn_small'](num_classes=10)\n"
            "v = models.init_model(m, jax.random.PRNGKey(0), (28, 28, 1))\n"
            "def loss(p, x): return m.apply({**v, 'params': p}, x, train=True, mutable=['batch_stats'])[0].sum()\n"
            "with layers.portable(): lowered = jax.jit(jax.grad(loss)).lower(v['params'], jnp.ones((128, 28, 28, 1)))\n"
            "c = lowered.compile()\n"
            "print(os.environ.get('XLA_FLAGS', '')); print(c.memory_analysis().temp_size_in_bytes)")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "KDJAX_CPU_CONV", "KDJAX_CPU_SCHEDULER")}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    flags, temp_on = out.stdout.splitlines()[-2:]
    assert runtime.CPU_CONV_FLAG in flags and runtime.CPU_SCHEDULER_FLAG in flags
    env.update(KDJAX_CPU_CONV="ynnpack", KDJAX_CPU_SCHEDULER="default")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    flags, temp_off = out.stdout.splitlines()[-2:]
    assert "ynn_fusion_type" not in flags and "scheduler_type" not in flags
    assert int(temp_on) < 0.8 * int(temp_off), (temp_on, temp_off)


def test_compilation_cache_is_written_and_reused(tmp_path):
    """A second process compiling the same function reads it from the cache directory."""
    cache = str(tmp_path / "cache")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    code = ("import sys, jax, jax.numpy as jnp; from kdjax import runtime; "
            "runtime.enable_compilation_cache(sys.argv[1]); "
            "from jax._src import monitoring; hits = []; "
            "monitoring.register_event_listener(lambda e, **k: hits.append(e) if 'cache_hits' in e else None); "
            "jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).block_until_ready(); print(len(hits))")
    first = subprocess.run([sys.executable, "-c", code, cache], cwd=REPO, env=env, capture_output=True, text=True,
                           check=True)
    assert first.stdout.strip() == "0"
    assert any(name.endswith("-cache") for name in os.listdir(cache))
    second = subprocess.run([sys.executable, "-c", code, cache], cwd=REPO, env=env, capture_output=True,
                            text=True, check=True)
    assert int(second.stdout.strip()) >= 1
    assert runtime.enable_compilation_cache("") is None


def test_a_cache_folder_that_cannot_be_made_is_one_line(tmp_path):
    import jax

    blocker = tmp_path / "file"
    blocker.write_text("")
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)  # as when JAX has none set
    try:
        with pytest.raises(ValueError, match="compile_cache_dir=.* cannot be created"):
            runtime.enable_compilation_cache(str(blocker / "cache"))
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_host_allocator_choice(tmp_path, monkeypatch):
    lib = tmp_path / "libfake.so"
    lib.write_text("")
    assert runtime.host_allocator({"KDJAX_MALLOC": "system"}) is None
    assert runtime.host_allocator({"KDJAX_MALLOC": str(lib)}) == str(lib)
    assert runtime.host_allocator({"KDJAX_MALLOC": str(lib), "LD_PRELOAD": f"/x.so:{lib}"}) is None  # done
    monkeypatch.setattr(runtime.ctypes.util, "find_library", lambda name: None)
    assert runtime.host_allocator({}) is None  # auto without tcmalloc installed: nothing to do
    monkeypatch.setattr(runtime.ctypes.util, "find_library", lambda name: f"lib{name}.so.4")
    assert runtime.host_allocator({}) == "libtcmalloc_minimal.so.4"
    assert runtime.host_allocator({"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"}) is None  # one already
    with pytest.raises(ValueError, match="KDJAX_MALLOC='/no/such.so' is not a file; use auto"):
        runtime.host_allocator({"KDJAX_MALLOC": "/no/such.so"})


def test_the_relaunch_environment_keeps_tcmallocs_memory():
    env = runtime.allocator_environ("/usr/lib/libtcmalloc_minimal.so.4", {"LD_PRELOAD": "/x.so", "A": "1"})
    assert env["LD_PRELOAD"] == "/usr/lib/libtcmalloc_minimal.so.4 /x.so" and env["A"] == "1"
    assert env["TCMALLOC_RELEASE_RATE"] == "0" and int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40
    mine = runtime.allocator_environ("libtcmalloc.so.4", {"TCMALLOC_RELEASE_RATE": "2"})
    assert mine["TCMALLOC_RELEASE_RATE"] == "2"  # the user's own setting stays
    other = runtime.allocator_environ("/opt/libjemalloc.so.2", {})
    assert other == {"LD_PRELOAD": "/opt/libjemalloc.so.2"}  # tcmalloc's settings only for tcmalloc


def test_commands_relaunch_with_the_allocator_preloaded():
    """The relaunch end to end, with libc standing in for tcmalloc (present on every Linux machine):
    the command runs again with the library in LD_PRELOAD, once; a bad KDJAX_MALLOC is one line."""
    libc = next((os.path.join(d, "libc.so.6") for d in ("/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu",
                 "/usr/lib64", "/lib64") if os.path.isfile(os.path.join(d, "libc.so.6"))), None)
    if not sys.platform.startswith("linux") or libc is None:
        pytest.skip("needs Linux with glibc")
    code = ("import os; print('start', flush=True); from experiments import launch; launch.relaunch(); "
            "print('preload', os.environ['LD_PRELOAD'])")
    env = {**{k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}, "KDJAX_MALLOC": libc}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split("\n") == ["start", "start", f"preload {libc}", ""]  # ran twice, preloaded once
    env["KDJAX_MALLOC"] = "/no/such.so"
    out = subprocess.run([sys.executable, "-m", "experiments.digits"], cwd=REPO, env=env, capture_output=True,
                         text=True)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "error: KDJAX_MALLOC='/no/such.so' is not a file; use auto (tcmalloc when installed), system (glibc's "
        "malloc) or the path of a malloc library, e.g. /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"]
