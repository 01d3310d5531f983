"""The CPU op as XLA FFI custom calls, so jitted JAX code on the CPU backend can call it.

    attn = jax.jit(jax_paged_decode_attention)(q, k_cache, v_cache, block_tables, context_lens)
    append = jax.jit(jax_append_kv, donate_argnums=(0, 1))
    k_cache, v_cache = append(k_cache, v_cache, k_new, v_new, slot_mapping)  # updated in place

Shapes and dtypes are those of `neo_jax.cpu_ops.ops`. Bad arguments fail at run time with an
INVALID_ARGUMENT error naming them. The targets are registered for the CPU platform only.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from neo_jax.cpu_ops import _C


@functools.cache
def _register_targets() -> None:
    for name, handler in _C.cpu_ffi_targets().items():
        jax.ffi.register_ffi_target(name, handler, platform="cpu")


def jax_paged_decode_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    block_tables: jax.Array,
    context_lens: jax.Array,
    scale: float | None = None,
    isa: str | None = None,
) -> jax.Array:
    """Decode attention [num_reqs, num_q_heads, head_dim] in q's dtype; see ops.paged_decode_attention."""
    _register_targets()
    q = jnp.asarray(q)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.ndim and q.shape[-1] > 0 else 1.0
    call = jax.ffi.ffi_call("neo_paged_decode_attention", jax.ShapeDtypeStruct(q.shape, q.dtype))
    return call(q, k_cache, v_cache, block_tables, context_lens, scale=np.float32(scale), isa=isa or "")


def jax_append_kv(
    k_cache: jax.Array,
    v_cache: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    slot_mapping: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """The caches with row i of k_new / v_new written at slot slot_mapping[i] (-1: skipped).

    The outputs alias the cache inputs, so under jit with the caches donated XLA updates them in
    place; without donation XLA copies the caches first.
    """
    _register_targets()
    k_cache, v_cache = jnp.asarray(k_cache), jnp.asarray(v_cache)
    result_types = (jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype), jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype))
    call = jax.ffi.ffi_call("neo_append_kv", result_types, input_output_aliases={0: 0, 1: 1})
    return call(k_cache, v_cache, k_new, v_new, slot_mapping)
