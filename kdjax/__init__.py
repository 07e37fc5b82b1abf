"""kdjax: knowledge distillation in JAX."""

from kdjax import runtime as _runtime

_runtime.configure_xla_cpu()  # before any JAX backend starts; see kdjax.runtime

__version__ = "0.1.0"
