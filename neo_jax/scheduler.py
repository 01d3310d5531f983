"""Continuous batching for the GPU-only policy: which tokens of which requests each step computes.

Every step first serves the running requests, oldest first (a decode is one token, an unfinished prompt
continues with its next chunk), then admits waiting requests in arrival order, all under the step's token
budget (`max_num_batched_tokens`) and `max_num_seqs`. A prompt longer than what is left of the budget is
prefilled in chunks over several steps. When the pool has no block for a running request, the newest running
request is preempted: its blocks are freed and it goes back to the front of the queue to be recomputed.
"""

from __future__ import annotations

import collections
import dataclasses

from neo_jax.batch import ScheduledChunk
from neo_jax.block_manager import BlockPool
from neo_jax.config import EngineConfig
from neo_jax.sequence import Request, RequestStatus


@dataclasses.dataclass
class SchedulerStats:
    """Counters summed over the steps scheduled so far."""

    num_steps: int = 0
    num_preemptions: int = 0
    num_partial_prefills: int = 0  # prefill chunks that stop short of their request's last token
    gpu_kv_tokens_read: int = 0    # context tokens that GPU attention read (decodes and prefills)
    cpu_kv_tokens_read: int = 0    # context tokens that CPU attention read
    num_pipelined_steps: int = 0   # steps with a batch-1
    num_swap_out: int = 0
    num_swap_in: int = 0

    def count_chunks(self, gpu_chunks: list[ScheduledChunk], cpu_chunks: list[ScheduledChunk]) -> None:
        self.num_steps += 1
        for chunk in gpu_chunks:
            end = chunk.start + chunk.num_tokens
            self.gpu_kv_tokens_read += end
            self.num_partial_prefills += end < chunk.request.num_tokens
        self.cpu_kv_tokens_read += sum(c.start + c.num_tokens for c in cpu_chunks)


class Scheduler:
    """The GPU-only policy's scheduler; `pool` is the GPU pool."""

    def __init__(self, config: EngineConfig, pool: BlockPool) -> None:
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_num_seqs = config.max_num_seqs
        self.pool = pool
        self.pools = {pool.name: pool}
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.stats = SchedulerStats()

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledChunk]:
        """The chunks of this step, with their blocks allocated; running requests first."""
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted = False
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_tokens = min(request.num_uncomputed_tokens, budget)
            while not self.pool.can_hold(request, request.num_computed_tokens + num_tokens):
                self._preempt(self.running.pop())
                preempted = True
                if index == len(self.running):
                    break
            else:
                self._take(request, num_tokens, chunks)
                budget -= num_tokens
                index += 1
        while (self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs):
            request = self.waiting[0]
            num_tokens = min(request.num_uncomputed_tokens, budget)
            if not self.pool.can_hold(request, num_tokens):
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._take(request, num_tokens, chunks)
            budget -= num_tokens
        self.stats.count_chunks(chunks, [])
        return chunks

    def _take(self, request: Request, num_tokens: int, chunks: list[ScheduledChunk]) -> None:
        self.pool.grow(request, request.num_computed_tokens + num_tokens)
        chunks.append(ScheduledChunk(request, num_tokens))

    def _free(self, request: Request) -> None:
        if request.kv_pool is not None:
            self.pools[request.kv_pool].free(request)

    def _preempt(self, request: Request) -> None:
        self._free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self._requeue(request)
        self.stats.num_preemptions += 1

    def _requeue(self, request: Request) -> None:
        """Puts a preempted request back in the queue, which stays in arrival (request id) order: it goes after
        the earlier requests preempted before it and ahead of every request that has not run yet."""
        position = 0
        while position < len(self.waiting) and self.waiting[position].request_id < request.request_id:
            position += 1
        self.waiting.insert(position, request)

    def finish(self, request: Request, reason: str) -> None:
        """Ends a request, running or preempted (waiting to be recomputed), and frees its blocks."""
        (self.running if request.status is RequestStatus.RUNNING else self.waiting).remove(request)
        self._free(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
