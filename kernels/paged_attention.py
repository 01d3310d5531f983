"""Paged decode attention: one query token per request over a paged KV cache.

Layouts (the host pool's too, so that swaps are block copies):
  q             [B, Hq, D]                  out [B, Hq, D] in q's dtype
  k/v cache     [num_blocks, Hkv, block_size, D]
  block_tables  int32 [B, max_blocks]       context_lens int32 [B] (0 = padding row, output zeros)
GQA of any ratio, softmax in fp32, scale 1/sqrt(D) unless given.

`paged_decode_attention` lowers to the CUDA kernel (neo_jax.kernels._cuda, an XLA FFI custom call) when
the program is compiled for a CUDA GPU and the kernel supports the shapes; on JAX's CPU backend to the CPU
op of neo_jax.cpu_ops (the very kernel that attends host-resident requests in the pipeline, so a request's
attention has the same bits wherever its KV lives); to the gather-based reference everywhere else. To attend one layer of a stacked cache [L, N, ...] without copying the layer out, view it
as [L * N, ...] and offset the block tables by layer * N.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from neo_jax.cpu_ops import jax_paged_decode_attention

try:
    from neo_jax.kernels import _cuda
except ImportError:  # built only where CMake found a CUDA compiler
    _cuda = None

FFI_TARGET = "neo_jax_paged_decode_attention"
CUDA_HEAD_DIMS = (64, 128)
CUDA_BLOCK_SIZES = (16, 32)
CUDA_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
# The kernel's limits (kernels/cuda/paged_attention_kernels.cuh): tokens of one split, query heads of one CTA,
# warps of one CTA; and the resident CTAs per multiprocessor that the split count aims at.
CUDA_MAX_PARTITION_TOKENS = 512
CUDA_MAX_GROUP_TILE = 8
CUDA_NUM_WARPS = 4
CUDA_TARGET_CTAS_PER_SM = 4

if _cuda is not None:
    jax.ffi.register_ffi_target(FFI_TARGET, _cuda.paged_decode_attention_handler(), platform="CUDA")


def check_paged_attention_inputs(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, block_tables: jax.Array,
                                 context_lens: jax.Array) -> None:
    """Raises ValueError naming the first argument whose shape or dtype breaks the layouts above."""
    if q.ndim != 3:
        raise ValueError(f"q must be [batch, num_heads, head_dim], got shape {q.shape}")
    if k_cache.ndim != 4:
        raise ValueError(f"k_cache must be [num_blocks, num_kv_heads, block_size, head_dim], got {k_cache.shape}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {v_cache.shape} differs from k_cache shape {k_cache.shape}")
    batch, num_heads, head_dim = q.shape
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache head_dim {k_cache.shape[3]} differs from q's {head_dim}")
    if num_heads % k_cache.shape[1]:
        raise ValueError(f"q's {num_heads} heads are not a multiple of k_cache's {k_cache.shape[1]} kv heads")
    if block_tables.dtype != jnp.int32 or block_tables.ndim != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be int32 [{batch}, max_blocks], got {block_tables.dtype} "
                         f"{block_tables.shape}")
    if context_lens.dtype != jnp.int32 or context_lens.shape != (batch,):
        raise ValueError(f"context_lens must be int32 [{batch}], got {context_lens.dtype} {context_lens.shape}")


def paged_decode_attention_reference(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                                     block_tables: jax.Array, context_lens: jax.Array,
                                     scale: float | None = None) -> jax.Array:
    """Gathers each request's blocks and attends in plain JAX: the oracle and the path off the GPU."""
    check_paged_attention_inputs(q, k_cache, v_cache, block_tables, context_lens)
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


def cuda_kernel_unsupported_reason(q: jax.Array, k_cache: jax.Array) -> str | None:
    """Why the CUDA kernel cannot run these operands (None when it can)."""
    if _cuda is None:
        return "neo_jax.kernels._cuda was not built (no CUDA compiler when the package was installed)"
    if q.dtype not in CUDA_DTYPES or k_cache.dtype != q.dtype:
        return f"dtypes q {q.dtype} / cache {k_cache.dtype}: the kernel needs one of bf16, f16, f32 for both"
    if q.shape[2] not in CUDA_HEAD_DIMS:
        return f"head_dim {q.shape[2]} is not one of {CUDA_HEAD_DIMS}"
    if k_cache.shape[2] not in CUDA_BLOCK_SIZES:
        return f"block_size {k_cache.shape[2]} is not one of {CUDA_BLOCK_SIZES}"
    return None


@functools.cache
def gpu_multiprocessor_count() -> int:
    """Multiprocessors of the first CUDA GPU; an H100's 132 where there is none (programs lowered for CUDA on a
    machine without a GPU never run)."""
    try:
        return jax.devices("cuda")[0].core_count
    except (RuntimeError, AttributeError):
        return 132


@dataclasses.dataclass(frozen=True)
class CudaLaunch:
    """How the kernel covers a call: query heads per CTA, KV blocks per split-K partition, partitions."""

    group_tile: int
    partition_blocks: int
    num_splits: int


def cuda_launch(batch: int, num_heads: int, num_kv_heads: int, block_size: int, max_blocks: int,
                partition_blocks: int = 0, num_multiprocessors: int | None = None) -> CudaLaunch:
    """The launch for these shapes. partition_blocks 0: enough splits for CUDA_TARGET_CTAS_PER_SM CTAs per
    multiprocessor, at least one block per warp; at most CUDA_MAX_PARTITION_TOKENS tokens either way."""
    group_size = num_heads // num_kv_heads
    group_tile = min(1 << (group_size - 1).bit_length(), CUDA_MAX_GROUP_TILE)
    largest = CUDA_MAX_PARTITION_TOKENS // block_size
    if partition_blocks <= 0:
        base_ctas = batch * num_kv_heads * -(-group_size // group_tile)
        sms = gpu_multiprocessor_count() if num_multiprocessors is None else num_multiprocessors
        wanted_splits = -(-sms * CUDA_TARGET_CTAS_PER_SM // max(base_ctas, 1))
        partition_blocks = max(-(-max_blocks // wanted_splits), min(CUDA_NUM_WARPS, max_blocks))
    partition_blocks = min(partition_blocks, largest)
    return CudaLaunch(group_tile, partition_blocks, -(-max_blocks // partition_blocks))


def paged_decode_attention_cuda(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, block_tables: jax.Array,
                                context_lens: jax.Array, scale: float | None = None,
                                partition_blocks: int = 0) -> jax.Array:
    """The CUDA kernel as an FFI custom call (CUDA programs only). partition_blocks: KV blocks per
    split-K partition, 0 to let the kernel fill the GPU."""
    check_paged_attention_inputs(q, k_cache, v_cache, block_tables, context_lens)
    reason = cuda_kernel_unsupported_reason(q, k_cache)
    if reason is not None:
        raise ValueError(f"paged_decode_attention_cuda: {reason}")
    if partition_blocks < 0:
        raise ValueError(f"partition_blocks must be >= 0, got {partition_blocks}")
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else scale
    batch, num_heads, head_dim = q.shape
    launch = cuda_launch(batch, num_heads, k_cache.shape[1], k_cache.shape[2], block_tables.shape[1],
                         partition_blocks)
    split_rows = batch * num_heads * launch.num_splits if launch.num_splits > 1 else 0
    results = (jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((max(split_rows * head_dim, 1),), jnp.float32),  # split-K partial outputs
               jax.ShapeDtypeStruct((max(split_rows, 1),), jnp.float32))  # and their log-sum-exps
    out, _, _ = jax.ffi.ffi_call(FFI_TARGET, results)(
        q, k_cache, v_cache, block_tables, context_lens, scale=np.float32(scale),
        partition_blocks=np.int32(launch.partition_blocks), group_tile=np.int32(launch.group_tile))
    return out


@functools.cache
def _warn_fallback(reason: str) -> None:
    warnings.warn(f"paged_decode_attention falls back to the gather-based reference on the GPU: {reason}",
                  stacklevel=3)


def paged_decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, block_tables: jax.Array,
                           context_lens: jax.Array, scale: float | None = None) -> jax.Array:
    """The CUDA kernel in programs compiled for a CUDA GPU, the CPU op on the CPU backend, the reference
    elsewhere or for shapes the kernel lacks."""
    check_paged_attention_inputs(q, k_cache, v_cache, block_tables, context_lens)
    operands = (q, k_cache, v_cache, block_tables, context_lens)
    reference = functools.partial(paged_decode_attention_reference, scale=scale)
    cpu_op = functools.partial(jax_paged_decode_attention, scale=scale)
    reason = cuda_kernel_unsupported_reason(q, k_cache)
    if reason is not None:
        if jax.default_backend() == "gpu":
            _warn_fallback(reason)
        return jax.lax.platform_dependent(*operands, cpu=cpu_op, default=reference)
    return jax.lax.platform_dependent(*operands, cuda=functools.partial(paged_decode_attention_cuda, scale=scale),
                                      cpu=cpu_op, default=reference)
