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
are a Python loop (see models/llama.py), so every layer index is static. The order is forced by data: each wait
takes the GPU result it must follow as `dep`, and the GPU work that must follow a start reads its token
(`computed_after`). XLA orders instructions by their operands alone: an `optimization_barrier` did not keep a
start ahead of the GPU work (the scheduler was free to delay it, and with it the overlap).

Under tensor parallelism (a `mesh`) every host call and GPU attention runs per shard on its heads through
`neo_jax.sharded_host_attention`; without one the same code runs on one device.

Prefills whose KV goes to the host pool write it there layer by layer (`host_kv_store`) and attend on the GPU
over their chunk's own K/V and the earlier chunks' context, read back from the host (`host_kv_load`). Swaps
between the pools run before the layers, one store or load per layer, so a request swapped this step already
attends from its new pool: every CPU attention and host prefill takes the swaps' token (a swapped-in request's
host blocks may already hold this step's new rows of another request), and the GPU reads swapped-in rows
through the cache they wrote.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from neo_jax.attention import attend_context, decode_attention, read_slots, write_kv
from neo_jax.cpu_ops.handoff import (HANDOFF_DEVICE_STAGING_BYTES, HostKvPool, PendingAttention, host_kv_load,
                                     host_kv_store, token_after)
from neo_jax.kv_cache import KVCache
from neo_jax.models import llama
from neo_jax.models.config import ModelConfig
from neo_jax.pipeline_batch import NO_HOST_SLOT, CpuDecodes, PipelineBatch
from neo_jax.sampler import SamplingBatch, sample
from neo_jax.sharded_host_attention import (SHARD_SPEC, computed_after, shard_pool_layers,
                                            sharded_cpu_attention_start, sharded_cpu_attention_wait)
from neo_jax.sharding import HEADS_SPEC, KV_BLOCKS_SPEC, TP_AXIS, shard_over_heads

# What must be computed before a wait, with its layout over the tensor-parallel mesh.
Dependency = tuple[jax.Array, P]
SWAP_LOAD_BYTES = 256 << 20  # staging of one swap-in load at most (pinned memory)
# A swap-out store fits the device staging of the CUDA handoff, so that XLA's stream goes on while its rows are
# copied to the host.
SWAP_STORE_BYTES = HANDOFF_DEVICE_STAGING_BYTES


def swap_calls(total_rows: int, row_bytes: int, staging_bytes: int) -> list[slice]:
    """Pieces of `total_rows` rows (K and V, `row_bytes` each, with an int32 layer and slot) whose four operands,
    each 256-byte aligned as the handoff stages them, fit `staging_bytes` (at least one row per piece)."""
    per_call = max(1, (staging_bytes - 4 * 256) // (row_bytes + 8))
    return [slice(first, min(first + per_call, total_rows)) for first in range(0, total_rows, per_call)]


def swap_kv(pool: HostKvPool, k_blocks: jax.Array, v_blocks: jax.Array, batch: PipelineBatch,
            pool_layers: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Copies the step's swap-outs (GPU -> host) and swap-ins (host -> GPU) of every layer, many layers' rows per call
    (each load is a host round trip; with one per layer, swap steps of llama-3-8b took 35 ms on the H200 against
    9 ms for its GPU-only steps): stores of up to SWAP_STORE_BYTES, which XLA's stream does not wait for (its
    larger stores waited for their copy to the host, 3.5 ms per 134 MB request), loads of up to SWAP_LOAD_BYTES.
    Per shard, with pool_layers int32[L, 1] the shard's pool layer of each model layer.

    Returns the caches and a token int32[1] that follows every store and load: the step's other host-pool writes
    take it, since a swap-in's host blocks are free for them once the step is planned."""
    num_layers = pool_layers.shape[0]
    num_blocks = k_blocks.shape[0] // num_layers
    row_bytes = 2 * k_blocks.shape[1] * k_blocks.shape[3] * k_blocks.dtype.itemsize  # K and V of one slot

    def every_layer(gpu_slots: jax.Array, host_slots: jax.Array) -> tuple[jax.Array, ...]:
        """[m] slots -> [L * m] layer-major rows: GPU slots, their layers' block offsets, host slots, pool layers."""
        rows, layers = gpu_slots.shape[0], jnp.arange(num_layers, dtype=jnp.int32)
        return (jnp.tile(gpu_slots, num_layers), jnp.repeat(layers * num_blocks, rows),
                jnp.tile(host_slots, num_layers), jnp.repeat(pool_layers[:, 0], rows))

    def calls(gpu_slots: jax.Array, host_slots: jax.Array, staging_bytes: int) -> list[tuple[jax.Array, ...]]:
        rows = every_layer(gpu_slots, host_slots)
        return [tuple(index[piece] for index in rows) for piece in swap_calls(rows[0].shape[0], row_bytes,
                                                                                staging_bytes)]

    done = jnp.zeros((), jnp.int32)
    for gpu_slots, block_offsets, host_slots, pool_layer in calls(batch.swap_out_gpu_slots,
                                                                  batch.swap_out_host_slots, SWAP_STORE_BYTES):
        k_rows, v_rows = read_slots(k_blocks, v_blocks, gpu_slots, block_offsets)
        done = done + host_kv_store(pool, k_rows, v_rows, pool_layer, host_slots)
    for gpu_slots, block_offsets, host_slots, pool_layer in calls(batch.swap_in_gpu_slots,
                                                                  batch.swap_in_host_slots, SWAP_LOAD_BYTES):
        k_rows, v_rows = host_kv_load(pool, pool_layer, host_slots, dep=done)
        done = done + token_after(k_rows)
        k_blocks, v_blocks = write_kv(k_blocks, v_blocks, k_rows, v_rows, gpu_slots, block_offsets)
    return k_blocks, v_blocks, done[None]


def start_cpu_attention(pool: HostKvPool, mesh: Mesh | None, q: jax.Array, k: jax.Array, v: jax.Array,
                        layer_index: int, rows: CpuDecodes, swapped: jax.Array) -> PendingAttention:
    """Appends the rows' new K/V to the host pool and starts their attention (each shard on its heads), after
    the step's swaps (their int32[tp] tokens `swapped`) have written the host pool."""
    return sharded_cpu_attention_start(pool, mesh, q, k.astype(pool.dtype), v.astype(pool.dtype), layer_index,
                                       rows.slot_mapping, rows.block_tables, rows.context_lens, dep=swapped)


def wait_cpu_attention(pending: PendingAttention, dependency: Dependency, mesh: Mesh | None) -> jax.Array:
    dep, dep_spec = dependency
    return sharded_cpu_attention_wait(pending, dep, mesh, dep_spec)


def batch0_gpu_attention(pool: HostKvPool, q: jax.Array, k: jax.Array, v: jax.Array, k_blocks: jax.Array,
                         v_blocks: jax.Array, batch: PipelineBatch, pool_layer: jax.Array,
                         block_offset: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Batch-0's GPU rows q/k/v [B + P, ...]: KV writes to both pools, paged decode and prefill attention; per
    shard, with pool_layer int32[1] the shard's pool layer. Returns the caches, the output and a token int32[1]
    of the host prefills' stores (0 without any), which an output of the step must read to keep them."""
    gpu = batch.gpu
    num_decodes = gpu.num_decodes
    k_blocks, v_blocks = write_kv(k_blocks, v_blocks, k, v, gpu.slot_mapping, block_offset)
    parts, stored = [], jnp.zeros((), jnp.int32)
    if num_decodes:
        parts.append(decode_attention(q[:num_decodes], k_blocks, v_blocks, gpu, block_offset))
    if q.shape[0] > num_decodes:
        k_context, v_context = read_slots(k_blocks, v_blocks, gpu.context_slots, block_offset)
        if batch.has_host_prefills:
            k_context, v_context, stored = host_prefill_context(pool, k[num_decodes:], v[num_decodes:], k_context,
                                                                v_context, batch, pool_layer[0])
        parts.append(attend_context(q[num_decodes:], k_context, v_context, gpu))
    return k_blocks, v_blocks, parts[0] if len(parts) == 1 else jnp.concatenate(parts), stored[None]


def host_prefill_context(pool: HostKvPool, k: jax.Array, v: jax.Array, k_context: jax.Array, v_context: jax.Array,
                         batch: PipelineBatch, pool_layer: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Stores the host prefills' new rows k/v [P, Hkv, Dh] in the pool and puts their context into k/v_context
    [S, Hkv, Dh]: the chunk's own rows from k/v, an earlier chunk's read back from the pool. Also returns the
    stores' token."""
    stored = host_kv_store(pool, k.astype(pool.dtype), v.astype(pool.dtype), pool_layer, batch.host_prefill_slots)
    rows = batch.host_chunk_rows
    in_chunk = (rows >= 0)[:, None, None]
    k_context = jnp.where(in_chunk, k[jnp.maximum(rows, 0)].astype(k_context.dtype), k_context)
    v_context = jnp.where(in_chunk, v[jnp.maximum(rows, 0)].astype(v_context.dtype), v_context)
    if batch.host_context_slots.shape[0]:
        k_host, v_host = host_kv_load(pool, pool_layer, batch.host_context_slots, dep=stored)
        on_host = (batch.host_context_slots != NO_HOST_SLOT)[:, None, None]
        k_context = jnp.where(on_host, k_host.astype(k_context.dtype), k_context)
        v_context = jnp.where(on_host, v_host.astype(v_context.dtype), v_context)
    return k_context, v_context, stored


def pipeline_step(params: llama.Params, kv_cache: KVCache, batch: PipelineBatch, sampling: SamplingBatch,
                  config: ModelConfig, pool: HostKvPool,
                  mesh: Mesh | None = None) -> tuple[KVCache, jax.Array, jax.Array]:
    """Runs both micro-batches through the model; the updated GPU cache, tokens int32[R], logits float32[R, V].

    With a tensor-parallel `mesh` the params and GPU cache arrive sharded (neo_jax.sharding), the host pool is
    shard-major (neo_jax.sharded_host_attention), and every attention and host call runs per shard on its heads.
    """
    num_layers, num_blocks = kv_cache.k.shape[:2]
    cache_shape = kv_cache.k.shape
    k_blocks = kv_cache.k.reshape(num_layers * num_blocks, *cache_shape[2:])
    v_blocks = kv_cache.v.reshape(num_layers * num_blocks, *cache_shape[2:])
    pool_layers = shard_pool_layers(jnp.arange(num_layers, dtype=jnp.int32)[:, None], mesh)  # [L, tp]
    gpu, share, batch1 = batch.gpu, batch.batch0_cpu, batch.batch1_cpu
    num_gpu_rows, has_share, has_batch1 = gpu.token_ids.shape[0], share.num_rows > 0, batch1.num_rows > 0
    has_swaps = batch.swap_out_gpu_slots.shape[0] + batch.swap_in_host_slots.shape[0] > 0
    has_batch0 = num_gpu_rows > 0 or has_share
    hidden0 = llama.embed_tokens(params, config, jnp.concatenate([gpu.token_ids, share.token_ids]))
    positions0 = jnp.concatenate([gpu.positions, share.positions])
    hidden1 = llama.embed_tokens(params, config, batch1.token_ids)
    swap = shard_over_heads(lambda *args: swap_kv(pool, *args), mesh,
                            in_specs=(KV_BLOCKS_SPEC, KV_BLOCKS_SPEC, P(), P(None, TP_AXIS)),
                            out_specs=(KV_BLOCKS_SPEC, KV_BLOCKS_SPEC, SHARD_SPEC))
    k_blocks, v_blocks, swapped = swap(k_blocks, v_blocks, batch, pool_layers)
    host_stores = jnp.zeros_like(swapped)  # int32[tp], the host prefills' stores
    gpu_attention = shard_over_heads(
        lambda *args: batch0_gpu_attention(pool, *args), mesh,
        in_specs=(HEADS_SPEC, HEADS_SPEC, HEADS_SPEC, KV_BLOCKS_SPEC, KV_BLOCKS_SPEC, P(), SHARD_SPEC, P()),
        out_specs=(KV_BLOCKS_SPEC, KV_BLOCKS_SPEC, HEADS_SPEC, SHARD_SPEC))

    def start_batch1(hidden1: jax.Array, layer_index: int) -> PendingAttention:
        q, k, v = llama.pre_attention(params["layers"][layer_index], config, hidden1, batch1.positions)
        return start_cpu_attention(pool, mesh, q, k, v, layer_index, batch1, swapped)

    pending1 = start_batch1(hidden1, 0) if has_batch1 else None
    if has_batch1 and has_batch0:  # batch-0's layer-0 GPU work overlaps batch-1's layer-0 attention
        (hidden0,) = computed_after(pending1.token, mesh, hidden0, spec=P())
    for layer_index, layer_params in enumerate(params["layers"]):
        block_offset = jnp.int32(layer_index * num_blocks)
        starts_next = has_batch1 and layer_index + 1 < num_layers
        if not has_batch0:
            attn1 = wait_cpu_attention(pending1, (hidden1, P()), mesh)
            hidden1 = llama.post_attention(layer_params, config, hidden1, attn1)
            pending1 = start_batch1(hidden1, layer_index + 1) if starts_next else None
            continue
        q, k, v = llama.pre_attention(layer_params, config, hidden0, positions0)
        if batch.has_host_prefills and has_swaps:  # the prefills' stores after the swaps
            k, v = computed_after(swapped, mesh, k, v)
        gpu_done: Dependency = (q, HEADS_SPEC)
        if has_share:
            pending0 = start_cpu_attention(pool, mesh, q[num_gpu_rows:], k[num_gpu_rows:], v[num_gpu_rows:],
                                           layer_index, share, swapped)
            q, k, v = computed_after(pending0.token, mesh, q, k, v)
            gpu_done = (pending0.token, SHARD_SPEC)
        attn0 = jnp.zeros((0, *q.shape[1:]), q.dtype)
        if num_gpu_rows:
            k_blocks, v_blocks, attn0, stored = gpu_attention(q[:num_gpu_rows], k[:num_gpu_rows], v[:num_gpu_rows],
                                                              k_blocks, v_blocks, batch, pool_layers[layer_index],
                                                              block_offset)
            host_stores = host_stores + stored
            gpu_done = (attn0, HEADS_SPEC)
        if has_batch1:
            hidden1 = llama.post_attention(layer_params, config, hidden1, wait_cpu_attention(pending1, gpu_done, mesh))
            gpu_done = (hidden1, P())
            if starts_next:
                pending1 = start_batch1(hidden1, layer_index + 1)
                gpu_done = (pending1.token, SHARD_SPEC)
                # batch-0's out-projection, MLP and next QKV overlap batch-1's next attention
                (attn0,) = computed_after(pending1.token, mesh, attn0)
        if has_share:
            attn0 = jnp.concatenate([attn0, wait_cpu_attention(pending0, gpu_done, mesh)])
        hidden0 = llama.post_attention(layer_params, config, hidden0, attn0)
    sample_rows = jnp.concatenate([gpu.sample_indices, num_gpu_rows + jnp.arange(share.num_rows, dtype=jnp.int32)])
    final_hidden = jnp.concatenate([hidden0[sample_rows], hidden1])
    logits = llama.final_logits(params, config, final_hidden)
    if batch.swap_out_gpu_slots.shape[0] or batch.has_host_prefills:  # stores are pure: an output reads them
        (logits,) = computed_after(swapped + host_stores, mesh, logits, spec=P())
    tokens = sample(logits, sampling)
    return KVCache(k=k_blocks.reshape(cache_shape), v=v_blocks.reshape(cache_shape)), tokens, logits
