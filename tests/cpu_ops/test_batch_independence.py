"""Each request's output bits depend on its own inputs only: not on the other requests of the call,
nor on the thread count (the engine needs this for batches that reproduce bit for bit)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from attention_reference import make_batch
from neo_jax import cpu_ops


@pytest.fixture(autouse=True)
def restore_thread_count():
    threads = cpu_ops.num_threads()
    yield
    cpu_ops.set_num_threads(threads)


def attend(batch, rows, isa) -> np.ndarray:
    return cpu_ops.paged_decode_attention(batch.q[rows], batch.k_cache, batch.v_cache, batch.block_tables[rows],
                                          batch.context_lens[rows], isa=isa)


@pytest.mark.parametrize("isa", cpu_ops.available_isas())
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=lambda d: np.dtype(d).name)
def test_request_output_is_independent_of_batch_and_threads(isa, dtype):
    rng = np.random.default_rng(11)
    # Short, single-chunk, multi-chunk (mid-block ends) and padding requests, in random order.
    lens = rng.permutation([1, 37, 300, 512, 513, 1500, 2900, 0, 4000]).tolist()
    batch = make_batch(rng, lens, 2, 4, 64, 16, dtype, dtype, q_spread=3.0)
    everything = np.arange(len(lens))

    cpu_ops.set_num_threads(2)
    together = attend(batch, everything, isa)
    alone = [attend(batch, [r], isa)[0] for r in everything]
    subset = rng.permutation(len(lens))[:4]
    shuffled = attend(batch, subset, isa)
    cpu_ops.set_num_threads(1)
    single_thread = attend(batch, everything, isa)

    for r in everything:
        assert np.array_equal(together[r], alone[r]), f"request {r} (length {lens[r]}) differs alone"
        assert np.array_equal(together[r], single_thread[r]), f"request {r} differs on 1 thread"
    for i, r in enumerate(subset):
        assert np.array_equal(together[r], shuffled[i]), f"request {r} differs in a shuffled sub-batch"
