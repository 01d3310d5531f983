"""CPU paged decode attention for requests whose KV cache lives in host memory.

NumPy calls (`paged_decode_attention`, `append_kv`) work on arrays in place; `jax_*` versions are
XLA FFI custom calls for jitted code on JAX's CPU backend.
"""

from neo_jax.cpu_ops.jax_ops import jax_append_kv, jax_paged_decode_attention
from neo_jax.cpu_ops.ops import (
    append_kv,
    available_isas,
    chunk_tokens,
    cpu_isa,
    num_threads,
    paged_decode_attention,
    physical_cores,
    read_bandwidth_probe,
    set_num_threads,
)

__all__ = [
    "append_kv",
    "available_isas",
    "chunk_tokens",
    "cpu_isa",
    "jax_append_kv",
    "jax_paged_decode_attention",
    "num_threads",
    "paged_decode_attention",
    "physical_cores",
    "read_bandwidth_probe",
    "set_num_threads",
]
