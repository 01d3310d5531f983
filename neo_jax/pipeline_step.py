"""One step of NEO's asymmetric CPU-GPU pipeline as a single jitted function.

Two micro-batches go through the layers together. Batch-0 holds the GPU-resident decodes, the prefills and a
share of host-resident decodes; batch-1 holds host-resident decodes only. Host-resident attention runs in the
C++ worker pool through the start/wait custom calls of `neo_jax.cpu_ops.handoff`; on a GPU the CPU computes
while XLA's stream runs the GPU work placed between a start and its wait. Per layer l:

    GPU                                              CPU (worker pool, in call order)
    batch-0 QKV(l)                                   batch-1 attention(l)   (started in layer l-1)
    start batch-0's CPU share(l)
    batch-0 KV writes + GPU attention(l)             batch-1 attention(l), then batch-0 share(l)
    wait batch-1(l); batch-1 out-proj+MLP(l), QKV(l+1)  batch-0 share(l)
    start batch-1(l+1); wait batch-0 share(l)
    batch-0 out-proj+MLP(l)                          batch-1 attention(l+1)

so the CPU's batch-1 attention hides under batch-0's linear layers and GPU attention, and batch-0's share
under batch-1's linear layers. Batch-1's QKV runs one layer ahead (its layer-0 QKV before the loop). The layers
are a Python loop (see models/llama.py), so every layer index is static. The order is forced by data: each wait takes the GPU result it must follow as `dep`, and `optimization_barrier` ties the
tokens of started calls to the inputs of the GPU work that must come after them.

Prefills whose KV goes to the host pool write it there layer by layer (`host_kv_store`) and attend on the GPU
over context read back from the host (`host_kv_load`). Swaps between the pools run before the layers, one
store or load per layer, so a request swapped this step already attends from its new pool.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from neo_jax.attention import attend_context, decode_attention, read_slots, write_kv
from neo_jax.cpu_ops.handoff import (HostKvPool, PendingAttention, cpu_attention_start, cpu_attention_wait,
                                     host_kv_load, host_kv_store)
from neo_jax.kv_cache import KVCache
from neo_jax.models import llama
from neo_jax.models.config import ModelConfig
from neo_jax.pipeline_batch import NO_HOST_SLOT, CpuDecodes, PipelineBatch
from neo_jax.sampler import SamplingBatch, sample


def swap_kv(pool: HostKvPool, k_blocks: jax.Array, v_blocks: jax.Array, batch: PipelineBatch,
            num_blocks: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Copies the step's swap-outs (GPU -> host) and swap-ins (host -> GPU) of every layer.

    Returns the caches and a token that follows every store (the loads are followed by the caches)."""
    num_layers = k_blocks.shape[0] // num_blocks

    def layer(carry: tuple[jax.Array, jax.Array, jax.Array], layer_index: jax.Array):
        k_blocks, v_blocks, done = carry
        block_offset = layer_index * num_blocks
        if batch.swap_out_gpu_slots.shape[0]:
            k_rows, v_rows = read_slots(k_blocks, v_blocks, batch.swap_out_gpu_slots, block_offset)
            done = done + host_kv_store(pool, k_rows, v_rows, layer_index, batch.swap_out_host_slots)
        if batch.swap_in_host_slots.shape[0]:
            k_rows, v_rows = host_kv_load(pool, layer_index, batch.swap_in_host_slots, dep=done)
            k_blocks, v_blocks = write_kv(k_blocks, v_blocks, k_rows, v_rows, batch.swap_in_gpu_slots, block_offset)
        return (k_blocks, v_blocks, done), None

    (k_blocks, v_blocks, done), _ = jax.lax.scan(
        layer, (k_blocks, v_blocks, jnp.zeros((), jnp.int32)), jnp.arange(num_layers, dtype=jnp.int32))
    return k_blocks, v_blocks, done


def start_cpu_attention(pool: HostKvPool, q: jax.Array, k: jax.Array, v: jax.Array, layer_index: int,
                        rows: CpuDecodes) -> PendingAttention:
    """Appends the rows' new K/V to the host pool and starts their attention."""
    return cpu_attention_start(pool, q, k.astype(pool.dtype), v.astype(pool.dtype), layer_index, rows.slot_mapping,
                               rows.block_tables, rows.context_lens)


def batch0_gpu_attention(pool: HostKvPool, q: jax.Array, k: jax.Array, v: jax.Array, k_blocks: jax.Array,
                         v_blocks: jax.Array, batch: PipelineBatch, layer_index: int,
                         block_offset: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Batch-0's GPU rows q/k/v [B + P, ...]: KV writes to both pools, paged decode and prefill attention."""
    gpu = batch.gpu
    num_decodes = gpu.num_decodes
    k_blocks, v_blocks = write_kv(k_blocks, v_blocks, k, v, gpu.slot_mapping, block_offset)
    parts = []
    if num_decodes:
        parts.append(decode_attention(q[:num_decodes], k_blocks, v_blocks, gpu, block_offset))
    if q.shape[0] > num_decodes:
        k_context, v_context = read_slots(k_blocks, v_blocks, gpu.context_slots, block_offset)
        if batch.has_host_prefills:
            stored = host_kv_store(pool, k[num_decodes:].astype(pool.dtype), v[num_decodes:].astype(pool.dtype),
                                   layer_index, batch.host_prefill_slots)
            k_host, v_host = host_kv_load(pool, layer_index, batch.host_context_slots, dep=stored)
            on_host = (batch.host_context_slots != NO_HOST_SLOT)[:, None, None]
            k_context = jnp.where(on_host, k_host.astype(k_context.dtype), k_context)
            v_context = jnp.where(on_host, v_host.astype(v_context.dtype), v_context)
        parts.append(attend_context(q[num_decodes:], k_context, v_context, gpu))
    return k_blocks, v_blocks, parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def pipeline_step(params: llama.Params, kv_cache: KVCache, batch: PipelineBatch, sampling: SamplingBatch,
                  config: ModelConfig, pool: HostKvPool) -> tuple[KVCache, jax.Array, jax.Array]:
    """Runs both micro-batches through the model; the updated GPU cache, tokens int32[R], logits float32[R, V]."""
    num_layers, num_blocks = kv_cache.k.shape[:2]
    cache_shape = kv_cache.k.shape
    k_blocks = kv_cache.k.reshape(num_layers * num_blocks, *cache_shape[2:])
    v_blocks = kv_cache.v.reshape(num_layers * num_blocks, *cache_shape[2:])
    gpu, share, batch1 = batch.gpu, batch.batch0_cpu, batch.batch1_cpu
    num_gpu_rows, has_share, has_batch1 = gpu.token_ids.shape[0], share.num_rows > 0, batch1.num_rows > 0
    has_batch0 = num_gpu_rows > 0 or has_share
    hidden0 = llama.embed_tokens(params, config, jnp.concatenate([gpu.token_ids, share.token_ids]))
    positions0 = jnp.concatenate([gpu.positions, share.positions])
    hidden1 = llama.embed_tokens(params, config, batch1.token_ids)
    k_blocks, v_blocks, swapped = swap_kv(pool, k_blocks, v_blocks, batch, num_blocks)
    _, k_blocks, v_blocks, hidden0, hidden1 = jax.lax.optimization_barrier(
        (swapped, k_blocks, v_blocks, hidden0, hidden1))

    def start_batch1(hidden1: jax.Array, layer_index: int) -> PendingAttention:
        q, k, v = llama.pre_attention(params["layers"][layer_index], config, hidden1, batch1.positions)
        return start_cpu_attention(pool, q, k, v, layer_index, batch1)

    pending1 = start_batch1(hidden1, 0) if has_batch1 else None
    for layer_index, layer_params in enumerate(params["layers"]):
        block_offset = jnp.int32(layer_index * num_blocks)
        starts_next = has_batch1 and layer_index + 1 < num_layers
        if not has_batch0:
            hidden1 = llama.post_attention(layer_params, config, hidden1, cpu_attention_wait(pending1, hidden1))
            pending1 = start_batch1(hidden1, layer_index + 1) if starts_next else None
            continue
        q, k, v = llama.pre_attention(layer_params, config, hidden0, positions0)
        gpu_done = q
        if has_share:
            pending0 = start_cpu_attention(pool, q[num_gpu_rows:], k[num_gpu_rows:], v[num_gpu_rows:],
                                           layer_index, share)
            gpu_done, q, k, v = jax.lax.optimization_barrier((pending0.token, q, k, v))
        attn0 = jnp.zeros((0, *q.shape[1:]), q.dtype)
        if num_gpu_rows:
            k_blocks, v_blocks, attn0 = batch0_gpu_attention(pool, q[:num_gpu_rows], k[:num_gpu_rows],
                                                             v[:num_gpu_rows], k_blocks, v_blocks, batch,
                                                             layer_index, block_offset)
            gpu_done = attn0
        if has_batch1:
            hidden1 = llama.post_attention(layer_params, config, hidden1, cpu_attention_wait(pending1, gpu_done))
            gpu_done = hidden1
            if starts_next:
                pending1 = start_batch1(hidden1, layer_index + 1)
                gpu_done = pending1.token
        if has_share:
            attn0 = jnp.concatenate([attn0, cpu_attention_wait(pending0, gpu_done)])
        hidden0 = llama.post_attention(layer_params, config, hidden0, attn0)
    sample_rows = jnp.concatenate([gpu.sample_indices, num_gpu_rows + jnp.arange(share.num_rows, dtype=jnp.int32)])
    final_hidden = jnp.concatenate([hidden0[sample_rows], hidden1])
    logits = llama.final_logits(params, config, final_hidden)
    tokens = sample(logits, sampling)
    return KVCache(k=k_blocks.reshape(cache_shape), v=v_blocks.reshape(cache_shape)), tokens, logits
