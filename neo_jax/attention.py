"""Attention of one layer against the paged GPU cache: KV writes, paged decode, prefill over gathered context.

The step reshapes the stacked cache [L, N, Hkv, bs, Dh] to one block axis [L * N, Hkv, bs, Dh] (free), so
layer l's block b is row `l * N + b`: the kernels and gathers address any layer by offsetting block ids, and
no layer's slice of the cache is ever copied out of the loop-carried buffer.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from neo_jax.batch import StepBatch
from neo_jax.block_manager import SCRATCH_BLOCK
from neo_jax.kernels.paged_attention import paged_decode_attention
from neo_jax.kv_cache import ATTENTION_SCORES_BYTES

# Finite, so that a padded query whose keys are all masked averages harmlessly instead of producing NaN.
MASKED_SCORE = -1e30


def write_kv(k_blocks: jax.Array, v_blocks: jax.Array, k: jax.Array, v: jax.Array, slot_mapping: jax.Array,
             block_offset: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Stores k, v [T, Hkv, Dh] at their slots of the layer whose blocks start at block_offset (int32 [], or [T]);
    the caches are [L * N, Hkv, bs, Dh].

    Rows bound for the scratch block (padding, and prefill tokens whose KV goes to the host pool) are dropped:
    aimed past the cache, the scatter skips them. Written, they all hit one slot, and on the H200 a 2048-token
    host prefill's 2048 writes to one slot took 40 ms per layer."""
    block_size = k_blocks.shape[2]
    blocks = jnp.where(slot_mapping // block_size == SCRATCH_BLOCK, k_blocks.shape[0],
                       slot_mapping // block_size + block_offset)
    offsets = slot_mapping % block_size
    k_blocks = k_blocks.at[blocks, :, offsets, :].set(k.astype(k_blocks.dtype), mode="drop")
    v_blocks = v_blocks.at[blocks, :, offsets, :].set(v.astype(v_blocks.dtype), mode="drop")
    return k_blocks, v_blocks


def decode_attention(q: jax.Array, k_blocks: jax.Array, v_blocks: jax.Array, batch: StepBatch,
                     block_offset: jax.Array) -> jax.Array:
    """Decode rows q [B, Hq, Dh] through their block tables -> [B, Hq, Dh]."""
    return paged_decode_attention(q, k_blocks, v_blocks, batch.decode_block_tables + block_offset,
                                  batch.decode_context_lens)


def prefill_attention(q: jax.Array, k_blocks: jax.Array, v_blocks: jax.Array, batch: StepBatch,
                      block_offset: jax.Array) -> jax.Array:
    """Prefill tokens q [P, Hq, Dh], causal over their request's cached prefix and chunk -> [P, Hq, Dh].

    The context of all the step's prefills is gathered once [S, Hkv, Dh]; a query sees the entries of its own
    request at positions up to its own. Queries go in tiles that keep the fp32 scores under
    ATTENTION_SCORES_BYTES.
    """
    k_context, v_context = read_slots(k_blocks, v_blocks, batch.context_slots, block_offset)
    return attend_context(q, k_context, v_context, batch)


def read_slots(k_blocks: jax.Array, v_blocks: jax.Array, slots: jax.Array,
               block_offset: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The K and V rows [S, Hkv, Dh] at slots int32[S] of the layer whose blocks start at block_offset (int32 [],
    or [S]: each row's own layer); the caches are [L * N, Hkv, bs, Dh]."""
    block_size = k_blocks.shape[2]
    blocks = slots // block_size + block_offset
    offsets = slots % block_size
    return k_blocks[blocks, :, offsets, :], v_blocks[blocks, :, offsets, :]


def attend_context(q: jax.Array, k_context: jax.Array, v_context: jax.Array, batch: StepBatch) -> jax.Array:
    """Prefill tokens q [P, Hq, Dh] over the step's gathered context k/v [S, Hkv, Dh] -> [P, Hq, Dh]."""
    query_positions = batch.positions[batch.num_decodes:]
    num_queries, num_heads, head_dim = q.shape
    tile = num_queries
    while tile % 2 == 0 and tile * num_heads * k_context.shape[0] * 4 > ATTENTION_SCORES_BYTES:
        tile //= 2

    def attend(tile_inputs: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        q_tile, request_ids, positions = tile_inputs
        mask = ((request_ids[:, None] == batch.context_request_ids[None, :])
                & (batch.context_positions[None, :] <= positions[:, None]))
        return _masked_attention(q_tile, k_context, v_context, mask)

    tiles = (q.reshape(-1, tile, num_heads, head_dim), batch.prefill_request_ids.reshape(-1, tile),
             query_positions.reshape(-1, tile))
    return jax.lax.map(attend, tiles).reshape(q.shape)


def _masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q [Q, Hq, Dh], k/v [S, Hkv, Dh], mask bool[Q, S] -> [Q, Hq, Dh], softmax in fp32."""
    num_queries, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    grouped = q.reshape(num_queries, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = jnp.einsum("qhgd,shd->hgqs", grouped, k.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = jnp.where(mask, scores / math.sqrt(head_dim), MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("hgqs,shd->qhgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(q.shape).astype(q.dtype)
