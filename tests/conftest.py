"""Test-wide settings: several host CPU devices so multi-device code paths really run, and JAX's
persistent compilation cache, so that the many subprocesses compiling the same steps (kill and
resume, multi-host, CLI tests) compile each one once."""

import os
import tempfile

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
# XLA:CPU aborts a process whose devices wait for each other at a collective for 40 s; a loaded
# 2-core machine running 8 virtual devices (tests/test_global_batch.py) can take that long, and
# subprocesses inherit these flags.
if "collective_call_terminate" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += (" --xla_cpu_collective_call_terminate_timeout_seconds=900"
                                " --xla_cpu_collective_call_warn_stuck_timeout_seconds=300")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "kdjax-tests-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# CLI subprocesses keep glibc's malloc, so that a machine with tcmalloc installed runs them as CI
# does (without it, once each); tests/test_runtime.py tests the relaunch with its own setting.
os.environ.setdefault("KDJAX_MALLOC", "system")
# kdjax's caches on the machine (the tfds label cache, kdjax.data.records.cache_root): one fresh
# folder per test session, never the user's ~/.cache.
os.environ["KDJAX_CACHE_DIR"] = tempfile.mkdtemp(prefix="kdjax-tests-cache-")


@pytest.fixture(scope="module")
def fast_compiles():
    """JAX's "disable most optimizations" for a test module (``pytestmark =
    pytest.mark.usefixtures("fast_compiles")``): XLA:CPU spends most of such a module compiling many
    small loss and model graphs, and its optimisation passes are not needed there."""
    import jax

    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)
