"""The CUDA paged decode attention kernel against the reference, on a GPU (skipped without one)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neo_jax.kernels.paged_attention import (FFI_TARGET, cuda_kernel_unsupported_reason, paged_decode_attention,
                                             paged_decode_attention_cuda, paged_decode_attention_reference)


def _gpu_available() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


pytestmark = pytest.mark.skipif(not _gpu_available(), reason="needs a CUDA GPU")

TOLERANCE = {jnp.bfloat16: 2e-2, jnp.float16: 2e-3, jnp.float32: 2e-5}


def make_inputs(seed: int, batch: int, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                max_blocks: int, dtype, context_lens: list[int] | None = None):
    """Random q and caches; shuffled block tables; slots no request reads hold NaN (the kernel must not use them)."""
    rng = np.random.default_rng(seed)
    num_blocks = batch * max_blocks + 3
    if context_lens is None:
        context_lens = rng.integers(1, max_blocks * block_size + 1, batch)
        context_lens[0] = 0
    context_lens = np.asarray(context_lens, np.int32)
    block_tables = rng.permutation(num_blocks)[:batch * max_blocks].reshape(batch, max_blocks).astype(np.int32)
    cache_shape = (num_blocks, num_kv_heads, block_size, head_dim)
    k_cache = np.full(cache_shape, np.nan, np.float32)
    v_cache = np.full(cache_shape, np.nan, np.float32)
    for b, length in enumerate(context_lens):
        for i in range(length):
            block, offset = block_tables[b, i // block_size], i % block_size
            k_cache[block, :, offset] = rng.standard_normal((num_kv_heads, head_dim))
            v_cache[block, :, offset] = rng.standard_normal((num_kv_heads, head_dim))
    q = rng.standard_normal((batch, num_heads, head_dim))
    arrays = (q, k_cache, v_cache)
    return tuple(jnp.asarray(x, dtype) for x in arrays) + (jnp.asarray(block_tables), jnp.asarray(context_lens))


def reference_on_clean_cache(q, k_cache, v_cache, block_tables, context_lens, scale=None):
    # float32 einsums on the GPU default to TF32 (a 1e-3 error), far above the float32 tolerance.
    with jax.default_matmul_precision("highest"):
        return paged_decode_attention_reference(q, jnp.nan_to_num(k_cache), jnp.nan_to_num(v_cache), block_tables,
                                                context_lens, scale)


def assert_close(out, expected, dtype) -> None:
    assert out.dtype == expected.dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(expected, np.float32),
                               atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("head_dim, block_size", [(64, 16), (128, 16), (64, 32), (128, 32)])
@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (8, 4), (8, 2), (32, 8), (12, 2), (32, 2)])
def test_kernel_matches_reference(dtype, head_dim: int, block_size: int, num_heads: int, num_kv_heads: int) -> None:
    inputs = make_inputs(head_dim + num_heads, 5, num_heads, num_kv_heads, head_dim, block_size, 6, dtype)
    out = jax.jit(paged_decode_attention_cuda)(*inputs)
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert_close(out, reference_on_clean_cache(*inputs), dtype)
    np.testing.assert_array_equal(np.asarray(out[0], np.float32), 0.0)


@pytest.mark.parametrize("partition_blocks", [0, 1, 3, 4, 32])
@pytest.mark.parametrize("context_lens", [[1, 17, 300, 1500, 2048], [2048, 0, 2047, 1024, 5]])
def test_split_k_partitions_merge_exactly(partition_blocks: int, context_lens: list[int]) -> None:
    inputs = make_inputs(7, 5, 32, 8, 128, 16, 128, jnp.bfloat16, context_lens)
    out = jax.jit(paged_decode_attention_cuda, static_argnames="partition_blocks")(
        *inputs, partition_blocks=partition_blocks)
    assert_close(out, reference_on_clean_cache(*inputs), jnp.bfloat16)


def test_custom_scale_and_large_batch() -> None:
    inputs = make_inputs(3, 300, 32, 8, 128, 16, 4, jnp.bfloat16)
    out = jax.jit(paged_decode_attention_cuda, static_argnames="scale")(*inputs, scale=0.05)
    assert_close(out, reference_on_clean_cache(*inputs, scale=0.05), jnp.bfloat16)


def test_scan_over_layers_of_a_flattened_stacked_cache() -> None:
    """The engine's use: the stacked cache [L, N, ...] viewed as [L * N, ...], block ids offset per layer."""
    num_layers, batch, max_blocks = 3, 4, 8
    q, k_cache, v_cache, block_tables, context_lens = make_inputs(5, batch, 16, 4, 128, 16, max_blocks,
                                                                  jnp.bfloat16)
    k_cache, v_cache = jnp.nan_to_num(k_cache), jnp.nan_to_num(v_cache)
    num_blocks = k_cache.shape[0]
    k_layers = jnp.stack([k_cache * (layer + 1) for layer in range(num_layers)])
    v_layers = jnp.stack([v_cache - layer for layer in range(num_layers)])

    @functools.partial(jax.jit, static_argnums=0)
    def attend_all_layers(attention, q, k_layers, v_layers):
        k_flat = k_layers.reshape(-1, *k_layers.shape[2:])
        v_flat = v_layers.reshape(-1, *v_layers.shape[2:])

        def layer_step(carry, layer):
            out = attention(carry, k_flat, v_flat, block_tables + layer * num_blocks, context_lens)
            return out, out

        return jax.lax.scan(layer_step, q, jnp.arange(num_layers, dtype=jnp.int32))[1]

    out = attend_all_layers(paged_decode_attention, q, k_layers, v_layers)
    expected = attend_all_layers(paged_decode_attention_reference, q, k_layers, v_layers)
    assert_close(out, expected, jnp.bfloat16)


def test_dispatcher_runs_the_kernel_on_the_gpu() -> None:
    inputs = make_inputs(11, 4, 8, 2, 128, 16, 4, jnp.bfloat16)
    assert cuda_kernel_unsupported_reason(inputs[0], inputs[1]) is None
    compiled = jax.jit(paged_decode_attention).lower(*inputs).compile()
    assert FFI_TARGET in compiled.as_text()
    assert_close(compiled(*inputs), reference_on_clean_cache(*inputs), jnp.bfloat16)
