"""Packing of the pool-to-pool moves of a pipeline step: every row's slots, padded to few sizes."""

from __future__ import annotations

import numpy as np
import pytest

from neo_jax.config import MIN_TOKEN_BUCKET
from neo_jax.pipeline_batch import NO_HOST_SLOT, KvMove, pack_moves
from neo_jax.sampling_params import SamplingParams
from neo_jax.sequence import Request

BLOCK_SIZE = 4


def move(num_tokens: int, first_block: int) -> KvMove:
    num_blocks = -(-num_tokens // BLOCK_SIZE)
    request = Request(request_id=first_block, prompt_token_ids=[1] * num_tokens, sampling_params=SamplingParams(),
                      seed=0)
    return KvMove(request, source_table=list(range(first_block, first_block + num_blocks)),
                  target_table=list(range(100 + first_block, 100 + first_block + num_blocks)), num_tokens=num_tokens)


def test_no_moves_pack_to_empty_arrays():
    source, target = pack_moves([], BLOCK_SIZE, 0, NO_HOST_SLOT)
    assert source.shape == target.shape == (0,)


@pytest.mark.parametrize("token_counts", [[1], [5, 11], [16], [17], [300, 7, 90], [1103]])
def test_moves_pad_to_a_power_of_two_with_pad_slots(token_counts):
    moves = [move(n, first_block=10 * i) for i, n in enumerate(token_counts)]
    source, target = pack_moves(moves, BLOCK_SIZE, 0, NO_HOST_SLOT)
    num_rows = sum(token_counts)
    size = source.shape[0]
    assert size >= max(num_rows, MIN_TOKEN_BUCKET) and size & (size - 1) == 0 and size < 2 * max(num_rows, 16)
    expected_source = np.concatenate([np.array(m.source_table)[np.arange(m.num_tokens) // BLOCK_SIZE] * BLOCK_SIZE
                                      + np.arange(m.num_tokens) % BLOCK_SIZE for m in moves])
    np.testing.assert_array_equal(source[:num_rows], expected_source)
    np.testing.assert_array_equal(target[:num_rows], expected_source + 100 * BLOCK_SIZE)
    assert (source[num_rows:] == 0).all() and (target[num_rows:] == NO_HOST_SLOT).all()
