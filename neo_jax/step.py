"""One engine step as a pure function: embed, the layers (a Python loop, see models/llama.py), final logits,
sampling.

Per layer the step calls the model's `pre_attention`, writes the new K/V into the cache, runs attention
(paged decode for the decode rows, gathered-context prefill attention for the prefill tokens) and calls
`post_attention`. The cache is viewed with one block axis for all layers (see attention.py), so the scatter of
new K/V updates the donated buffer in place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from neo_jax.attention import decode_attention, prefill_attention, write_kv
from neo_jax.batch import StepBatch
from neo_jax.kv_cache import KVCache
from neo_jax.models import llama
from neo_jax.models.config import ModelConfig
from neo_jax.sampler import SamplingBatch, sample
from neo_jax.sharding import HEADS_SPEC, KV_BLOCKS_SPEC, shard_over_heads


def layer_attention(q: jax.Array, k_blocks: jax.Array, v_blocks: jax.Array, batch: StepBatch,
                    block_offset: jax.Array) -> jax.Array:
    """Attention of all the step's tokens q [T, Hq, Dh] (decode rows first) -> [T, Hq, Dh]."""
    num_decodes = batch.num_decodes
    parts = []
    if num_decodes:
        parts.append(decode_attention(q[:num_decodes], k_blocks, v_blocks, batch, block_offset))
    if q.shape[0] > num_decodes:
        parts.append(prefill_attention(q[num_decodes:], k_blocks, v_blocks, batch, block_offset))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def write_and_attend(q: jax.Array, k: jax.Array, v: jax.Array, k_blocks: jax.Array, v_blocks: jax.Array,
                     batch: StepBatch, block_offset: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Stores the step's new k, v [T, Hkv, Dh] in the cache and attends q [T, Hq, Dh] -> (out, k_blocks, v_blocks)."""
    k_blocks, v_blocks = write_kv(k_blocks, v_blocks, k, v, batch.slot_mapping, block_offset)
    return layer_attention(q, k_blocks, v_blocks, batch, block_offset), k_blocks, v_blocks


def model_step(params: llama.Params, kv_cache: KVCache, batch: StepBatch, sampling: SamplingBatch,
               config: ModelConfig, mesh: Mesh | None = None) -> tuple[KVCache, jax.Array, jax.Array]:
    """Runs the batch through the model, updating the cache; the cache, tokens int32[R], logits float32[R, V].

    With a tensor-parallel `mesh` the params and cache arrive sharded (neo_jax.sharding) and the attention runs
    per shard on its heads; XLA partitions the rest.
    """
    num_layers, num_blocks = kv_cache.k.shape[:2]
    cache_shape = kv_cache.k.shape
    k_blocks = kv_cache.k.reshape(num_layers * num_blocks, *cache_shape[2:])
    v_blocks = kv_cache.v.reshape(num_layers * num_blocks, *cache_shape[2:])
    hidden = llama.embed_tokens(params, config, batch.token_ids)
    attend = shard_over_heads(write_and_attend, mesh,
                              in_specs=(HEADS_SPEC, HEADS_SPEC, HEADS_SPEC, KV_BLOCKS_SPEC, KV_BLOCKS_SPEC, P(), P()),
                              out_specs=(HEADS_SPEC, KV_BLOCKS_SPEC, KV_BLOCKS_SPEC))

    for layer_index, layer_params in enumerate(params["layers"]):
        block_offset = jnp.int32(layer_index * num_blocks)
        q, k, v = llama.pre_attention(layer_params, config, hidden, batch.positions)
        attn, k_blocks, v_blocks = attend(q, k, v, k_blocks, v_blocks, batch, block_offset)
        hidden = llama.post_attention(layer_params, config, hidden, attn)
    logits = llama.final_logits(params, config, hidden[batch.sample_indices])
    tokens = sample(logits, sampling)
    return KVCache(k=k_blocks.reshape(cache_shape), v=v_blocks.reshape(cache_shape)), tokens, logits
