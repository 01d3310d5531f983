"""BlockPool: allocation by token count, the reserved scratch block, freeing, and its errors."""

import pytest

from neo_jax.block_manager import SCRATCH_BLOCK, BlockPool, blocks_for
from neo_jax.sampling_params import SamplingParams
from neo_jax.sequence import Request


def make_request(request_id: int = 0, num_prompt: int = 5) -> Request:
    return Request(request_id, list(range(3, 3 + num_prompt)), SamplingParams(), seed=0)


def test_blocks_for_rounds_up():
    assert [blocks_for(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_grow_allocates_only_missing_blocks_and_never_the_scratch_block():
    pool = BlockPool("gpu", num_blocks=6, block_size=4)
    request = make_request()
    pool.grow(request, 5)
    assert len(request.block_table) == 2 and request.kv_pool == "gpu"
    pool.grow(request, 8)
    assert len(request.block_table) == 2
    pool.grow(request, 9)
    assert len(request.block_table) == 3
    other = make_request(1)
    pool.grow(other, 8)
    tables = request.block_table + other.block_table
    assert SCRATCH_BLOCK not in tables and len(set(tables)) == 5 == pool.num_usable_blocks
    assert pool.num_free_blocks == 0 and not pool.can_hold(make_request(2), 1)


def test_free_returns_blocks_and_clears_the_request():
    pool = BlockPool("gpu", num_blocks=4, block_size=2)
    request = make_request()
    pool.grow(request, 6)
    with pytest.raises(MemoryError, match="gpu KV pool"):
        pool.grow(make_request(1), 1)
    pool.free(request)
    assert request.block_table == [] and request.kv_pool is None and pool.num_free_blocks == 3
    assert pool.can_hold(make_request(1), 6)


def test_a_request_cannot_grow_in_a_second_pool():
    gpu, host = BlockPool("gpu", 4, 2), BlockPool("cpu", 4, 2)
    request = make_request()
    gpu.grow(request, 2)
    with pytest.raises(ValueError, match="'gpu'"):
        host.grow(request, 4)


@pytest.mark.parametrize("num_blocks, block_size, field", [(1, 4, "num_blocks"), (4, 0, "block_size")])
def test_bad_pool_sizes_are_rejected(num_blocks, block_size, field):
    with pytest.raises(ValueError, match=field):
        BlockPool("gpu", num_blocks, block_size)
