"""The attention op as an XLA FFI custom call under jax.jit gives what the NumPy call gives."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from attention_reference import make_batch
from neo_jax import cpu_ops


@pytest.mark.parametrize("isa", cpu_ops.available_isas())
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16], ids=lambda d: np.dtype(d).name)
def test_jit_matches_numpy_path(dtype, isa):
    batch = make_batch(np.random.default_rng(0), [3, 0, 700, 64], 2, 4, 64, 16, dtype, dtype)
    args = (batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.context_lens)
    expected = cpu_ops.paged_decode_attention(*args, scale=0.2, isa=isa)
    attend = jax.jit(lambda *a: cpu_ops.jax_paged_decode_attention(*a, scale=0.2, isa=isa))
    got = attend(*args)
    assert got.dtype == batch.q.dtype and got.shape == batch.q.shape
    np.testing.assert_array_equal(np.asarray(got), expected)


def test_default_scale_and_use_inside_a_larger_program():
    batch = make_batch(np.random.default_rng(1), [50, 9], 1, 8, 128, 32, ml_dtypes.bfloat16, ml_dtypes.bfloat16)
    args = (batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.context_lens)

    @jax.jit
    def layer(q, k_cache, v_cache, block_tables, context_lens):
        attn = cpu_ops.jax_paged_decode_attention(q * 2, k_cache, v_cache, block_tables, context_lens)
        return attn.astype(jnp.float32).sum(axis=-1)

    expected = cpu_ops.paged_decode_attention(batch.q * 2, *args[1:]).astype(np.float32).sum(axis=-1)
    np.testing.assert_allclose(np.asarray(layer(*args)), expected, rtol=1e-6)
