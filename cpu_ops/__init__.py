"""CPU paged decode attention for requests whose KV cache lives in host memory."""

from neo_jax.cpu_ops._C import cpu_isa

__all__ = ["cpu_isa"]
