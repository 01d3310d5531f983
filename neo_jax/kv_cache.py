"""The paged KV cache arrays of the two pools (GPU memory, host memory) and how many blocks each holds."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from neo_jax.block_manager import blocks_for
from neo_jax.config import EngineConfig
from neo_jax.cpu_ops.handoff import HostKvPool
from neo_jax.models.config import ModelConfig
from neo_jax.sharding import check_tensor_parallel_size

logger = logging.getLogger(__name__)

GIB = 2**30
# Prefill attention splits its queries into tiles whose fp32 scores stay under this many bytes.
ATTENTION_SCORES_BYTES = 256 * 2**20


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v"], meta_fields=[])
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer; block b of layer l holds `block_size` consecutive tokens of one request."""

    k: jax.Array  # [L, num_blocks, Hkv, block_size, Dh]
    v: jax.Array  # [L, num_blocks, Hkv, block_size, Dh]

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def block_size(self) -> int:
        return self.k.shape[3]


def kv_bytes_per_block(model_config: ModelConfig, block_size: int) -> int:
    """K and V of one block in every layer."""
    itemsize = jnp.dtype(model_config.dtype).itemsize
    return 2 * model_config.num_layers * model_config.num_kv_heads * block_size * model_config.head_dim * itemsize


def allocate_kv_cache(model_config: ModelConfig, num_blocks: int, block_size: int,
                      sharding: jax.sharding.Sharding | None = None) -> KVCache:
    """A zeroed cache made on the default device, or in place with `sharding` (zeros keep padded reads finite)."""
    shape = (model_config.num_layers, num_blocks, model_config.num_kv_heads, block_size, model_config.head_dim)
    dtype = jnp.dtype(model_config.dtype)
    make = jax.jit(lambda: KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype)),
                   out_shardings=None if sharding is None else KVCache(k=sharding, v=sharding))
    return make()


def activation_reserve_bytes(model_config: ModelConfig, config: EngineConfig) -> int:
    """Memory left free for the largest step's transient arrays (hidden states, MLP, logits, sampling)."""
    c = model_config
    num_tokens = config.max_num_batched_tokens + config.max_num_seqs
    per_token = 4 * (4 * c.hidden_size + (c.num_heads + 2 * c.num_kv_heads) * c.head_dim + 4 * c.intermediate_size)
    logits = 3 * 4 * config.max_num_seqs * c.vocab_size
    return num_tokens * per_token + logits + ATTENTION_SCORES_BYTES


def num_gpu_blocks(model_config: ModelConfig, config: EngineConfig, max_model_len: int,
                   device: jax.Device | None = None) -> int:
    """Blocks of the GPU pool (scratch block included) under the config's memory budget."""
    if config.num_gpu_blocks is not None:
        return config.num_gpu_blocks
    # Each device of a tensor-parallel mesh holds 1/N of every block's kv heads.
    per_block = kv_bytes_per_block(model_config, config.block_size) // config.tensor_parallel_size
    device = device or jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        budget = (stats["bytes_limit"] * config.gpu_memory_utilization - stats.get("bytes_in_use", 0)
                  - activation_reserve_bytes(model_config, config))
    else:
        # No allocator statistics (the CPU backend): the host's available memory plays the GPU's part.
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        budget = available * config.gpu_memory_utilization - activation_reserve_bytes(model_config, config)
    if config.gpu_kv_cache_gb is not None:
        budget = min(budget, config.gpu_kv_cache_gb * GIB)
    most_useful = config.max_num_seqs * blocks_for(max_model_len, config.block_size) + 1
    blocks = min(int(budget // per_block), most_useful)
    if blocks < 2:
        raise ValueError(f"gpu_memory_utilization / gpu_kv_cache_gb: the KV budget ({budget / GIB:.2f} GiB) holds "
                         f"{max(blocks, 0)} blocks of {per_block} bytes; at least 2 are needed")
    logger.info("GPU KV pool: %d blocks of %d tokens (%.2f GiB)", blocks, config.block_size, blocks * per_block / GIB)
    return blocks


def num_cpu_blocks(model_config: ModelConfig, config: EngineConfig, max_model_len: int) -> int:
    """Blocks of the host pool (scratch block included): `num_cpu_blocks`, else `cpu_kv_cache_gb`, else half of
    the available host memory, never more than `max_num_seqs` requests of `max_model_len` tokens can fill."""
    if config.num_cpu_blocks is not None:
        return config.num_cpu_blocks
    per_block = kv_bytes_per_block(model_config, config.block_size)
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    most_useful = config.max_num_seqs * blocks_for(max_model_len, config.block_size) + 1
    if config.cpu_kv_cache_gb is None:
        return max(2, min(int(available // 2 // per_block), most_useful))
    if config.cpu_kv_cache_gb * GIB > available:
        raise ValueError(f"cpu_kv_cache_gb: {config.cpu_kv_cache_gb:.2f} GiB asked for the host KV pool but only "
                         f"{available / GIB:.2f} GiB of host memory is available")
    blocks = min(int(config.cpu_kv_cache_gb * GIB // per_block), most_useful)
    if blocks < 2:
        raise ValueError(f"cpu_kv_cache_gb: {config.cpu_kv_cache_gb} GiB holds {blocks} blocks of {per_block} bytes; "
                         "at least 2 are needed")
    return blocks


def allocate_host_kv_pool(model_config: ModelConfig, num_blocks: int, block_size: int,
                          tensor_parallel_size: int = 1) -> HostKvPool:
    """The host pool's K/V memory (pinned when a GPU is present), zeroed. Over `tensor_parallel_size` > 1 shards
    it is shard-major (see neo_jax/sharded_host_attention.py): [L * tp, N, Hkv / tp, bs, Dh]."""
    check_tensor_parallel_size(model_config, tensor_parallel_size)
    dtype = np.dtype(jnp.dtype(model_config.dtype))
    try:
        pool = HostKvPool(model_config.num_layers * tensor_parallel_size, num_blocks,
                          model_config.num_kv_heads // tensor_parallel_size, block_size, model_config.head_dim, dtype)
    except (MemoryError, RuntimeError) as error:
        size = num_blocks * kv_bytes_per_block(model_config, block_size) / GIB
        raise MemoryError(f"cpu_kv_cache_gb: could not allocate the host KV pool ({size:.2f} GiB): {error}") from error
    logger.info("host KV pool: %d blocks of %d tokens (%.2f GiB, %s)", num_blocks, block_size,
                num_blocks * kv_bytes_per_block(model_config, block_size) / GIB,
                "pinned" if pool.pinned else "pageable")
    return pool
