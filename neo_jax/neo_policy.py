"""The per-step decision layer: which requests run, where their KV lives, how the two batches split.

The engine's scheduler describes each step with plain views (`DecodeView`, `PrefillView`,
`PoolState`, `StepBudget`, in neo_jax/step_plan.py) and calls `plan_step` once; the returned
`StepPlan` lists request ids only. Swaps and preemptions in a plan take effect before the step's
forward pass, so a request swapped out in this step may already decode on the CPU in it.

Policies:
- "gpu-only": vLLM-like, one batch on the GPU, no host pool.
- "cpu-all": FastDecode-like, every decode's KV on the host and its attention on the CPU, in two
  halves that overlap each other's GPU work.
- "neo": NEO's load-aware rule (MLSys 2025, section 4): keep the GPU pool full, offload what does
  not fit (new prompts only where their decodes would pipeline; else they wait, as in gpu-only),
  hide CPU attention under GPU time, and take the two-batch plan only when the cost model predicts
  it beats the one-batch plan.
Pure Python: no JAX.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Callable, Sequence

from neo_jax.cost_model import CostModel
from neo_jax.micro_batch import (MicroBatch, Prefill, gpu_only_rate, offer_cpu_decodes, pipelined_layer_s,
                                 pipelined_rate, spare_times, split_cpu_decodes, trim_host_prefills)
from neo_jax.step_plan import CPU, GPU, POLICIES, DecodeView, PoolState, PrefillView, StepBudget, StepPlan

_by_arrival = attrgetter("arrival")
# (prompts admitted to the GPU pool this step, waiting prompts from the first one bound for the host) -> bool
OffloadRule = Callable[[Sequence[PrefillView], Sequence[PrefillView]], bool]


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

    def admit_prefills(self, waiting: Sequence[PrefillView], use_gpu: bool, use_host: bool,
                       offload_pays: OffloadRule = lambda on_gpu, rest: True) -> list[Prefill]:
        """In arrival order, to the GPU pool while it has room and no earlier one went to the host,
        else to the host pool; stops at the first that fits nowhere. Chunks follow their earlier
        chunks' pool; the first new prompt bound for the host goes only if `offload_pays(the prompts
        admitted to the GPU, the rest from it on)`."""
        admitted: list[Prefill] = []
        host_taken = False
        ordered = sorted(waiting, key=_by_arrival)
        for position, view in enumerate(ordered):
            num_tokens = min(view.num_tokens, self.tokens_left)
            if self.seqs_left < 1 or num_tokens < 1:
                break
            start = view.context_len - view.num_tokens
            need = self.blocks(start + num_tokens) - self.blocks(start)
            fits_gpu = use_gpu and need <= self.gpu_free and not host_taken
            pool = view.pool or (GPU if fits_gpu else CPU)
            if pool == GPU and need <= self.gpu_free:
                self.gpu_free -= need
            elif (pool == CPU and use_host and need <= self.host_free
                  and (host_taken or view.pool == CPU or offload_pays(ordered[:position], ordered[position:]))):
                self.host_free -= need
                host_taken = True
            else:
                break
            self.seqs_left -= 1
            self.tokens_left -= num_tokens
            seconds = self.cost.prefill_attention_time(num_tokens, start + num_tokens)
            admitted.append(Prefill(view.request_id, num_tokens, pool, seconds))
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


def _fill(plan: StepPlan, batch0: MicroBatch, batch1: MicroBatch) -> StepPlan:
    plan.prefill_ids_gpu = [p.request_id for p in batch0.prefills if p.pool == GPU]
    plan.prefill_ids_cpu = [p.request_id for p in batch0.prefills if p.pool == CPU]
    plan.prefill_num_tokens = {p.request_id: p.num_tokens for p in batch0.prefills}
    plan.batch0_gpu_decode_ids = batch0.gpu_decode_ids
    plan.batch0_cpu_decode_ids = batch0.cpu_decode_ids
    plan.batch1_cpu_decode_ids = batch1.cpu_decode_ids
    plan.pipelined = bool(batch1.cpu_decode_ids)
    plan.predicted_step_s = pipelined_layer_s(batch0, batch1) * batch0.cost.num_layers
    return plan


def _first_batch(prefills: Sequence[Prefill], gpu_decodes: Sequence[DecodeView], cost: CostModel) -> MicroBatch:
    batch = MicroBatch(cost)
    for prefill in prefills:
        batch.add_prefill(prefill)
    batch.add_gpu_decodes(gpu_decodes)
    return batch


def _offloading_pays(gpu_decodes: Sequence[DecodeView], host_decodes: Sequence[DecodeView], state: _Admission,
                     cost: CostModel, on_gpu: Sequence[PrefillView], rest: Sequence[PrefillView]) -> bool:
    """Whether a decode step of this step's GPU decodes and prompts on the GPU, with this step's host
    decodes plus the rest's new prompts (as many as the host pool and the budget take) as host
    decodes, is predicted to pipeline faster than its GPU side alone. If not, a prompt sent to the
    host would only wait there to be swapped in: a copy that waiting for GPU room never pays. True
    where no room can come: nothing runs on the GPU, or the prompt needs more than the whole pool."""
    gpu = [*gpu_decodes, *(DecodeView(v.request_id, v.context_len, GPU, v.arrival) for v in on_gpu)]
    if not gpu or state.blocks(rest[0].context_len) > state.gpu_total:
        return True
    batch0, batch1 = _first_batch((), gpu, cost), MicroBatch(cost)
    alone = gpu_only_rate(batch0)
    candidates, host_free = list(host_decodes), state.host_free
    for view in rest:
        host_free -= state.blocks(view.context_len)
        if view.pool is not None or host_free < 0 or len(candidates) >= state.seqs_left:
            break
        candidates.append(DecodeView(view.request_id, view.context_len, CPU, view.arrival))
    offer_cpu_decodes((batch0, batch1), candidates, len(candidates))
    return pipelined_rate(batch0, batch1) > alone


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
    plan.gpu_only_rate = gpu_only_rate(batch0)
    return _fill(plan, batch0, MicroBatch(cost))


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
    batches = (_first_batch(state.admit_prefills(waiting, use_gpu=False, use_host=True), (), cost), MicroBatch(cost))
    split_cpu_decodes(batches, queue)
    plan.pipelined_rate = pipelined_rate(*batches)
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

    # New prompts take GPU room only when no older request waits on the host for it: a prompt let into
    # the room a swap-out freed soon overflows the pool again (scripts/simulate_schedule.py on issue 6's
    # (a) with the H200's table: 59 swap steps before this rule and the offload check, 36 after).
    prefills = state.admit_prefills(
        waiting, use_gpu=not host_decodes, use_host=True,
        offload_pays=lambda on_gpu, rest: _offloading_pays(gpu_decodes, host_decodes, state, cost, on_gpu, rest))
    batch0 = _first_batch(prefills, gpu_decodes, cost)
    gpu_only = batch0.copy()
    trim_host_prefills(gpu_only, lambda: gpu_only_rate(gpu_only), lambda: True)
    plan.gpu_only_rate = gpu_only_rate(gpu_only)
    batch1 = MicroBatch(cost)
    offer_cpu_decodes((batch0, batch1), host_decodes, min(state.seqs_left, state.tokens_left))
    if batch1.cpu_decode_ids:
        trim_host_prefills(batch0, lambda: pipelined_rate(batch0, batch1),
                           lambda: min(spare_times(batch0, batch1)) >= 0.0)
        plan.pipelined_rate = pipelined_rate(batch0, batch1)
    if plan.pipelined_rate > plan.gpu_only_rate:
        return _fill(plan, batch0, batch1)
    if gpu_only.requests == 0 and host_decodes:
        # Nothing on the GPU to hide CPU attention under: run the host decodes unhidden rather than stall.
        batches = (MicroBatch(cost), MicroBatch(cost))
        split_cpu_decodes(batches, host_decodes[:max(0, min(state.seqs_left, state.tokens_left))])
        plan.pipelined_rate = pipelined_rate(*batches)
        return _fill(plan, *batches)
    return _fill(plan, gpu_only, MicroBatch(cost))


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
