"""pack_step against a row-by-row reading of its layout, on random mixes of decodes and prefill chunks; the
pending tokens of asynchronous scheduling."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from neo_jax.batch import PAD_CONTEXT_REQUEST, PAD_QUERY_REQUEST, ScheduledChunk, pack_step, resolve_pending_tokens
from neo_jax.config import EngineConfig, StepBuckets
from neo_jax.sampler import pack_sampling
from neo_jax.sampling_params import SamplingParams
from neo_jax.sequence import Request, pending_token

BLOCK_SIZE = 4
BUCKETS = StepBuckets.for_engine(EngineConfig(model="tiny", block_size=BLOCK_SIZE, max_num_seqs=16,
                                              max_num_batched_tokens=64), 128)


def make_request(request_id: int, prompt_len: int, num_outputs: int, num_computed: int,
                 rng: np.random.Generator) -> Request:
    request = Request(request_id, rng.integers(0, 500, prompt_len).tolist(),
                      SamplingParams(max_tokens=64, temperature=0.5 * (request_id % 2), top_k=request_id, seed=None),
                      seed=1000 + request_id)
    request.output_token_ids = rng.integers(0, 500, num_outputs).tolist()
    request.num_computed_tokens = num_computed
    request.block_table = rng.permutation(400)[:-(-request.num_tokens // BLOCK_SIZE)].tolist()
    return request


@st.composite
def step_chunks(draw) -> list[ScheduledChunk]:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    chunks, budget = [], 64
    for request_id in range(draw(st.integers(0, 12))):
        prompt_len = draw(st.integers(1, 60))
        if draw(st.booleans()):  # a decode: every token but the newest is computed
            num_outputs = draw(st.integers(1, 30))
            request = make_request(request_id, prompt_len, num_outputs, prompt_len + num_outputs - 1, rng)
            chunks.append(ScheduledChunk(request, 1))
        elif budget > 1:  # a prefill chunk, possibly the middle of a prompt
            start = draw(st.integers(0, prompt_len - 1))
            num_tokens = min(draw(st.integers(2, 40)), prompt_len - start, budget)
            if num_tokens < 2:
                continue
            chunks.append(ScheduledChunk(make_request(request_id, prompt_len, 0, start, rng), num_tokens))
            budget -= num_tokens
    return chunks


def slot(request: Request, position: int) -> int:
    return request.block_table[position // BLOCK_SIZE] * BLOCK_SIZE + position % BLOCK_SIZE


@settings(max_examples=60, deadline=None)
@given(step_chunks())
def test_pack_step_lays_out_every_row_as_documented(chunks):
    batch, sampled = pack_step(chunks, BLOCK_SIZE, BUCKETS)
    decodes = [c for c in chunks if c.num_tokens == 1]
    prefills = [c for c in chunks if c.num_tokens > 1]
    num_decode_rows = batch.num_decodes
    assert num_decode_rows >= len(decodes)
    for row, chunk in enumerate(decodes):
        request, start = chunk.request, chunk.start
        assert batch.token_ids[row] == request.all_token_ids[start] and batch.positions[row] == start
        assert batch.slot_mapping[row] == slot(request, start)
        table = batch.decode_block_tables[row]
        assert table[:len(request.block_table)].tolist() == request.block_table
        assert not table[len(request.block_table):].any()
        assert batch.decode_context_lens[row] == start + 1
        assert batch.sample_indices[row] == row and sampled[row] is request
    assert not batch.decode_context_lens[len(decodes):].any() and not batch.decode_block_tables[len(decodes):].any()
    token, context = num_decode_rows, 0
    for index, chunk in enumerate(prefills):
        request, end = chunk.request, chunk.start + chunk.num_tokens
        tokens = slice(token, token + chunk.num_tokens)
        assert batch.token_ids[tokens].tolist() == request.all_token_ids[chunk.start:end]
        assert batch.positions[tokens].tolist() == list(range(chunk.start, end))
        assert batch.slot_mapping[tokens].tolist() == [slot(request, p) for p in range(chunk.start, end)]
        assert (batch.prefill_request_ids[tokens.start - num_decode_rows:tokens.stop - num_decode_rows] == index).all()
        assert batch.context_slots[context:context + end].tolist() == [slot(request, p) for p in range(end)]
        assert (batch.context_request_ids[context:context + end] == index).all()
        assert batch.sample_indices[num_decode_rows + index] == tokens.stop - 1
        assert sampled[num_decode_rows + index] is (request if end == request.num_tokens else None)
        token, context = tokens.stop, context + end
    assert (batch.prefill_request_ids[token - num_decode_rows:] == PAD_QUERY_REQUEST).all()
    assert (batch.context_request_ids[context:] == PAD_CONTEXT_REQUEST).all()
    assert all(r is None for r in sampled[num_decode_rows + len(prefills):])

    sampling = pack_sampling(sampled, eos_token_ids=(2,))
    for row, request in enumerate(sampled):
        params = (0.0, 0, 1.0, 0, 0) if request is None else (
            request.sampling_params.temperature, request.sampling_params.top_k, request.sampling_params.top_p,
            request.seed, len(request.output_token_ids))
        assert (sampling.temperatures[row], sampling.top_k[row], sampling.top_p[row], sampling.seeds[row],
                sampling.output_indices[row]) == params
    assert sampling.all_greedy == all(r is None or r.sampling_params.temperature == 0.0 for r in sampled)


def test_pending_tokens_are_read_from_the_previous_steps_tokens():
    previous_tokens = np.array([70, 71, 72, 73, 74], np.int32)
    token_ids = np.array([5, pending_token(3), 0, pending_token(0), 9, pending_token(4)], np.int32)
    resolved = np.asarray(resolve_pending_tokens(token_ids, previous_tokens))
    np.testing.assert_array_equal(resolved, [5, 73, 0, 70, 9, 74])


def test_a_pending_token_is_not_a_ready_output_token():
    request = Request(0, [1, 2], SamplingParams(), seed=0, output_token_ids=[7, 8])
    assert request.num_ready_output_tokens == 2
    request.output_token_ids.append(pending_token(5))
    assert request.num_ready_output_tokens == 2 and request.num_tokens == 5
