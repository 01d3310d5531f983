"""Packing of a pipeline step: the pool-to-pool moves (every row's slots, padded to few sizes) and the context
of prefills whose KV goes to the host pool."""

from __future__ import annotations

import numpy as np
import pytest

from neo_jax.batch import ScheduledChunk
from neo_jax.config import MIN_TOKEN_BUCKET, EngineConfig, StepBuckets
from neo_jax.pipeline_batch import NO_HOST_SLOT, KvMove, PipelineSchedule, pack_moves, pack_pipeline_step
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


def prefill(request_id: int, start: int, num_tokens: int, first_block: int) -> ScheduledChunk:
    """A chunk of tokens [start, start + num_tokens) of a prompt held in blocks first_block, first_block + 1, ..."""
    request = Request(request_id=request_id, prompt_token_ids=list(range(3, 3 + start + num_tokens)),
                      sampling_params=SamplingParams(), seed=0)
    request.num_computed_tokens = start
    request.block_table = list(range(first_block, first_block + -(-(start + num_tokens) // BLOCK_SIZE)))
    return ScheduledChunk(request, num_tokens)


@pytest.mark.parametrize("host_start", [0, 6])
def test_a_host_prefill_takes_its_chunk_from_the_step_and_its_prefix_from_the_host(host_start):
    """Context entries of a host prefill's own chunk name its rows among the step's prefill tokens; those of its
    earlier chunks name host slots, and only when some host prefill has a prefix is there anything to load."""
    gpu_chunk, host_chunk = prefill(1, 0, 5, first_block=10), prefill(2, host_start, 7, first_block=20)
    buckets = StepBuckets.for_engine(EngineConfig("tiny", block_size=BLOCK_SIZE, max_model_len=64), 64)
    batch, _ = pack_pipeline_step(PipelineSchedule([gpu_chunk, host_chunk], host_prefill_ids=frozenset({2})),
                                  BLOCK_SIZE, buckets)
    host_slots = 20 * BLOCK_SIZE + np.arange(host_start + 7)  # blocks 20, 21, ... hold the host prompt
    np.testing.assert_array_equal(batch.host_prefill_slots[:12], [NO_HOST_SLOT] * 5 + list(host_slots[host_start:]))
    context = slice(5, 5 + host_start + 7)  # the GPU prompt's 5 entries come first
    np.testing.assert_array_equal(batch.host_chunk_rows[context], [-1] * host_start + list(range(5, 12)))
    assert (np.delete(batch.host_chunk_rows, np.arange(context.start, context.stop)) == -1).all()
    assert (batch.gpu.context_slots[context] == 0).all() and (batch.gpu.slot_mapping[5:12] == 0).all()
    if host_start == 0:
        assert batch.host_context_slots.shape == (0,)
    else:
        np.testing.assert_array_equal(batch.host_context_slots[context],
                                      list(host_slots[:host_start]) + [NO_HOST_SLOT] * 7)
