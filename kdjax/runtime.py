"""Process-wide JAX settings that kdjax applies for speed: two XLA:CPU flags and the persistent
compilation cache.

**XLA:CPU flags.** `import kdjax` appends these to ``XLA_FLAGS`` before the backend starts (they
only concern XLA:CPU; GPU/TPU compiles ignore them). Each is applied only for the jaxlib versions it
was measured on (`TESTED_JAXLIB`), so an upgrade that drops an experimental flag cannot abort
start-up; re-measure with ``python -m experiments.bench --suite`` when jax is upgraded. Each has its
own switch, and a flag the user already set in ``XLA_FLAGS`` is left as the user set it. Neither
has an effect when a JAX computation already ran in this process before `import kdjax`.

- **Convolutions in Eigen** (``KDJAX_CPU_CONV=eigen``, the default; ``=ynnpack`` switches it off):
  ``--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION``. XLA:CPU in
  jaxlib 0.10 sends convolutions to YNNPACK by default, whose weight gradients are slower than
  Eigen's (measured on a 2-core AMD EPYC VM on 2026-12-01 with `python -m experiments.bench --suite`,
  alternating the two settings: the cnn_small train step 1.3x and the resnet32x4 -> resnet8x4 KD step 1.1-1.2x
  faster with Eigen).
- **The memory-optimised scheduler** (``KDJAX_CPU_SCHEDULER=memory``, the default; ``=default``
  switches it off): ``--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED``. XLA:CPU's
  default instruction order keeps many activations alive at once: the ResNet-18 -> MobileNetV2 KD
  step at batch 64 needs 2.6 GB of scratch memory per step, the memory-optimised order 1.3 GB. The
  CPU runtime takes that scratch buffer from the system allocator on every step, and a buffer that
  large is fresh pages each time (about 640,000 page faults per step, measured with ``getrusage``),
  so halving it is also a speed-up: on the same VM on 2026-12-02, alternating the two settings twice, the
  R18 -> MNv2 step 1.2-1.5x, resnet32x4 -> resnet8x4 1.1-1.4x, cnn_small 1.0-1.2x faster. It orders
  the same operations differently and does not change results (the offline default run gave
  identical accuracies and losses with and without it).

**Host allocator.** The CPU runtime takes each step's scratch buffer (hundreds of MB for a
ResNet-18 -> MobileNetV2 step) from ``malloc``, and glibc's malloc returns buffers that large to the
system when they are freed, so every step faults in fresh zeroed pages (about 300,000 page faults a
step for that pair even with the scheduler above). tcmalloc keeps them: on the same VM, one process
per setting, alternating twice, tcmalloc made the R18 -> MNv2 step 1.30x and 1.9x faster (the
second glibc run was slowed by other load), cnn_small 1.26x and 1.44x, resnet32x4 -> resnet8x4
1.09x and 1.12x, and page faults fell from 317,000 to 17,000 a step (R18 -> MNv2) and from 19,000
to under 30 (cnn_small). An allocator can only be chosen when a process starts, so kdjax's
command-line entry points call `relaunch_with_allocator` first: it re-executes the same command with
tcmalloc in ``LD_PRELOAD`` when the library is installed (Debian/Ubuntu: ``apt-get install
libtcmalloc-minimal4``). ``KDJAX_MALLOC=auto`` (the default) does that unless a malloc library is
preloaded already, ``KDJAX_MALLOC=system`` keeps glibc's malloc, and ``KDJAX_MALLOC=<path of a
.so>`` preloads that library. In your own program, start Python with
``LD_PRELOAD=libtcmalloc_minimal.so.4`` for the same effect.

With tcmalloc the relaunch also sets ``TCMALLOC_RELEASE_RATE=0`` (unless it is set): tcmalloc then
keeps the memory a process frees instead of handing it back to the system a little at a time. The
memory XLA frees after compiling was otherwise handed back and faulted in again while training: in
the Fashion-MNIST recipe with an empty compilation cache (2-core VM, 2026-12-02, alternated twice)
the run took 1.4-1.9 million minor page faults and 6.0-7.0 s of system time by default, and
182,000 and 192,000 faults and 3.3-3.4 s with the setting, with a peak RSS no higher (900-942 MB
against 1,034-1,272 MB). Set your own ``TCMALLOC_RELEASE_RATE`` to choose otherwise.

**Compilation cache.** `enable_compilation_cache(path)` turns on JAX's persistent cache: a second
launch of the same run loads its compiled steps from disk instead of recompiling them. The trainer
calls it with ``config.compile_cache_dir`` (default ``~/.cache/kdjax/jax``; empty: off); a cache
directory already set through JAX (``JAX_COMPILATION_CACHE_DIR``) is left as it is.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
import warnings

CPU_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
CPU_SCHEDULER_FLAG = "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"
# (switch variable, its value for on = the default, its value for off, the flag); see the module docstring
CPU_FLAGS = (("KDJAX_CPU_CONV", "eigen", "ynnpack", CPU_CONV_FLAG),
             ("KDJAX_CPU_SCHEDULER", "memory", "default", CPU_SCHEDULER_FLAG))
TESTED_JAXLIB = ("0.10.",)  # jaxlib versions on which the CPU flags exist and were measured faster
DEFAULT_CACHE_DIR = "~/.cache/kdjax/jax"


def _jaxlib_version() -> str:
    try:
        from jaxlib import version
    except ImportError:  # pragma: no cover - jax always brings jaxlib
        return ""
    return version.__version__


def configure_xla_cpu(environ=os.environ) -> tuple[str, ...]:
    """Appends kdjax's XLA:CPU flags (see the module docstring) to ``XLA_FLAGS`` in `environ`, each
    unless switched off or already chosen by the user; returns the flags it added. A switch set to
    neither of its values counts as off, with a warning."""
    if not _jaxlib_version().startswith(TESTED_JAXLIB):
        return ()
    added = []
    for switch, on, off, flag in CPU_FLAGS:
        flags = environ.get("XLA_FLAGS", "")
        name = flag.split("=")[0]
        value = environ.get(switch, on).lower()
        if value not in (on, off):
            warnings.warn(f"{switch}={value!r} is neither {on!r} (the default) nor {off!r}; kdjax treats it as {off!r}",
                          stacklevel=2)
        if value != on or name in flags:  # off, or the user decided
            continue
        environ["XLA_FLAGS"] = f"{flags} {flag}".strip()
        added.append(flag)
    return tuple(added)


def enable_compilation_cache(path: str | None) -> str | None:
    """Turns on JAX's persistent compilation cache in `path` (``~`` expanded); None or '' leaves
    it off. Every compiled function is cached (no minimum compile time). Returns the directory."""
    if not path:
        return None
    import jax

    if jax.config.jax_compilation_cache_dir:  # already chosen (JAX_COMPILATION_CACHE_DIR or the user)
        return jax.config.jax_compilation_cache_dir
    directory = os.path.abspath(os.path.expanduser(str(path)))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise ValueError(f"config.compile_cache_dir={path!r} cannot be created ({e.strerror}); "
                         "choose a writable folder, or '' for no compilation cache") from None
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    from jax._src import compilation_cache  # the cache object is created once; point it at the new dir

    compilation_cache.reset_cache()
    return directory


TCMALLOC = ("tcmalloc_minimal", "tcmalloc")  # library names, in order of preference


def host_allocator(environ=os.environ) -> str | None:
    """The malloc library `relaunch_with_allocator` preloads (``KDJAX_MALLOC``: ``auto``, the
    default, is tcmalloc when installed and no other malloc library is preloaded; ``system``: none;
    else a library path), or None when there is none, or it is already preloaded. A path that is not
    a file raises ValueError."""
    choice = environ.get("KDJAX_MALLOC", "auto")
    preloaded = environ.get("LD_PRELOAD", "").replace(":", " ").split()
    if choice == "system" or not sys.platform.startswith("linux"):
        return None
    if choice == "auto":
        if any("malloc" in os.path.basename(p) for p in preloaded):
            return None  # one is preloaded already (some Colab images preload tcmalloc)
        lib = next(filter(None, map(ctypes.util.find_library, TCMALLOC)), None)
    elif os.path.isfile(choice):
        lib = choice
    else:
        raise ValueError(f"KDJAX_MALLOC={choice!r} is not a file; use auto (tcmalloc when installed), "
                         "system (glibc's malloc) or the path of a malloc library, e.g. "
                         "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
    if lib is None or lib in preloaded:
        return None
    return lib


def relaunch_with_allocator(environ=os.environ) -> None:
    """Re-executes this process's command with `host_allocator` in ``LD_PRELOAD`` (see the module
    docstring); returns without doing anything when there is none. Call it first thing in a
    command's main, before any thread or JAX backend starts: `os.execve` replaces the process."""
    lib = host_allocator(environ)
    if lib is None:
        return
    env = allocator_environ(lib, environ)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def allocator_environ(lib: str, environ=os.environ) -> dict:
    """`environ` with `lib` preloaded, as `relaunch_with_allocator` runs the command again. For
    tcmalloc also (unless set already): no report line per large scratch buffer, and
    ``TCMALLOC_RELEASE_RATE=0``, which keeps freed memory in the process instead of returning it to
    the system (see the module docstring)."""
    env = dict(environ)
    env["LD_PRELOAD"] = " ".join(filter(None, (lib, environ.get("LD_PRELOAD", ""))))
    if "tcmalloc" in os.path.basename(lib):
        env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
        env.setdefault("TCMALLOC_RELEASE_RATE", "0")
    return env
