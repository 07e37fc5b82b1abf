"""kdjax: knowledge distillation in JAX."""

from kdjax import runtime as _runtime

_runtime.configure_cpu_convolutions()  # before any JAX backend starts; see kdjax.runtime

__version__ = "0.1.0"
