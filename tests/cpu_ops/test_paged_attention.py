"""The CPU paged decode-attention op against a float64 NumPy reference, on every ISA this CPU has."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attention_reference import make_batch, output_tolerance, reference_attention
from neo_jax import cpu_ops

DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16]


@pytest.fixture(autouse=True)
def restore_thread_count():
    threads = cpu_ops.num_threads()
    yield
    cpu_ops.set_num_threads(threads)


def run_poisoned(batch, **kwargs) -> np.ndarray:
    out = np.full(batch.q.shape, np.nan, batch.q.dtype)
    result = cpu_ops.paged_decode_attention(
        batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.context_lens, out=out, **kwargs
    )
    assert result is out
    return out


def assert_matches_reference(batch, out, scale=None) -> None:
    expected = reference_attention(batch, scale)
    # Long flat contexts average to small outputs: the absolute slack follows their size.
    atol = 1e-4 * np.abs(expected).max(initial=0.0)
    np.testing.assert_allclose(out.astype(np.float64), expected, rtol=output_tolerance(out.dtype), atol=atol)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.data(),
    q_dtype=st.sampled_from(DTYPES),
    kv_dtype=st.sampled_from(DTYPES),
    head_dim=st.sampled_from([64, 128]),
    block_size=st.sampled_from([16, 32]),
    group=st.sampled_from([1, 4, 8]),
    num_kv_heads=st.sampled_from([1, 2]),
    context_lens=st.lists(st.integers(0, 5000), min_size=1, max_size=4),
    q_spread=st.sampled_from([0.1, 1.0, 8.0]),
    num_threads=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 2**32 - 1),
)
def test_matches_reference(data, q_dtype, kv_dtype, head_dim, block_size, group, num_kv_heads, context_lens,
                           q_spread, num_threads, seed):
    isa = data.draw(st.sampled_from(cpu_ops.available_isas()), label="isa")
    cpu_ops.set_num_threads(num_threads)
    batch = make_batch(np.random.default_rng(seed), context_lens, num_kv_heads, group, head_dim, block_size,
                       q_dtype, kv_dtype, q_spread)
    assert_matches_reference(batch, run_poisoned(batch, isa=isa))


@pytest.mark.parametrize("isa", cpu_ops.available_isas())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_long_context_chunks_merge(isa, dtype):
    """One long request is split over every thread; chunks and tiles end mid-block."""
    batch = make_batch(np.random.default_rng(1), [4999, 3], 2, 4, 128, 16, dtype, dtype, q_spread=4.0)
    assert_matches_reference(batch, run_poisoned(batch, isa=isa))


@pytest.mark.parametrize("isa", cpu_ops.available_isas())
def test_explicit_scale_and_odd_head_dim(isa):
    """A head_dim no vector width divides falls back to the portable kernel; any GQA ratio works."""
    batch = make_batch(np.random.default_rng(2), [70, 1, 300], 3, 3, 36, 8, np.float32, ml_dtypes.bfloat16)
    assert_matches_reference(batch, run_poisoned(batch, scale=0.3, isa=isa), scale=0.3)


def test_zero_length_requests_give_zero_rows():
    batch = make_batch(np.random.default_rng(3), [0, 40, 0], 2, 4, 64, 16, ml_dtypes.bfloat16, ml_dtypes.bfloat16)
    out = run_poisoned(batch)
    assert not np.any(out[[0, 2]].astype(np.float32))
    assert_matches_reference(batch, out)


def test_allocates_output_when_none_is_given():
    batch = make_batch(np.random.default_rng(4), [33], 1, 8, 64, 32, np.float16, np.float16)
    out = cpu_ops.paged_decode_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.context_lens)
    assert out.dtype == np.float16 and out.shape == batch.q.shape
    assert_matches_reference(batch, out)


def test_repeated_calls_reuse_the_pool_correctly():
    """Back-to-back calls of different sizes (the once-per-layer pattern) on a multi-thread pool."""
    cpu_ops.set_num_threads(3)
    rng = np.random.default_rng(5)
    for lens in ([1], [900, 12, 4000], [0], [256, 256], [17]):
        batch = make_batch(rng, lens, 2, 4, 64, 16, ml_dtypes.bfloat16, ml_dtypes.bfloat16)
        assert_matches_reference(batch, run_poisoned(batch))
