"""The host KV pool and its custom calls under a tensor-parallel step: each shard serves its own heads.

One `HostKvPool` (neo_jax.kv_cache.allocate_host_kv_pool) holds every kv head of every layer, in a shard-major
layout: pool layer `layer * tp + shard` holds kv heads [shard * Hkv/tp, (shard + 1) * Hkv/tp) of model layer
`layer`, i.e. the pool is [L * tp, N, Hkv/tp, bs, Dh]. The handoff calls take the layer as an operand while the
pool id is a static attribute, so the single traced body of a `shard_map` reaches each shard's heads by passing
its own pool layer; a pool per shard would need a different static pool id per shard, which an SPMD body cannot
say. Every call goes to the one host worker pool, and a shard's calls read and write only its own heads, so
shards never touch the same memory. Blocks keep the ids of the single-device pool: block b of every shard's
layers belongs to the same request. On GPUs each device's calls go through that device's own CUDA handoff
(doorbell and dispatcher thread); the dispatchers take turns on the worker pool.

Every function also takes `mesh=None` (one device): the pool is then the plain [L, N, Hkv, bs, Dh] pool, tokens
are int32[1] and the calls are the plain ones, so a step written against this module runs sharded or not.

    pending = sharded_cpu_attention_start(pool, mesh, q, k_new, v_new, layer, slots, tables, lens)
    (q0,) = computed_after(pending.token, mesh, q0)   # the GPU work starts after the call is handed off
    y0 = gpu_layer(q0)
    out = sharded_cpu_attention_wait(pending, y0, mesh, dep_spec=P())   # [n, Hq, Dh], split over heads

XLA orders instructions by their operands alone, so every order between a call and other work is a data
dependency: an `optimization_barrier` was seen not to keep a start ahead of the work it should precede.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from neo_jax.cpu_ops.handoff import (
    HostKvPool,
    PendingAttention,
    cpu_attention_start,
    cpu_attention_wait,
    host_kv_load,
    host_kv_store,
)
from neo_jax.sharding import HEADS_SPEC, TP_AXIS, shard_over_heads

SHARD_SPEC = P(TP_AXIS)  # one entry per shard: its token, its pool layer


def pool_by_layer(cache: np.ndarray, tensor_parallel_size: int) -> np.ndarray:
    """A shard-major pool cache [L * tp, N, Hkv/tp, bs, Dh] as [L, N, Hkv, bs, Dh] (a copy)."""
    if cache.ndim != 5 or cache.shape[0] % tensor_parallel_size:
        raise ValueError(f"cache: expected [num_layers * {tensor_parallel_size}, num_blocks, kv_heads_per_shard, "
                         f"block_size, head_dim], got shape {cache.shape}")
    num_pool_layers, num_blocks, shard_heads, block_size, head_dim = cache.shape
    by_shard = cache.reshape(num_pool_layers // tensor_parallel_size, tensor_parallel_size, num_blocks,
                             shard_heads, block_size, head_dim)
    return by_shard.transpose(0, 2, 1, 3, 4, 5).reshape(num_pool_layers // tensor_parallel_size, num_blocks,
                                                        tensor_parallel_size * shard_heads, block_size, head_dim)


def num_shards(mesh: Mesh | None) -> int:
    """The tensor-parallel size of `mesh` (1 without one)."""
    return 1 if mesh is None else mesh.shape[TP_AXIS]


def shard_pool_layers(layer, mesh: Mesh | None) -> jax.Array:
    """int32[..., tp]: the pool layer of model `layer` (a number or an array [..., 1]) on each shard."""
    tensor_parallel_size = num_shards(mesh)
    return jnp.asarray(layer, jnp.int32) * tensor_parallel_size + jnp.arange(tensor_parallel_size, dtype=jnp.int32)


def _check_pool(pool: HostKvPool, mesh: Mesh | None, num_kv_heads: int, op: str) -> None:
    tensor_parallel_size = num_shards(mesh)
    if num_kv_heads % tensor_parallel_size or pool.num_kv_heads != num_kv_heads // tensor_parallel_size:
        raise ValueError(f"{op}: {num_kv_heads} kv heads over tp={tensor_parallel_size} need a pool of "
                         f"{num_kv_heads / tensor_parallel_size:g} kv heads per shard, "
                         f"the pool has {pool.num_kv_heads}")


def sharded_cpu_attention_start(pool: HostKvPool, mesh: Mesh | None, q: jax.Array, k_new: jax.Array, v_new: jax.Array,
                                layer, slot_mapping, block_tables, context_lens,
                                dep: jax.Array | None = None) -> PendingAttention:
    """cpu_attention_start on every shard for its heads: q [n, Hq, Dh], k_new / v_new [n, Hkv, Dh] (split over
    heads), `layer` the model layer; `dep` (e.g. a sharded store's int32[tp] tokens) must be computed before.
    The result's token is int32[tp]; pass it only to sharded_cpu_attention_wait."""
    _check_pool(pool, mesh, k_new.shape[1], "sharded_cpu_attention_start")
    pool_layers = shard_pool_layers(layer, mesh)

    dep = jnp.zeros((num_shards(mesh),), jnp.int32) if dep is None else dep

    def start(q, k_new, v_new, pool_layer, slot_mapping, block_tables, context_lens, dep):
        pending = cpu_attention_start(pool, q, k_new, v_new, pool_layer[0], slot_mapping, block_tables,
                                      context_lens, dep[0])
        return pending.token[None]

    in_specs = (HEADS_SPEC, HEADS_SPEC, HEADS_SPEC, SHARD_SPEC, P(), P(), P(), SHARD_SPEC)
    tokens = shard_over_heads(start, mesh, in_specs=in_specs, out_specs=SHARD_SPEC)(
        q, k_new, v_new, pool_layers, slot_mapping, block_tables, context_lens, dep)
    return PendingAttention(tokens, q.shape, q.dtype, pool.pool_id)


def sharded_cpu_attention_wait(pending: PendingAttention, dep: jax.Array, mesh: Mesh | None,
                               dep_spec: P = P()) -> jax.Array:
    """The output [n, Hq, Dh] (split over heads) of a sharded start; `dep` (laid out as `dep_spec` says, so
    that no shard gathers it) must be computed before the wait."""
    num_rows, num_heads, head_dim = pending.out_shape
    shard_shape = (num_rows, num_heads // num_shards(mesh), head_dim)

    def wait(token, dep):
        shard_pending = PendingAttention(token[0], shard_shape, pending.out_dtype, pending.pool_id)
        return cpu_attention_wait(shard_pending, dep)

    return shard_over_heads(wait, mesh, in_specs=(SHARD_SPEC, dep_spec), out_specs=HEADS_SPEC)(pending.token, dep)


def sharded_host_kv_store(pool: HostKvPool, mesh: Mesh | None, k_rows: jax.Array, v_rows: jax.Array, layer,
                          slot_mapping) -> jax.Array:
    """host_kv_store per shard: k_rows / v_rows [m, Hkv, Dh] (split over heads) into model `layer` -> int32[tp]."""
    _check_pool(pool, mesh, k_rows.shape[1], "sharded_host_kv_store")

    def store(k_rows, v_rows, pool_layer, slot_mapping):
        return host_kv_store(pool, k_rows, v_rows, pool_layer[0], slot_mapping)[None]

    return shard_over_heads(store, mesh, in_specs=(HEADS_SPEC, HEADS_SPEC, SHARD_SPEC, P()), out_specs=SHARD_SPEC)(
        k_rows, v_rows, shard_pool_layers(layer, mesh), slot_mapping)


def sharded_host_kv_load(pool: HostKvPool, mesh: Mesh | None, layer, slot_mapping,
                         dep: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """host_kv_load per shard: K and V rows [m, Hkv, Dh] (split over heads) of model `layer`; `dep` (e.g. a
    sharded store's int32[tp] tokens) must be computed before."""
    dep = jnp.zeros((num_shards(mesh),), jnp.int32) if dep is None else dep

    def load(pool_layer, slot_mapping, dep):
        return host_kv_load(pool, pool_layer[0], slot_mapping, dep[0])

    return shard_over_heads(load, mesh, in_specs=(SHARD_SPEC, P(), SHARD_SPEC), out_specs=(HEADS_SPEC, HEADS_SPEC))(
        shard_pool_layers(layer, mesh), slot_mapping, dep)


def computed_after(tokens: jax.Array, mesh: Mesh | None, *arrays: jax.Array,
                   spec: P = HEADS_SPEC) -> tuple[jax.Array, ...]:
    """`arrays` (laid out as `spec` says: split over heads, or P() when replicated) as they are, but computed
    only after the host calls that returned `tokens` (int32[tp]): each shard adds 0 x its token, which XLA
    cannot fold for floats (0 x inf is NaN)."""
    def add_zero(tokens: jax.Array, *arrays: jax.Array) -> tuple[jax.Array, ...]:
        zero = tokens[0].astype(jnp.float32) * 0.0
        return tuple(array + zero.astype(array.dtype) for array in arrays)

    return shard_over_heads(add_zero, mesh, in_specs=(SHARD_SPEC, *[spec] * len(arrays)),
                            out_specs=tuple(spec for _ in arrays))(tokens, *arrays)
