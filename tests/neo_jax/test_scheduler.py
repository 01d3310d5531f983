"""Continuous batching: budgets, chunked prefill, admission order, preemption of the newest request."""

from neo_jax.block_manager import BlockPool
from neo_jax.config import EngineConfig
from neo_jax.sampling_params import SamplingParams
from neo_jax.scheduler import Scheduler
from neo_jax.sequence import Request, RequestStatus


def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_num_batched_tokens: int = 16,
                   max_num_seqs: int = 4) -> Scheduler:
    config = EngineConfig(model="tiny", block_size=block_size, max_num_batched_tokens=max_num_batched_tokens,
                          max_num_seqs=max_num_seqs)
    return Scheduler(config, BlockPool("gpu", num_blocks, block_size))


def add(scheduler: Scheduler, request_id: int, num_prompt: int) -> Request:
    request = Request(request_id, [5] * num_prompt, SamplingParams(), seed=0)
    scheduler.add(request)
    return request


def run_chunks(scheduler: Scheduler) -> list[tuple[int, int]]:
    """One step as (request id, tokens); the chunks are then marked computed and sample a token."""
    chunks = scheduler.schedule()
    for chunk in chunks:
        sampled = chunk.samples
        chunk.request.num_computed_tokens += chunk.num_tokens
        if sampled:
            chunk.request.output_token_ids.append(7)
    return [(c.request.request_id, c.num_tokens) for c in chunks]


def test_long_prompts_are_chunked_under_the_token_budget():
    scheduler = make_scheduler(max_num_batched_tokens=16)
    add(scheduler, 0, 20)
    add(scheduler, 1, 10)
    assert run_chunks(scheduler) == [(0, 16)]
    assert run_chunks(scheduler) == [(0, 4), (1, 10)]
    assert run_chunks(scheduler) == [(0, 1), (1, 1)]
    assert scheduler.stats.num_partial_prefills == 1


def test_max_num_seqs_caps_the_running_requests():
    scheduler = make_scheduler(max_num_seqs=2)
    for request_id in range(3):
        add(scheduler, request_id, 2)
    assert run_chunks(scheduler) == [(0, 2), (1, 2)]
    assert run_chunks(scheduler) == [(0, 1), (1, 1)]
    scheduler.finish(scheduler.running[0], "length")
    assert run_chunks(scheduler) == [(1, 1), (2, 2)]


def test_when_blocks_run_out_the_newest_request_is_preempted_and_requeued_first():
    scheduler = make_scheduler(num_blocks=5, block_size=4, max_num_batched_tokens=32)  # 4 usable blocks
    first, second = add(scheduler, 0, 8), add(scheduler, 1, 7)
    waiting = add(scheduler, 2, 1)
    assert run_chunks(scheduler) == [(0, 8), (1, 7)]
    # Request 0 needs a third block for its 9th token: request 1 (the newest) gives its blocks back.
    assert run_chunks(scheduler) == [(0, 1)]
    assert second.status is RequestStatus.WAITING and second.num_computed_tokens == 0
    assert second.block_table == [] and second.num_preemptions == 1
    assert list(scheduler.waiting) == [second, waiting]
    assert scheduler.stats.num_preemptions == 1
    scheduler.finish(first, "stop")
    # Recomputation: the prompt and the token sampled before the preemption.
    assert run_chunks(scheduler) == [(1, 8), (2, 1)]


def test_a_request_that_does_not_fit_waits_without_overtaking():
    scheduler = make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=32)  # 3 usable blocks
    add(scheduler, 0, 8)
    add(scheduler, 1, 8)
    add(scheduler, 2, 2)
    assert run_chunks(scheduler) == [(0, 8)]
    assert [r.request_id for r in scheduler.waiting] == [1, 2]


def test_finish_frees_blocks():
    scheduler = make_scheduler(num_blocks=8)
    request = add(scheduler, 0, 9)
    run_chunks(scheduler)
    assert scheduler.pool.num_free_blocks == 4
    scheduler.finish(request, "stop")
    assert scheduler.pool.num_free_blocks == 7 and request.finish_reason == "stop"
    assert not scheduler.has_unfinished()


def test_preempted_requests_rejoin_the_queue_in_arrival_order():
    scheduler = make_scheduler(max_num_batched_tokens=64, max_num_seqs=8)
    for request_id in range(6):
        add(scheduler, request_id, 3)
    run_chunks(scheduler)
    running = {request.request_id: request for request in scheduler.running}
    for request_id in (3, 1, 4):  # in any order, as a plan may name them
        scheduler.running.remove(running[request_id])
        scheduler._preempt(running[request_id])
    add(scheduler, 6, 3)
    assert [request.request_id for request in scheduler.waiting] == [1, 3, 4, 6]
