"""append_kv writes new K/V rows into their cache slots in place, on the NumPy and the FFI path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from neo_jax import cpu_ops

NUM_BLOCKS, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM = 40, 2, 16, 64


def caches(rng, dtype):
    shape = (NUM_BLOCKS, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM)
    return rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype)


def expected_after(k_cache, v_cache, k_new, v_new, slots):
    k_expected, v_expected = k_cache.copy(), v_cache.copy()
    for row, slot in enumerate(slots):
        if slot >= 0:
            k_expected[slot // BLOCK_SIZE, :, slot % BLOCK_SIZE] = k_new[row]
            v_expected[slot // BLOCK_SIZE, :, slot % BLOCK_SIZE] = v_new[row]
    return k_expected, v_expected


@pytest.mark.parametrize("num_tokens", [1, 7, 300])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16], ids=lambda d: np.dtype(d).name)
def test_rows_land_in_their_slots(dtype, num_tokens):
    """300 rows cross the size where the pool spreads the copy; -1 rows are skipped."""
    rng = np.random.default_rng(num_tokens)
    k_cache, v_cache = caches(rng, dtype)
    slots = rng.permutation(NUM_BLOCKS * BLOCK_SIZE)[:num_tokens].astype(np.int32)
    slots[::5] = -1
    k_new = rng.standard_normal((num_tokens, NUM_KV_HEADS, HEAD_DIM)).astype(dtype)
    v_new = rng.standard_normal((num_tokens, NUM_KV_HEADS, HEAD_DIM)).astype(dtype)
    k_expected, v_expected = expected_after(k_cache, v_cache, k_new, v_new, slots)
    cpu_ops.append_kv(k_cache, v_cache, k_new, v_new, slots)
    np.testing.assert_array_equal(k_cache, k_expected)
    np.testing.assert_array_equal(v_cache, v_expected)


@pytest.mark.parametrize("donate", [True, False])
def test_jitted_append_matches_numpy_and_donation_updates_in_place(donate):
    rng = np.random.default_rng(9)
    k_cache, v_cache = caches(rng, ml_dtypes.bfloat16)
    slots = np.array([5, -1, 130, 639], np.int32)
    k_new = rng.standard_normal((4, NUM_KV_HEADS, HEAD_DIM)).astype(ml_dtypes.bfloat16)
    v_new = rng.standard_normal((4, NUM_KV_HEADS, HEAD_DIM)).astype(ml_dtypes.bfloat16)
    k_expected, v_expected = expected_after(k_cache, v_cache, k_new, v_new, slots)
    k_jax, v_jax = jnp.asarray(k_cache), jnp.asarray(v_cache)
    k_pointer = k_jax.unsafe_buffer_pointer()
    append = jax.jit(cpu_ops.jax_append_kv, donate_argnums=(0, 1) if donate else ())
    k_out, v_out = append(k_jax, v_jax, k_new, v_new, slots)
    np.testing.assert_array_equal(np.asarray(k_out), k_expected)
    np.testing.assert_array_equal(np.asarray(v_out), v_expected)
    if donate:
        assert k_jax.is_deleted() and k_out.unsafe_buffer_pointer() == k_pointer
    else:
        np.testing.assert_array_equal(np.asarray(k_jax), k_cache)
