"""A step's bookkeeping without a model: pending tokens while a step runs, the fetched tokens in their place,
finishes by length (at launch) and by stop token (at fetch), and rows dropped for requests already finished."""

from __future__ import annotations

import numpy as np

from neo_jax.batch import ScheduledChunk
from neo_jax.block_manager import BlockPool
from neo_jax.booking import advance_step, book_tokens
from neo_jax.config import EngineConfig
from neo_jax.sampling_params import SamplingParams
from neo_jax.scheduler import Scheduler
from neo_jax.sequence import Request, RequestStatus, pending_token

MAX_MODEL_LEN = 64
STOP = 9


def scheduler_with(*max_tokens: int) -> tuple[Scheduler, list[Request]]:
    config = EngineConfig(model="tiny", block_size=4, max_num_batched_tokens=32, max_num_seqs=4)
    scheduler = Scheduler(config, BlockPool("gpu", 32, 4))
    requests = [Request(i, [5, 6, 7], SamplingParams(max_tokens=n, stop_token_ids=(STOP,)), seed=0)
                for i, n in enumerate(max_tokens)]
    for request in requests:
        scheduler.add(request)
    return scheduler, requests


def schedule(scheduler: Scheduler) -> tuple[list[ScheduledChunk], list[Request | None]]:
    """A step's chunks and sampled rows (a padding row last)."""
    chunks = scheduler.schedule()
    return chunks, [c.request for c in chunks if c.samples] + [None]


def launch(scheduler: Scheduler) -> list[Request | None]:
    """Schedules a step and advances it, as the engine does when nothing is in flight; its sampled rows."""
    chunks, rows = schedule(scheduler)
    advance_step(scheduler, chunks, rows, MAX_MODEL_LEN)
    return rows


def test_a_launched_step_holds_pending_tokens_until_its_tokens_are_booked():
    scheduler, requests = scheduler_with(4, 4)
    rows = launch(scheduler)
    assert [r.output_token_ids for r in requests] == [[pending_token(0)], [pending_token(1)]]
    assert all(r.num_computed_tokens == 3 and r.num_ready_output_tokens == 0 for r in requests)
    assert book_tokens(scheduler, rows, np.array([11, 12, 0]), (), MAX_MODEL_LEN) == []
    assert [r.output_token_ids for r in requests] == [[11], [12]]


def test_a_request_at_its_length_limit_finishes_at_launch_and_returns_with_its_token():
    scheduler, (short, long) = scheduler_with(1, 4)
    rows = launch(scheduler)
    assert short.status is RequestStatus.FINISHED and short not in scheduler.running
    assert scheduler.pool.num_free_blocks == scheduler.pool.num_usable_blocks - 1  # its block is free again
    _, next_rows = schedule(scheduler)  # before the first step's tokens are known: the long request only
    assert next_rows == [long, None]
    assert book_tokens(scheduler, rows, np.array([STOP, 12, 0]), (), MAX_MODEL_LEN) == [short]
    assert short.output_token_ids == [STOP] and short.finish_reason == "stop"  # the stop token takes precedence


def test_a_stop_token_drops_the_row_of_the_step_already_launched():
    scheduler, (stopping, other) = scheduler_with(8, 8)
    first = launch(scheduler)
    chunks, second = schedule(scheduler)  # both decode again before the first step's tokens are fetched
    assert book_tokens(scheduler, first, np.array([STOP, 12, 0]), (), MAX_MODEL_LEN) == [stopping]
    assert stopping.finish_reason == "stop" and stopping.output_token_ids == [STOP]
    advance_step(scheduler, chunks, second, MAX_MODEL_LEN)
    assert book_tokens(scheduler, second, np.array([13, 14, 0]), (), MAX_MODEL_LEN) == []
    assert stopping.output_token_ids == [STOP]  # its second row was dropped
    assert other.output_token_ids == [12, 14] and other.num_computed_tokens == 4


def test_a_preempted_request_that_stops_leaves_the_queue():
    config = EngineConfig(model="tiny", block_size=4, max_num_batched_tokens=32, max_num_seqs=4)
    scheduler = Scheduler(config, BlockPool("gpu", 4, 4))  # 3 usable blocks
    requests = [Request(i, [5, 6, 7, 8], SamplingParams(max_tokens=8, stop_token_ids=(STOP,)), seed=0)
                for i in range(2)]
    for request in requests:
        scheduler.add(request)
    rows = launch(scheduler)  # a block each
    schedule(scheduler)  # each decode needs a second block: the newest request is preempted
    preempted = requests[1]
    assert preempted.status is RequestStatus.WAITING and preempted.output_token_ids == [pending_token(1)]
    assert book_tokens(scheduler, rows, np.array([12, STOP, 0]), (), MAX_MODEL_LEN) == [preempted]
    assert preempted not in scheduler.waiting and preempted.finish_reason == "stop"
