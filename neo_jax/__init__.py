"""neo-jax: LLM inference in JAX with NEO's CPU offloading of decode attention."""

__version__ = "0.1.0"
