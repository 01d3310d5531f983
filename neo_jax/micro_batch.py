"""The predicted per-layer times of the two micro-batches while a plan is built, and the rules that place CPU
decodes in them and drop host-bound prefills from batch-0.

Batch j's CPU attention overlaps the other batch's linear layers plus its own GPU attention (see
neo_jax/pipeline_step.py); its spare time is that GPU time minus the CPU attention and handoff.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

from neo_jax.cost_model import CostModel
from neo_jax.step_plan import CPU, DecodeView


class Prefill(NamedTuple):
    request_id: int
    num_tokens: int
    pool: str
    seconds: float  # GPU attention per layer


class MicroBatch:
    """Running per-layer predicted times of one micro-batch while requests are added."""

    __slots__ = ("cost", "tokens", "requests", "prefills", "prefill_s", "gpu_decode_ids", "gpu_context",
                 "gpu_decode_s", "cpu_decode_ids", "cpu_context", "linear_s", "cpu_s")

    def __init__(self, cost: CostModel) -> None:
        self.cost = cost
        self.tokens = self.requests = self.gpu_context = self.cpu_context = 0
        self.prefill_s = self.gpu_decode_s = self.linear_s = self.cpu_s = 0.0
        self.prefills: list[Prefill] = []
        self.gpu_decode_ids: list[int] = []
        self.cpu_decode_ids: list[int] = []

    @property
    def gpu_s(self) -> float:
        return self.linear_s + self.prefill_s + self.gpu_decode_s

    def _resize(self, tokens: int, requests: int) -> None:
        self.tokens, self.requests = tokens, requests
        self.linear_s = self.cost.linear_time(tokens)

    def add_prefill(self, prefill: Prefill) -> None:
        self.prefills.append(prefill)
        self.prefill_s += prefill.seconds
        self._resize(self.tokens + prefill.num_tokens, self.requests + 1)

    def pop_prefill(self) -> Prefill:
        prefill = self.prefills.pop()
        self.prefill_s -= prefill.seconds
        self._resize(self.tokens - prefill.num_tokens, self.requests - 1)
        return prefill

    def add_gpu_decodes(self, decodes: Sequence[DecodeView]) -> None:
        self.gpu_decode_ids.extend(d.request_id for d in decodes)
        self.gpu_context += sum(d.context_len for d in decodes)
        self.gpu_decode_s = self.cost.gpu_decode_attention_time(self.gpu_context)
        self._resize(self.tokens + len(decodes), self.requests + len(decodes))

    def add_cpu_decodes(self, decodes: Sequence[DecodeView]) -> None:
        self.cpu_decode_ids.extend(d.request_id for d in decodes)
        self.cpu_context += sum(d.context_len for d in decodes)
        requests = len(self.cpu_decode_ids)
        self.cpu_s = self.cost.cpu_decode_attention_time(requests, self.cpu_context) + self.cost.handoff_time(requests)
        self._resize(self.tokens + len(decodes), self.requests + len(decodes))

    def copy(self) -> MicroBatch:
        twin = MicroBatch(self.cost)
        for name in self.__slots__:
            value = getattr(self, name)
            setattr(twin, name, value.copy() if isinstance(value, list) else value)
        return twin


def spare_times(batch0: MicroBatch, batch1: MicroBatch) -> tuple[float, float]:
    """GPU time that batch j's CPU attention overlaps, minus that CPU attention."""
    return (batch1.linear_s + batch0.prefill_s + batch0.gpu_decode_s - batch0.cpu_s,
            batch0.linear_s + batch1.prefill_s + batch1.gpu_decode_s - batch1.cpu_s)


def pipelined_layer_s(batch0: MicroBatch, batch1: MicroBatch) -> float:
    spare0, spare1 = spare_times(batch0, batch1)
    return batch0.gpu_s + batch1.gpu_s + max(0.0, -spare0) + max(0.0, -spare1)


def _requests_per_s(requests: int, layer_s: float, cost: CostModel) -> float:
    return requests / (layer_s * cost.num_layers) if layer_s > 0.0 else 0.0


def gpu_only_rate(batch: MicroBatch) -> float:
    """Predicted requests per second of a step that runs `batch` alone."""
    return _requests_per_s(batch.requests, batch.gpu_s, batch.cost)


def pipelined_rate(batch0: MicroBatch, batch1: MicroBatch) -> float:
    """Predicted requests per second of a step that pipelines the two batches."""
    return _requests_per_s(batch0.requests + batch1.requests, pipelined_layer_s(batch0, batch1), batch0.cost)


def offer_cpu_decodes(batches: tuple[MicroBatch, MicroBatch], queue: Sequence[DecodeView], limit: int) -> None:
    """Offers up to `limit` CPU decodes, in queue order, each to the batch with more spare time.
    One that would drive a spare time negative waits, and so does every later one at least as long."""
    cost = batches[0].cost
    cpu_attention, handoff, linear = cost.cpu_decode_attention, cost.handoff, cost.linear  # arguments >= 1 here
    gpu_attention_s = [b.prefill_s + b.gpu_decode_s for b in batches]
    # What one more CPU decode costs a batch besides its own attention; recomputed only on acceptance.
    next_handoff_s = [handoff(len(b.cpu_decode_ids) + 1) for b in batches]
    next_linear_s = [linear(b.tokens + 1) for b in batches]
    shortest_rejected = math.inf
    target, accepted = 1, 0
    for decode in queue:
        if accepted >= limit:
            break
        context = decode.context_len
        if context >= shortest_rejected:
            continue
        batch, other = batches[target], batches[1 - target]
        requests = len(batch.cpu_decode_ids) + 1
        cpu_s = cpu_attention(requests, batch.cpu_context + context) + next_handoff_s[target]
        spare = other.linear_s + gpu_attention_s[target] - cpu_s
        other_spare = next_linear_s[target] + gpu_attention_s[1 - target] - other.cpu_s
        if spare < 0.0 or other_spare < 0.0:
            shortest_rejected = context
            continue
        batch.cpu_decode_ids.append(decode.request_id)
        batch.cpu_context += context
        batch.cpu_s, batch.linear_s = cpu_s, next_linear_s[target]
        batch.tokens += 1
        batch.requests += 1
        next_handoff_s[target] = handoff(requests + 1)
        next_linear_s[target] = linear(batch.tokens + 1)
        accepted += 1
        target = target if spare > other_spare else 1 - target


def split_cpu_decodes(batches: tuple[MicroBatch, MicroBatch], queue: Sequence[DecodeView]) -> None:
    """All of `queue` on the CPU, each decode to the half with less CPU context so far."""
    halves: tuple[list[DecodeView], list[DecodeView]] = ([], [])
    contexts = [batches[0].cpu_context, batches[1].cpu_context]
    for decode in queue:
        half = 0 if contexts[0] < contexts[1] else 1
        halves[half].append(decode)
        contexts[half] += decode.context_len
    for batch, half in zip(batches, halves):
        batch.add_cpu_decodes(half)


def trim_host_prefills(batch: MicroBatch, rate: Callable[[], float], keeps_hidden: Callable[[], bool]) -> None:
    """Drops the latest host-bound prefills while that raises the predicted rate, keeps CPU
    attention hidden and keeps the batch at least as wide as the linear layers' knee."""
    knee = batch.cost.linear_knee_tokens
    while (batch.prefills and batch.prefills[-1].pool == CPU
           and batch.tokens - batch.prefills[-1].num_tokens >= knee):
        before = rate()
        dropped = batch.pop_prefill()
        if rate() <= before or not keeps_hidden():
            batch.add_prefill(dropped)
            return
