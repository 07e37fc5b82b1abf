"""Process-wide JAX settings that kdjax applies for speed: XLA:CPU convolution routing and the
persistent compilation cache.

**Convolutions on CPU.** XLA:CPU in jaxlib 0.10 sends convolutions to YNNPACK by default, whose
weight gradients are slower than Eigen's (measured on a 2-core AMD EPYC VM with
`python -m experiments.bench --suite`, alternating the two settings: the cnn_small train step 1.3x
and the resnet32x4 -> resnet8x4 KD step 1.1-1.2x faster with Eigen). `import kdjax` therefore appends
``--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION`` to
``XLA_FLAGS`` before the backend starts. The flag only concerns XLA:CPU (GPU/TPU compiles ignore it);
it is applied only for the jaxlib versions it was measured on (`TESTED_JAXLIB`), so an upgrade that
drops the experimental flag cannot abort start-up; re-measure with ``python -m experiments.bench
--suite`` when jax is upgraded. Switch it off with ``KDJAX_CPU_CONV=ynnpack`` (or set the flag
yourself in ``XLA_FLAGS``, which kdjax then leaves alone). It has no effect when a JAX computation
already ran in this process before `import kdjax`.

**Compilation cache.** `enable_compilation_cache(path)` turns on JAX's persistent cache: a second
launch of the same run loads its compiled steps from disk instead of recompiling them. The trainer
calls it with ``config.compile_cache_dir`` (default ``~/.cache/kdjax/jax``; empty: off); a cache
directory already set through JAX (``JAX_COMPILATION_CACHE_DIR``) is left as it is.
"""

from __future__ import annotations

import os

CPU_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
TESTED_JAXLIB = ("0.10.",)  # jaxlib versions on which CPU_CONV_FLAG exists and was measured faster
DEFAULT_CACHE_DIR = "~/.cache/kdjax/jax"


def _jaxlib_version() -> str:
    try:
        from jaxlib import version
    except ImportError:  # pragma: no cover - jax always brings jaxlib
        return ""
    return version.__version__


def configure_cpu_convolutions(environ=os.environ) -> bool:
    """Routes XLA:CPU convolutions to Eigen (see the module docstring); True if the flag was added."""
    if environ.get("KDJAX_CPU_CONV", "eigen").lower() != "eigen":
        return False
    flags = environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags:  # the user decided
        return False
    if not _jaxlib_version().startswith(TESTED_JAXLIB):
        return False
    environ["XLA_FLAGS"] = f"{flags} {CPU_CONV_FLAG}".strip()
    return True


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
