"""Paged decode attention: one query token per request over a paged KV cache.

Layouts (the host pool's too, so that swaps are block copies):
  q             [B, Hq, D]                  out [B, Hq, D] in q's dtype
  k/v cache     [num_blocks, Hkv, block_size, D]
  block_tables  int32 [B, max_blocks]       context_lens int32 [B] (0 = padding row, output zeros)
GQA of any ratio, softmax in fp32, scale 1/sqrt(D) unless given.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def paged_decode_attention_reference(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                                     block_tables: jax.Array, context_lens: jax.Array,
                                     scale: float | None = None) -> jax.Array:
    """Gathers each request's blocks and attends in plain JAX: the oracle and the path off the GPU."""
    batch, num_heads, head_dim = q.shape
    _, num_kv_heads, block_size, _ = k_cache.shape
    max_len = block_tables.shape[1] * block_size
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale

    def gather(cache: jax.Array) -> jax.Array:  # [B, Hkv, max_len, D]
        blocks = cache[block_tables].transpose(0, 2, 1, 3, 4)
        return blocks.reshape(batch, num_kv_heads, max_len, head_dim)

    grouped = q.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = jnp.einsum("bhgd,bhtd->bhgt", grouped, gather(k_cache).astype(q.dtype),
                        preferred_element_type=jnp.float32) * scale
    valid = (jnp.arange(max_len)[None, :] < context_lens[:, None])[:, None, None, :]
    scores = jnp.where(valid, scores, -jnp.inf)
    weights = jnp.where(valid, jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True)), 0.0)
    weights = weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1e-30)
    out = jnp.einsum("bhgt,bhtd->bhgd", weights, gather(v_cache).astype(jnp.float32))
    return out.reshape(batch, num_heads, head_dim).astype(q.dtype)


def paged_decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, block_tables: jax.Array,
                           context_lens: jax.Array, scale: float | None = None) -> jax.Array:
    """The fastest implementation for the arrays' platform; the reference where no kernel is built."""
    return paged_decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens, scale)
