"""write_kv: rows land in their slots of the stacked cache; rows aimed at the scratch block are dropped."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from neo_jax.attention import write_kv

LAYERS, BLOCKS, KV_HEADS, BLOCK_SIZE, HEAD_DIM = 2, 5, 2, 4, 8


@pytest.mark.parametrize("layer", [0, 1])
def test_rows_land_in_their_slots_and_scratch_rows_are_dropped(layer):
    rng = np.random.default_rng(layer)
    shape = (LAYERS * BLOCKS, KV_HEADS, BLOCK_SIZE, HEAD_DIM)
    k_blocks, v_blocks = rng.standard_normal(shape, np.float32), rng.standard_normal(shape, np.float32)
    slots = np.array([5, 0, 19, 3, 0, 8], np.int32)  # slots 0-3 are the scratch block's (padding)
    k, v = (rng.standard_normal((len(slots), KV_HEADS, HEAD_DIM), np.float32) for _ in range(2))
    new_k, new_v = write_kv(jnp.asarray(k_blocks), jnp.asarray(v_blocks), jnp.asarray(k), jnp.asarray(v),
                            jnp.asarray(slots), jnp.int32(layer * BLOCKS))
    expected_k, expected_v = k_blocks.copy(), v_blocks.copy()
    for row, slot in enumerate(slots):
        if slot >= BLOCK_SIZE:
            block = layer * BLOCKS + slot // BLOCK_SIZE
            expected_k[block, :, slot % BLOCK_SIZE] = k[row]
            expected_v[block, :, slot % BLOCK_SIZE] = v[row]
    np.testing.assert_array_equal(np.asarray(new_k), expected_k)
    np.testing.assert_array_equal(np.asarray(new_v), expected_v)
