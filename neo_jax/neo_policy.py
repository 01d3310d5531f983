"""The per-step decision layer: which requests run, where their KV lives, how the two batches split.

The engine's scheduler describes each step with plain views (`DecodeView`, `PrefillView`,
`PoolState`, `StepBudget`) and calls `plan_step` once; the returned `StepPlan` lists request ids
only. Swaps and preemptions in a plan take effect before the step's forward pass, so a request
swapped out in this step may already decode on the CPU in it.

Policies:
- "gpu-only": vLLM-like, one batch on the GPU, no host pool.
- "cpu-all": FastDecode-like, every decode's KV on the host and its attention on the CPU, in two
  halves that overlap each other's GPU work.
- "neo": NEO's load-aware rule (MLSys 2025, section 4): keep the GPU pool full, offload what does
  not fit, hide CPU attention under GPU time, and take the two-batch plan only when the cost model
  predicts it beats the one-batch plan.
Pure Python: no JAX.
"""

from __future__ import annotations

import dataclasses
import math
from operator import attrgetter
from typing import Callable, NamedTuple, Sequence

from neo_jax.cost_model import CostModel

GPU, CPU = "gpu", "cpu"
POLICIES = ("gpu-only", "cpu-all", "neo")
_by_arrival = attrgetter("arrival")


def _check_positive(owner: str, **values: int) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{owner}.{name}: must be positive, got {value}")


@dataclasses.dataclass(slots=True)
class DecodeView:
    """A running request that decodes one token this step. Mutable and slotted so that building
    hundreds per step stays cheap (an engine may also keep one per request and update it)."""

    request_id: int
    context_len: int   # KV tokens once this step's token is appended
    pool: str          # "gpu" or "cpu": where its KV lives now
    arrival: int       # arrival order; smaller is earlier

    def __post_init__(self) -> None:
        if self.context_len < 1:
            raise ValueError(f"DecodeView.context_len: must be positive, got {self.context_len}")
        if self.pool != GPU and self.pool != CPU:
            raise ValueError(f"DecodeView.pool: must be 'gpu' or 'cpu', got {self.pool!r}")


@dataclasses.dataclass(slots=True)
class PrefillView:
    """A request with prompt tokens left to compute. When the step's token budget runs short, the
    last prefill admitted gets a shorter chunk (`StepPlan.prefill_num_tokens`)."""

    request_id: int
    num_tokens: int          # prompt tokens it would compute this step (all it has left, or a cap)
    context_len: int         # KV tokens after those
    arrival: int             # arrival order; smaller is earlier
    pool: str | None = None  # pool holding its earlier chunks' KV; None before its first chunk

    def __post_init__(self) -> None:
        if self.num_tokens < 1:
            raise ValueError(f"PrefillView.num_tokens: must be positive, got {self.num_tokens}")
        if self.context_len < self.num_tokens:
            raise ValueError(f"PrefillView.context_len: {self.context_len} is below num_tokens {self.num_tokens}")
        if self.pool not in (None, GPU, CPU):
            raise ValueError(f"PrefillView.pool: must be None, 'gpu' or 'cpu', got {self.pool!r}")


@dataclasses.dataclass(frozen=True)
class PoolState:
    """Blocks of the two KV pools before this step allocates anything."""

    block_size: int
    gpu_total_blocks: int
    gpu_free_blocks: int
    cpu_total_blocks: int
    cpu_free_blocks: int

    def __post_init__(self) -> None:
        _check_positive("PoolState", block_size=self.block_size)
        for pool in (GPU, CPU):
            total, free = getattr(self, f"{pool}_total_blocks"), getattr(self, f"{pool}_free_blocks")
            if not 0 <= free <= total:
                raise ValueError(f"PoolState.{pool}_free_blocks: {free} is not within [0, {pool}_total_blocks={total}]")


@dataclasses.dataclass(frozen=True)
class StepBudget:
    """Limits on one step over both batches: a decode costs one token, a prefill its chunk."""

    max_num_tokens: int
    max_num_seqs: int

    def __post_init__(self) -> None:
        _check_positive("StepBudget", max_num_tokens=self.max_num_tokens, max_num_seqs=self.max_num_seqs)


@dataclasses.dataclass
class StepPlan:
    """One step's decisions, as request ids in arrival order. Prefills and GPU decodes run in
    batch-0; batch-1 (only when `pipelined`) holds CPU decodes; requests named nowhere wait."""

    policy: str
    pipelined: bool = False
    prefill_ids_gpu: list[int] = dataclasses.field(default_factory=list)   # KV into the GPU pool
    prefill_ids_cpu: list[int] = dataclasses.field(default_factory=list)   # KV into the host pool
    swap_out_ids: list[int] = dataclasses.field(default_factory=list)      # GPU -> host, before the step
    swap_in_ids: list[int] = dataclasses.field(default_factory=list)       # host -> GPU, before the step
    preempt_ids: list[int] = dataclasses.field(default_factory=list)       # KV freed: no pool has room
    prefill_num_tokens: dict[int, int] = dataclasses.field(default_factory=dict)  # chunk granted per prefill
    batch0_gpu_decode_ids: list[int] = dataclasses.field(default_factory=list)
    batch0_cpu_decode_ids: list[int] = dataclasses.field(default_factory=list)
    batch1_cpu_decode_ids: list[int] = dataclasses.field(default_factory=list)
    predicted_step_s: float = 0.0   # the chosen plan, all layers
    pipelined_rate: float = 0.0     # requests/s predicted for the two-batch plan; 0 when none was formed
    gpu_only_rate: float = 0.0      # requests/s predicted for the one-batch plan

    @property
    def num_requests(self) -> int:
        return (len(self.prefill_ids_gpu) + len(self.prefill_ids_cpu) + len(self.batch0_gpu_decode_ids)
                + len(self.batch0_cpu_decode_ids) + len(self.batch1_cpu_decode_ids))


class _Prefill(NamedTuple):
    request_id: int
    num_tokens: int
    pool: str
    seconds: float  # GPU attention per layer


class _Batch:
    """Running per-layer predicted times of one micro-batch while requests are added."""

    __slots__ = ("cost", "tokens", "requests", "prefills", "prefill_s", "gpu_decode_ids", "gpu_context",
                 "gpu_decode_s", "cpu_decode_ids", "cpu_context", "linear_s", "cpu_s")

    def __init__(self, cost: CostModel) -> None:
        self.cost = cost
        self.tokens = self.requests = self.gpu_context = self.cpu_context = 0
        self.prefill_s = self.gpu_decode_s = self.linear_s = self.cpu_s = 0.0
        self.prefills: list[_Prefill] = []
        self.gpu_decode_ids: list[int] = []
        self.cpu_decode_ids: list[int] = []

    @property
    def gpu_s(self) -> float:
        return self.linear_s + self.prefill_s + self.gpu_decode_s

    def _resize(self, tokens: int, requests: int) -> None:
        self.tokens, self.requests = tokens, requests
        self.linear_s = self.cost.linear_time(tokens)

    def add_prefill(self, prefill: _Prefill) -> None:
        self.prefills.append(prefill)
        self.prefill_s += prefill.seconds
        self._resize(self.tokens + prefill.num_tokens, self.requests + 1)

    def pop_prefill(self) -> _Prefill:
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

    def copy(self) -> _Batch:
        twin = _Batch(self.cost)
        for name in self.__slots__:
            value = getattr(self, name)
            setattr(twin, name, value.copy() if isinstance(value, list) else value)
        return twin


def _spares(batch0: _Batch, batch1: _Batch) -> tuple[float, float]:
    """GPU time that batch j's CPU attention overlaps, minus that CPU attention."""
    return (batch1.linear_s + batch0.prefill_s + batch0.gpu_decode_s - batch0.cpu_s,
            batch0.linear_s + batch1.prefill_s + batch1.gpu_decode_s - batch1.cpu_s)


def _pipelined_layer_s(batch0: _Batch, batch1: _Batch) -> float:
    spare0, spare1 = _spares(batch0, batch1)
    return batch0.gpu_s + batch1.gpu_s + max(0.0, -spare0) + max(0.0, -spare1)


def _rate(requests: int, layer_s: float, cost: CostModel) -> float:
    return requests / (layer_s * cost.num_layers) if layer_s > 0.0 else 0.0


def _offer_cpu_decodes(batches: tuple[_Batch, _Batch], queue: Sequence[DecodeView], limit: int) -> None:
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


def _split_cpu_decodes(batches: tuple[_Batch, _Batch], queue: Sequence[DecodeView]) -> None:
    """All of `queue` on the CPU, each decode to the half with less CPU context so far."""
    halves: tuple[list[DecodeView], list[DecodeView]] = ([], [])
    contexts = [batches[0].cpu_context, batches[1].cpu_context]
    for decode in queue:
        half = 0 if contexts[0] < contexts[1] else 1
        halves[half].append(decode)
        contexts[half] += decode.context_len
    for batch, half in zip(batches, halves):
        batch.add_cpu_decodes(half)


def _trim_host_prefills(batch: _Batch, rate: Callable[[], float], keeps_hidden: Callable[[], bool]) -> None:
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


class _Admission:
    """Free blocks and budget left while one step's requests are admitted."""

    def __init__(self, pools: PoolState, budget: StepBudget, cost: CostModel) -> None:
        self.block_size, self.cost = pools.block_size, cost
        self.gpu_total = pools.gpu_total_blocks
        self.gpu_free, self.host_free = pools.gpu_free_blocks, pools.cpu_free_blocks
        self.seqs_left, self.tokens_left = budget.max_num_seqs, budget.max_num_tokens

    def blocks(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def opened_blocks(self, decodes: Sequence[DecodeView]) -> list[bool]:
        """Per decode, whether this step's token opens a new block."""
        return [(d.context_len - 1) % self.block_size == 0 for d in decodes]

    def admit_prefills(self, waiting: Sequence[PrefillView], use_gpu: bool, use_host: bool) -> list[_Prefill]:
        """In arrival order, to the GPU pool while it has room and no earlier one went to the host,
        else to the host pool; stops at the first that fits nowhere."""
        admitted: list[_Prefill] = []
        host_taken = False
        for view in sorted(waiting, key=_by_arrival):
            num_tokens = min(view.num_tokens, self.tokens_left)
            if self.seqs_left < 1 or num_tokens < 1:
                break
            start = view.context_len - view.num_tokens
            need = self.blocks(start + num_tokens) - self.blocks(start)
            fits_gpu = use_gpu and need <= self.gpu_free and not host_taken
            pool = view.pool or (GPU if fits_gpu else CPU)
            if pool == GPU and need <= self.gpu_free:
                self.gpu_free -= need
            elif pool == CPU and use_host and need <= self.host_free:
                self.host_free -= need
                host_taken = True
            else:
                break
            self.seqs_left -= 1
            self.tokens_left -= num_tokens
            seconds = self.cost.prefill_attention_time(num_tokens, start + num_tokens)
            admitted.append(_Prefill(view.request_id, num_tokens, pool, seconds))
        return admitted

    def swap_out(self, decode: DecodeView) -> bool:
        """Frees its GPU blocks; moves them (and its next token's) to the host if there is room.
        False means no room: the request is preempted instead."""
        self.gpu_free += self.blocks(decode.context_len - 1)
        if self.blocks(decode.context_len) > self.host_free:
            return False
        self.host_free -= self.blocks(decode.context_len)
        return True

    def preempt_host_overflow(self, host_decodes: list[DecodeView], plan: StepPlan) -> None:
        """Preempts the newest host-resident decodes while the host pool cannot take the next tokens."""
        preempted = []
        while self.host_free < 0 and host_decodes:
            victim = host_decodes.pop()
            self.host_free += self.blocks(victim.context_len)
            preempted.append(victim.request_id)
        plan.preempt_ids.extend(reversed(preempted))


def _fill(plan: StepPlan, batch0: _Batch, batch1: _Batch) -> StepPlan:
    plan.prefill_ids_gpu = [p.request_id for p in batch0.prefills if p.pool == GPU]
    plan.prefill_ids_cpu = [p.request_id for p in batch0.prefills if p.pool == CPU]
    plan.prefill_num_tokens = {p.request_id: p.num_tokens for p in batch0.prefills}
    plan.batch0_gpu_decode_ids = batch0.gpu_decode_ids
    plan.batch0_cpu_decode_ids = batch0.cpu_decode_ids
    plan.batch1_cpu_decode_ids = batch1.cpu_decode_ids
    plan.pipelined = bool(batch1.cpu_decode_ids)
    plan.predicted_step_s = _pipelined_layer_s(batch0, batch1) * batch0.cost.num_layers
    return plan


def _first_batch(prefills: Sequence[_Prefill], gpu_decodes: Sequence[DecodeView], cost: CostModel) -> _Batch:
    batch = _Batch(cost)
    for prefill in prefills:
        batch.add_prefill(prefill)
    batch.add_gpu_decodes(gpu_decodes)
    return batch


def _plan_gpu_only(waiting: Sequence[PrefillView], decodes: Sequence[DecodeView], state: _Admission,
                   cost: CostModel) -> StepPlan:
    """Oldest decodes first; when one needs a block and none is free, the newest are preempted."""
    plan = StepPlan("gpu-only")
    queue = sorted(decodes, key=_by_arrival)
    opens_block = state.opened_blocks(queue)
    scheduled, end, limit = 0, len(queue), min(state.seqs_left, state.tokens_left)
    stop = min(end, limit)
    while scheduled < stop:
        if opens_block[scheduled] and state.gpu_free < 1:
            end -= 1
            stop = min(end, limit)
            state.gpu_free += state.blocks(queue[end].context_len - 1)
            plan.preempt_ids.append(queue[end].request_id)
            continue
        state.gpu_free -= opens_block[scheduled]
        scheduled += 1
    state.seqs_left -= scheduled
    state.tokens_left -= scheduled
    plan.preempt_ids.reverse()
    prefills = [] if plan.preempt_ids else state.admit_prefills(waiting, use_gpu=True, use_host=False)
    batch0 = _first_batch(prefills, queue[:scheduled], cost)
    plan.gpu_only_rate = _rate(batch0.requests, batch0.gpu_s, cost)
    return _fill(plan, batch0, _Batch(cost))


def _plan_cpu_all(waiting: Sequence[PrefillView], decodes: Sequence[DecodeView], state: _Admission,
                  cost: CostModel) -> StepPlan:
    """Every decode on the CPU in two halves; decodes take the budget before new prefills."""
    plan = StepPlan("cpu-all")
    host_decodes = sorted((d for d in decodes if d.pool == CPU), key=_by_arrival)
    state.host_free -= sum(state.opened_blocks(host_decodes))
    moved_out = []
    for decode in sorted((d for d in decodes if d.pool == GPU), key=_by_arrival):
        if state.swap_out(decode):
            moved_out.append(decode)
        else:
            plan.preempt_ids.append(decode.request_id)
    plan.swap_out_ids = [d.request_id for d in moved_out]
    state.preempt_host_overflow(host_decodes, plan)
    queue = sorted(host_decodes + moved_out, key=_by_arrival)[:min(state.seqs_left, state.tokens_left)]
    state.seqs_left -= len(queue)
    state.tokens_left -= len(queue)
    batches = (_first_batch(state.admit_prefills(waiting, use_gpu=False, use_host=True), (), cost), _Batch(cost))
    _split_cpu_decodes(batches, queue)
    plan.pipelined_rate = _rate(batches[0].requests + batches[1].requests, _pipelined_layer_s(*batches), cost)
    return _fill(plan, *batches)


def _plan_neo(waiting: Sequence[PrefillView], decodes: Sequence[DecodeView], state: _Admission,
              cost: CostModel, swap_in_watermark: float) -> StepPlan:
    plan = StepPlan("neo")
    gpu_decodes = sorted((d for d in decodes if d.pool == GPU), key=_by_arrival)
    host_decodes = sorted((d for d in decodes if d.pool == CPU), key=_by_arrival)
    gpu_opened = state.opened_blocks(gpu_decodes)
    state.gpu_free -= sum(gpu_opened)
    state.host_free -= sum(state.opened_blocks(host_decodes))
    state.seqs_left -= len(gpu_decodes)
    state.tokens_left -= len(gpu_decodes)
    moved_out, preempted = [], []
    while gpu_decodes and (state.gpu_free < 0 or state.seqs_left < 0 or state.tokens_left < 0):
        victim = gpu_decodes.pop()
        state.gpu_free += gpu_opened.pop()
        state.seqs_left += 1
        state.tokens_left += 1
        (moved_out if state.swap_out(victim) else preempted).append(victim)
    plan.swap_out_ids = [d.request_id for d in reversed(moved_out)]
    plan.preempt_ids = [d.request_id for d in reversed(preempted)]
    if moved_out or preempted:
        host_decodes = sorted(host_decodes + moved_out, key=_by_arrival)
    else:
        gpu_limit, count = swap_in_watermark * state.gpu_total, 0
        for decode in host_decodes:
            blocks = state.blocks(decode.context_len)
            if (state.seqs_left < 1 or state.tokens_left < 1
                    or state.gpu_total - state.gpu_free + blocks > gpu_limit):
                break
            state.gpu_free -= blocks
            state.host_free += blocks
            state.seqs_left -= 1
            state.tokens_left -= 1
            count += 1
        plan.swap_in_ids = [d.request_id for d in host_decodes[:count]]
        if count:
            gpu_decodes = sorted(gpu_decodes + host_decodes[:count], key=_by_arrival)
            host_decodes = host_decodes[count:]
    state.preempt_host_overflow(host_decodes, plan)

    batch0 = _first_batch(state.admit_prefills(waiting, use_gpu=True, use_host=True), gpu_decodes, cost)
    gpu_only = batch0.copy()
    _trim_host_prefills(gpu_only, lambda: _rate(gpu_only.requests, gpu_only.gpu_s, cost), lambda: True)
    plan.gpu_only_rate = _rate(gpu_only.requests, gpu_only.gpu_s, cost)
    batch1 = _Batch(cost)
    _offer_cpu_decodes((batch0, batch1), host_decodes, min(state.seqs_left, state.tokens_left))
    if batch1.cpu_decode_ids:
        def pipelined_rate() -> float:
            return _rate(batch0.requests + batch1.requests, _pipelined_layer_s(batch0, batch1), cost)

        _trim_host_prefills(batch0, pipelined_rate, lambda: min(_spares(batch0, batch1)) >= 0.0)
        plan.pipelined_rate = pipelined_rate()
    if plan.pipelined_rate > plan.gpu_only_rate:
        return _fill(plan, batch0, batch1)
    if gpu_only.requests == 0 and host_decodes:
        # Nothing on the GPU to hide CPU attention under: run the host decodes unhidden rather than stall.
        batches = (_Batch(cost), _Batch(cost))
        _split_cpu_decodes(batches, host_decodes[:max(0, min(state.seqs_left, state.tokens_left))])
        plan.pipelined_rate = _rate(batches[0].requests + batches[1].requests, _pipelined_layer_s(*batches), cost)
        return _fill(plan, *batches)
    return _fill(plan, gpu_only, _Batch(cost))


def _check_requests(policy: str, waiting: Sequence[PrefillView], decodes: Sequence[DecodeView]) -> None:
    views = (*waiting, *decodes)
    if len({v.request_id for v in views}) != len(views):
        seen: set[int] = set()
        repeated = next(v.request_id for v in views if v.request_id in seen or seen.add(v.request_id))
        raise ValueError(f"request_id {repeated!r} appears more than once in waiting/running_decodes")
    if policy == "gpu-only" and any(v.pool == CPU for v in views):
        culprit = next(v.request_id for v in views if v.pool == CPU)
        raise ValueError(f"request {culprit!r}: pool 'cpu' is not used by policy 'gpu-only'")


def plan_step(policy: str, waiting: Sequence[PrefillView], running_decodes: Sequence[DecodeView],
              pools: PoolState, budget: StepBudget, cost_model: CostModel, *,
              swap_in_watermark: float = 0.95) -> StepPlan:
    """Plans one step. `swap_in_watermark`: "neo" swaps host requests back only while GPU pool
    usage stays at or under this fraction (it swaps out only above 100%)."""
    if policy not in POLICIES:
        raise ValueError(f"policy: {policy!r} is not one of {POLICIES}")
    if not 0.0 < swap_in_watermark <= 1.0:
        raise ValueError(f"swap_in_watermark: must be in (0, 1], got {swap_in_watermark}")
    _check_requests(policy, waiting, running_decodes)
    state = _Admission(pools, budget, cost_model)
    if policy == "gpu-only":
        return _plan_gpu_only(waiting, running_decodes, state, cost_model)
    if policy == "cpu-all":
        return _plan_cpu_all(waiting, running_decodes, state, cost_model)
    return _plan_neo(waiting, running_decodes, state, cost_model, swap_in_watermark)
