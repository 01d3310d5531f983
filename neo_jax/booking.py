"""What a step does to its requests' state, apart from the model: `advance_step` books a launched step's chunks
before its tokens are known (a `pending_token` per sampled row), `book_tokens` puts the fetched tokens in their
place and finishes requests, and `dry_run` drives a scheduler through a workload with every token 0 (no model).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

from neo_jax.batch import ScheduledChunk
from neo_jax.pipeline_batch import PipelineSchedule
from neo_jax.pipeline_scheduler import PipelineScheduler
from neo_jax.sampling_params import SamplingParams
from neo_jax.scheduler import Scheduler
from neo_jax.sequence import Request, RequestStatus, pending_token


def scheduled_chunks(schedule: PipelineSchedule | list[ScheduledChunk]) -> list[ScheduledChunk]:
    """Every chunk a step computes, whichever batch it is in."""
    return schedule.chunks if isinstance(schedule, PipelineSchedule) else schedule


def advance_step(scheduler: Scheduler | PipelineScheduler, chunks: list[ScheduledChunk],
                 sampled_requests: list[Request | None], max_model_len: int) -> None:
    """Books a launched step's chunks on their requests before its tokens are known: row i's token is
    `pending_token(i)` in `sampled_requests[i]` (None: no request), and a request that this token brings to a
    length limit is finished now (its blocks freed for the next step: the device runs the steps in order).
    Requests finished since the step was scheduled (by a stop token fetched meanwhile) are left alone."""
    for chunk in chunks:
        if chunk.request.status is not RequestStatus.FINISHED:
            chunk.request.num_computed_tokens += chunk.num_tokens
    for row, request in enumerate(sampled_requests):
        if request is None or request.status is RequestStatus.FINISHED:
            continue
        request.output_token_ids.append(pending_token(row))
        if request.stop_reason((), max_model_len) is not None:
            scheduler.finish(request, "length")


def book_tokens(scheduler: Scheduler | PipelineScheduler, sampled_requests: list[Request | None],
                tokens: np.ndarray, eos_token_ids: tuple[int, ...], max_model_len: int) -> list[Request]:
    """Puts a fetched step's tokens int32[R] in place of the `pending_token`s that `advance_step` appended;
    returns the requests they finish (those finished by length included, with the reason their last token
    gives: a stop token takes precedence)."""
    finished = []
    for row, request in enumerate(sampled_requests):
        if request is None or not request.output_token_ids or request.output_token_ids[-1] != pending_token(row):
            continue  # no request, or one finished before the step was booked: its row is dropped
        request.output_token_ids[-1] = int(tokens[row])
        reason = request.stop_reason(eos_token_ids, max_model_len)
        if reason is None:
            continue
        if request.status is RequestStatus.FINISHED:
            request.finish_reason = reason
        else:
            scheduler.finish(request, reason)
        finished.append(request)
    return finished


def dry_run(scheduler: Scheduler | PipelineScheduler, requests: Sequence[tuple[Sequence[int], SamplingParams]],
            eos_token_ids: tuple[int, ...], max_model_len: int, arrivals: Sequence[float] | None = None,
            step_seconds: Callable[[], float] = lambda: 0.0,
            ) -> Iterator[PipelineSchedule | list[ScheduledChunk]]:
    """Serves `requests` on `scheduler` without a model, every sampled token taken to be 0, and yields each step's
    schedule before booking it. These are the steps of a real run when no request's length depends on its tokens
    (`ignore_eos`, no stop tokens); otherwise a real run may schedule differently. With `arrivals` (seconds, in
    request order) a request joins once a simulated clock has passed its arrival; each step advances the clock by
    `step_seconds()` (asked after the step is scheduled), an idle scheduler to the next arrival."""
    arrivals = [0.0] * len(requests) if arrivals is None else arrivals
    clock, next_request = 0.0, 0
    while next_request < len(requests) or scheduler.has_unfinished():
        while next_request < len(requests) and arrivals[next_request] <= clock:
            prompt, sampling_params = requests[next_request]
            scheduler.add(Request(next_request, list(prompt), sampling_params, seed=0))
            next_request += 1
        if not scheduler.has_unfinished():
            clock = arrivals[next_request]
            continue
        schedule = scheduler.schedule()
        yield schedule
        chunks = scheduled_chunks(schedule)
        sampled_requests = [c.request for c in chunks if c.samples]
        advance_step(scheduler, chunks, sampled_requests, max_model_len)
        book_tokens(scheduler, sampled_requests, np.zeros(len(sampled_requests), np.int32), eos_token_ids,
                    max_model_len)
        clock += step_seconds()
