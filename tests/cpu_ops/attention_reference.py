"""Float64 NumPy reference of paged decode attention and random paged batches for the CPU op tests."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class PagedBatch:
    q: np.ndarray  # [num_reqs, num_q_heads, head_dim]
    k_cache: np.ndarray  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: np.ndarray  # [num_blocks, num_kv_heads, block_size, head_dim]
    block_tables: np.ndarray  # int32 [num_reqs, max_blocks_per_req]
    context_lens: np.ndarray  # int32 [num_reqs]


def make_batch(
    rng: np.random.Generator,
    context_lens: list[int],
    num_kv_heads: int,
    group: int,
    head_dim: int,
    block_size: int,
    q_dtype,
    kv_dtype,
    q_spread: float = 1.0,
) -> PagedBatch:
    """Blocks shuffled over a cache with spare blocks; block table entries past a request's
    context hold out-of-range ids, which the op must never read."""
    lens = np.asarray(context_lens, np.int32)
    blocks_needed = -(-lens // block_size)
    max_blocks = int(blocks_needed.max(initial=0)) + 1
    num_blocks = int(blocks_needed.sum()) + 3
    order = rng.permutation(num_blocks).astype(np.int32)
    tables = np.full((len(lens), max_blocks), -12345, np.int32)
    start = 0
    for r, count in enumerate(blocks_needed):
        tables[r, :count] = order[start : start + count]
        start += count
    cache_shape = (num_blocks, num_kv_heads, block_size, head_dim)
    q = (rng.standard_normal((len(lens), num_kv_heads * group, head_dim)) * q_spread).astype(q_dtype)
    return PagedBatch(
        q=q,
        k_cache=rng.standard_normal(cache_shape).astype(kv_dtype),
        v_cache=rng.standard_normal(cache_shape).astype(kv_dtype),
        block_tables=tables,
        context_lens=lens,
    )


def reference_attention(batch: PagedBatch, scale: float | None = None) -> np.ndarray:
    """Softmax(q k^T * scale) v per request and q head, in float64 over the stored values."""
    num_reqs, num_q_heads, head_dim = batch.q.shape
    _, num_kv_heads, block_size, _ = batch.k_cache.shape
    group = num_q_heads // num_kv_heads
    scale = 1.0 / np.sqrt(head_dim) if scale is None else scale
    out = np.zeros((num_reqs, num_q_heads, head_dim))
    for r in range(num_reqs):
        tokens = np.arange(batch.context_lens[r])
        if tokens.size == 0:
            continue
        blocks = batch.block_tables[r, tokens // block_size]
        k = batch.k_cache[blocks, :, tokens % block_size].astype(np.float64)  # [tokens, kv_heads, d]
        v = batch.v_cache[blocks, :, tokens % block_size].astype(np.float64)
        q = batch.q[r].astype(np.float64).reshape(num_kv_heads, group, head_dim)
        scores = np.einsum("hgd,thd->hgt", q, k) * scale
        weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
        weights /= weights.sum(axis=-1, keepdims=True)
        out[r] = np.einsum("hgt,thd->hgd", weights, v).reshape(num_q_heads, head_dim)
    return out


def output_tolerance(dtype) -> float:
    """Relative error allowed in one output element: its rounding to `dtype`, plus fp32 accumulation."""
    return {"float32": 2e-5, "float16": 2.0**-10, "bfloat16": 2.0**-8}[np.dtype(dtype).name]
