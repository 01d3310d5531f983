"""The paged decode attention reference against a float64 NumPy oracle on random inputs."""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from neo_jax.kernels.paged_attention import paged_decode_attention, paged_decode_attention_reference


def numpy_attention(q, k_cache, v_cache, block_tables, context_lens):
    batch, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    out = np.zeros((batch, num_heads, head_dim))
    for b in range(batch):
        n = context_lens[b]
        if n == 0:
            continue
        slots = [(block_tables[b][i // block_size], i % block_size) for i in range(n)]
        for h in range(num_heads):
            kv = h // (num_heads // num_kv_heads)
            keys = np.stack([k_cache[blk, kv, off] for blk, off in slots]).astype(np.float64)
            values = np.stack([v_cache[blk, kv, off] for blk, off in slots]).astype(np.float64)
            scores = keys @ q[b, h].astype(np.float64) / np.sqrt(head_dim)
            weights = np.exp(scores - scores.max())
            out[b, h] = weights @ values / weights.sum()
    return out


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("dtype, atol", [(np.float32, 1e-5), (ml_dtypes.bfloat16, 2e-2)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_reference_matches_numpy(num_heads: int, num_kv_heads: int, dtype, atol: float, block_size: int) -> None:
    rng = np.random.default_rng(num_heads * 100 + block_size)
    batch, head_dim, num_blocks, max_blocks = 5, 64, 40, 8
    context_lens = np.array([1, 0, block_size, 3 * block_size + 5, max_blocks * block_size], np.int32)
    block_tables = np.stack([rng.permutation(num_blocks)[:max_blocks] for _ in range(batch)]).astype(np.int32)
    q = rng.standard_normal((batch, num_heads, head_dim)).astype(dtype)
    k_cache = rng.standard_normal((num_blocks, num_kv_heads, block_size, head_dim)).astype(dtype)
    v_cache = rng.standard_normal((num_blocks, num_kv_heads, block_size, head_dim)).astype(dtype)
    expected = numpy_attention(q, k_cache, v_cache, block_tables, context_lens)
    for attention in (paged_decode_attention_reference, paged_decode_attention):
        out = attention(jnp.asarray(q), jnp.asarray(k_cache), jnp.asarray(v_cache), jnp.asarray(block_tables),
                        jnp.asarray(context_lens))
        assert out.dtype == jnp.dtype(dtype) and out.shape == q.shape
        np.testing.assert_allclose(np.asarray(out, np.float64), expected, atol=atol)
