"""Scheduling policies on a synthetic cost model: admission, swaps, hiding, balance, budgets."""

import dataclasses
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neo_jax.cost_model import CostModel, MachineId
from neo_jax.cost_tables import Table1D, Table2D
from neo_jax.neo_policy import plan_step
from neo_jax.step_plan import DecodeView, PoolState, PrefillView, StepBudget, StepPlan

MS = 1e-3
BIG_BUDGET = StepBudget(max_num_tokens=100_000, max_num_seqs=10_000)


def synthetic_cost(handoff_s: float = 0.0) -> CostModel:
    """Linear layers: 1 ms flat up to 100 tokens, then +10 us a token. Prefill attention: 1 us a
    prompt token. GPU decode attention: 1 ns a context token. CPU attention: 10 ns a context token."""
    return CostModel(
        model="synthetic", machine=MachineId("cpu", 1, "gpu"), dtype="bfloat16", block_size=16, num_layers=2,
        linear=Table1D((1, 100, 1000), (1 * MS, 1 * MS, 10 * MS)),
        prefill_attention=Table1D((0, 1000), (0.0, 1 * MS)),
        gpu_decode_attention=Table1D((0, 1e6), (0.0, 1 * MS)),
        cpu_decode_attention=Table2D((1, 1000), (0, 1e5), ((0.0, 1 * MS), (0.0, 1 * MS))),
        handoff=Table1D((1,), (handoff_s,)),
    )


COST = synthetic_cost()


def pools(gpu_free: int = 1000, cpu_free: int = 10_000, gpu_total: int = 1000, cpu_total: int = 10_000) -> PoolState:
    return PoolState(block_size=16, gpu_total_blocks=gpu_total, gpu_free_blocks=gpu_free,
                     cpu_total_blocks=cpu_total, cpu_free_blocks=cpu_free)


def prefill(request_id: int, num_tokens: int, arrival: int | None = None, pool: str | None = None) -> PrefillView:
    return PrefillView(request_id, num_tokens, num_tokens, request_id if arrival is None else arrival, pool)


def decode(request_id: int, context_len: int, pool: str, arrival: int | None = None) -> DecodeView:
    return DecodeView(request_id, context_len, pool, request_id if arrival is None else arrival)


def plan(policy: str = "neo", waiting=(), running=(), pool_state: PoolState | None = None,
         budget: StepBudget = BIG_BUDGET, cost: CostModel = COST, **kwargs) -> StepPlan:
    return plan_step(policy, list(waiting), list(running), pool_state or pools(), budget, cost, **kwargs)


def test_prefills_are_admitted_in_arrival_order_whatever_the_input_order():
    waiting = [prefill(i, 10, arrival=a) for i, a in zip((7, 3, 9, 1), (2, 0, 3, 1))]
    result = plan(waiting=waiting)
    assert result.prefill_ids_gpu == [3, 1, 7, 9] and result.prefill_ids_cpu == []


def test_admission_stops_at_the_first_prefill_that_fits_nowhere():
    waiting = [prefill(0, 16), prefill(1, 48), prefill(2, 16)]   # 1, 3 and 1 blocks
    result = plan(waiting=waiting, pool_state=pools(gpu_free=2, cpu_free=0))
    assert result.prefill_ids_gpu == [0] and result.prefill_ids_cpu == []


def test_after_one_prefill_went_to_the_host_later_ones_follow_it():
    waiting = [prefill(0, 16), prefill(1, 48), prefill(2, 16)]
    result = plan(waiting=waiting, pool_state=pools(gpu_free=2, cpu_free=10))
    assert result.prefill_ids_gpu == [0] and result.prefill_ids_cpu == [1, 2]


def test_a_chunk_stays_in_the_pool_of_its_earlier_chunks():
    waiting = [PrefillView(0, 16, 48, 0, pool="cpu"), prefill(1, 16, arrival=1)]
    result = plan(waiting=waiting)
    assert result.prefill_ids_cpu == [0, 1] and result.prefill_ids_gpu == []


@pytest.mark.parametrize("num_gpu_decodes, num_waiting, offloaded", [
    (100, 3, []),                   # 103 requests in two 1 ms passes against 100 in one
    (2, 1, []),                     # 3 in two passes against 2 in one
    (2, 3, [1000, 1001, 1002]),     # 5 in two passes beat 2 in one
])
def test_new_prompts_take_the_host_pool_only_if_their_decodes_would_pipeline(num_gpu_decodes, num_waiting, offloaded):
    running = [decode(i, 18, "gpu") for i in range(num_gpu_decodes)]
    waiting = [prefill(1000 + i, 40) for i in range(num_waiting)]
    result = plan(waiting=waiting, running=running, pool_state=pools(gpu_total=200, gpu_free=0))
    assert result.prefill_ids_cpu == offloaded and result.prefill_ids_gpu == []


def test_a_new_prompt_never_takes_gpu_room_ahead_of_an_older_host_request():
    # The host request needs 21 blocks and 10 are free: it stays on the host, and so does the prompt
    # that one free block would take.
    running = [decode(0, 18, "gpu"), decode(1, 321, "cpu")]
    result = plan(waiting=[prefill(1000, 16)], running=running, pool_state=pools(gpu_total=100, gpu_free=10))
    assert result.swap_in_ids == [] and result.prefill_ids_gpu == [] and result.prefill_ids_cpu == [1000]


@pytest.mark.parametrize("running, prompt_len", [
    ([], 40),                                           # nothing on the GPU would ever free room
    ([decode(0, 18, "gpu"), decode(1, 18, "gpu")], 200),   # 13 blocks: more than the whole GPU pool
])
def test_a_prompt_goes_to_the_host_where_gpu_room_cannot_come(running, prompt_len):
    result = plan(waiting=[prefill(1000, prompt_len)], running=running, pool_state=pools(gpu_total=10, gpu_free=0))
    assert result.prefill_ids_cpu == [1000]


def test_a_host_chunk_goes_on_even_where_new_prompts_would_wait():
    # One new prompt alone would wait (3 requests in two passes against 2 in one); after the chunk it
    # follows to the host, as later prompts always do.
    running = [decode(0, 18, "gpu"), decode(1, 18, "gpu")]
    waiting = [PrefillView(1000, 16, 48, 0, pool="cpu"), prefill(1001, 40, arrival=1)]
    result = plan(waiting=waiting, running=running, pool_state=pools(gpu_total=200, gpu_free=0))
    assert result.prefill_ids_cpu == [1000, 1001]


@pytest.mark.parametrize("budget, granted", [
    (StepBudget(max_num_tokens=2 + 80, max_num_seqs=100), {10: 40, 11: 40}),   # two decodes + two prompts
    (StepBudget(max_num_tokens=2 + 90, max_num_seqs=100), {10: 40, 11: 40, 12: 10}),   # + a 10-token chunk
    (StepBudget(max_num_tokens=10_000, max_num_seqs=3), {10: 40}),
])
def test_budgets_cap_the_step(budget, granted):
    running = [decode(0, 10, "gpu"), decode(1, 10, "gpu")]
    waiting = [prefill(10 + i, 40) for i in range(3)]
    for policy in ("neo", "gpu-only"):
        result = plan(policy, waiting, running, budget=budget)
        assert result.prefill_ids_gpu == list(granted) and result.prefill_num_tokens == granted
        assert result.batch0_gpu_decode_ids == [0, 1]


def test_a_long_prompt_is_chunked_to_the_budget_and_takes_blocks_for_the_chunk():
    waiting = [PrefillView(0, 1000, 1016, 0, pool="gpu")]   # 16 tokens (one block) already computed
    result = plan(waiting=waiting, budget=StepBudget(max_num_tokens=64, max_num_seqs=8), pool_state=pools(gpu_free=4))
    assert result.prefill_ids_gpu == [0] and result.prefill_num_tokens == {0: 64}
    assert plan(waiting=waiting, budget=StepBudget(64, 8), pool_state=pools(gpu_free=3)).prefill_ids_gpu == []


def test_gpu_overflow_swaps_out_the_newest_decodes():
    running = [decode(i, 17, "gpu") for i in range(3)]   # each holds one block and opens another
    result = plan(running=running, pool_state=pools(gpu_free=0, gpu_total=3))
    assert result.swap_out_ids == [1, 2] and result.swap_in_ids == []
    assert result.batch0_gpu_decode_ids == [0]


def test_budget_overflow_swaps_out_too():
    running = [decode(i, 10, "gpu") for i in range(4)]
    result = plan(running=running, budget=StepBudget(max_num_tokens=1000, max_num_seqs=3))
    assert result.swap_out_ids == [3] and result.batch0_gpu_decode_ids == [0, 1, 2]


def test_swap_out_without_host_room_preempts():
    running = [decode(i, 17, "gpu") for i in range(3)]
    result = plan(running=running, pool_state=pools(gpu_free=0, gpu_total=3, cpu_free=3))
    assert result.swap_out_ids == [2] and result.preempt_ids == [1]


@pytest.mark.parametrize("gpu_free, watermark, swapped_in", [
    (20, 0.95, [4]),     # 80 used + 11 blocks = 91 <= 95
    (14, 0.95, []),      # 86 + 11 = 97 > 95, yet under 100: neither swap in nor out
    (14, 1.0, [4]),
])
def test_swap_in_takes_the_oldest_host_request_under_the_watermark(gpu_free, watermark, swapped_in):
    running = [decode(5, 161, "cpu", arrival=9), decode(4, 161, "cpu", arrival=3)]   # 11 blocks each
    result = plan(running=running, pool_state=pools(gpu_free=gpu_free, gpu_total=100),
                  swap_in_watermark=watermark)
    assert result.swap_in_ids == swapped_in and result.swap_out_ids == []
    assert set(swapped_in) <= set(result.batch0_gpu_decode_ids)


def test_a_step_that_swaps_out_swaps_nothing_in():
    running = [decode(0, 17, "gpu"), decode(1, 17, "gpu"), decode(2, 2, "cpu")]
    result = plan(running=running, pool_state=pools(gpu_free=0, gpu_total=50))
    assert result.swap_out_ids == [1] and result.swap_in_ids == []


def test_host_decodes_are_hidden_under_gpu_time_and_balanced():
    # Each batch hides up to ~1 ms of CPU attention (the other batch's linear layers): 100k tokens.
    contexts = [60_000, 30_000, 50_000, 70_000, 25_000, 10_000]
    running = [decode(0, 2, "gpu")] + [decode(i + 1, c, "cpu") for i, c in enumerate(contexts)]
    result = plan(running=running, pool_state=pools(gpu_total=10_000, gpu_free=0))
    assert result.pipelined
    assert result.batch1_cpu_decode_ids == [1, 5]        # 60k + 25k
    assert result.batch0_cpu_decode_ids == [2, 3, 6]     # 30k + 50k + 10k; 70k waits
    assert result.batch0_gpu_decode_ids == [0]
    assert result.pipelined_rate > result.gpu_only_rate > 0


def test_a_host_decode_too_long_to_hide_waits_and_so_do_longer_later_ones():
    running = [decode(0, 2, "gpu"), decode(1, 150_000, "cpu"), decode(2, 150_000, "cpu"), decode(3, 5_000, "cpu")]
    result = plan(running=running, pool_state=pools(gpu_total=20_000, gpu_free=0))
    assert result.batch1_cpu_decode_ids == [3] and result.batch0_cpu_decode_ids == []


def test_handoff_cost_counts_against_the_spare_time():
    running = [decode(0, 2, "gpu"), decode(1, 60_000, "cpu")]
    assert plan(running=running, pool_state=pools(gpu_total=10_000, gpu_free=0)).pipelined
    slow_handoff = plan(running=running, pool_state=pools(gpu_total=10_000, gpu_free=0),
                        cost=synthetic_cost(handoff_s=0.5 * MS))
    assert not slow_handoff.pipelined and slow_handoff.batch1_cpu_decode_ids == []


def test_gpu_only_plan_wins_when_pipelining_would_lose():
    # 100 GPU decodes fill the flat part of the linear layers; a second pass for one host decode
    # would double the layer time for 1% more requests.
    running = [decode(i, 18, "gpu") for i in range(100)] + [decode(100, 1000, "cpu")]
    result = plan(running=running, pool_state=pools(gpu_total=200, gpu_free=0))
    assert not result.pipelined
    assert result.batch0_cpu_decode_ids == result.batch1_cpu_decode_ids == []
    assert len(result.batch0_gpu_decode_ids) == 100
    assert result.gpu_only_rate > result.pipelined_rate > 0
    assert result.predicted_step_s == pytest.approx(2 * (1 * MS + 100 * 18 * 1e-9))


def test_host_prefills_are_trimmed_from_batch0_while_that_pays():
    running = ([decode(i, 18, "gpu") for i in range(50)]
               + [decode(100 + i, 1000, "cpu") for i in range(150)])
    # 1000 continues a prompt on the GPU; new prompts go to the host behind the host decodes.
    waiting = [PrefillView(1000, 16, 32, 1000, pool="gpu"), prefill(1001, 400), prefill(1002, 400)]
    result = plan(waiting=waiting, running=running, pool_state=pools(gpu_total=200, gpu_free=2))
    # Batch-0's 866 tokens give batch-1 room to hide all 150 host decodes. Dropping the newest host
    # prefill keeps them hidden and shortens the step; dropping the next would take batch-0 below
    # the linear layers' knee (100 tokens); the GPU-bound prefill is never dropped.
    assert result.pipelined
    assert result.prefill_ids_gpu == [1000] and result.prefill_ids_cpu == [1001]
    assert len(result.batch1_cpu_decode_ids) == 150


@pytest.mark.parametrize("host_context, kept", [(3000, [1000]), (6000, [1000, 1001])])
def test_a_host_prefill_is_dropped_only_if_cpu_attention_stays_hidden(host_context, kept):
    # Batch-1's 50 host decodes take 1.5 or 3 ms of CPU attention, hidden under batch-0's 7 ms of
    # linear layers; without the 500-token prefill those take 2 ms: enough to hide 1.5 ms, not 3.
    running = [decode(0, 18, "gpu"), decode(1, 18, "gpu")] + [decode(10 + i, host_context, "cpu") for i in range(50)]
    waiting = [prefill(1000, 200), prefill(1001, 500)]
    result = plan(waiting=waiting, running=running, pool_state=pools(gpu_total=200, gpu_free=0))
    assert result.pipelined and len(result.batch1_cpu_decode_ids) == 50
    assert result.prefill_ids_cpu == kept


def test_a_host_prefill_cheaper_than_the_average_request_stays():
    # Dropping 20 tokens saves ~0.22 ms of a ~6.8 ms step that serves 6 requests: the rate would fall.
    running = [decode(0, 18, "gpu"), decode(1, 18, "gpu"), decode(2, 1000, "cpu"), decode(3, 1000, "cpu")]
    waiting = [prefill(10, 500), prefill(11, 20)]
    result = plan(waiting=waiting, running=running, pool_state=pools(gpu_total=200, gpu_free=0))
    assert result.pipelined and result.prefill_ids_cpu == [10, 11]


class CountingTable2D(Table2D):
    calls = 0

    def __call__(self, row, column):
        CountingTable2D.calls += 1
        return super().__call__(row, column)


def test_after_a_rejection_no_longer_host_decode_is_even_priced():
    cost = synthetic_cost()
    counting = CountingTable2D(cost.cpu_decode_attention.rows, cost.cpu_decode_attention.columns,
                               cost.cpu_decode_attention.seconds)
    cost = dataclasses.replace(cost, cpu_decode_attention=counting)
    running = ([decode(0, 2, "gpu"), decode(1, 150_000, "cpu")] + [decode(2 + i, 150_000 + i, "cpu") for i in range(50)]
               + [decode(100, 5_000, "cpu")])
    CountingTable2D.calls = 0
    result = plan(running=running, pool_state=pools(gpu_total=20_000, gpu_free=0), cost=cost)
    assert result.batch1_cpu_decode_ids == [100]
    assert CountingTable2D.calls == 2


def test_only_host_requests_left_still_make_progress():
    running = [decode(i, 200_000, "cpu") for i in range(4)]
    result = plan(running=running, pool_state=pools(gpu_total=10, gpu_free=0))
    assert result.pipelined and result.swap_in_ids == []
    assert sorted(result.batch0_cpu_decode_ids + result.batch1_cpu_decode_ids) == [0, 1, 2, 3]


def test_host_overflow_preempts_the_newest_host_request():
    running = [decode(0, 17, "cpu"), decode(1, 17, "cpu"), decode(2, 2, "gpu")]   # both host ones open a block
    result = plan(running=running, pool_state=pools(gpu_free=0, gpu_total=1, cpu_free=1))
    assert result.preempt_ids == [1]


def test_cpu_all_moves_every_decode_to_the_host_in_balanced_halves():
    running = [decode(i, 1000, "gpu" if i < 4 else "cpu") for i in range(8)]
    result = plan("cpu-all", waiting=[prefill(20, 32)], running=running)
    assert result.swap_out_ids == [0, 1, 2, 3] and result.pipelined
    assert result.prefill_ids_cpu == [20] and result.prefill_ids_gpu == [] and result.batch0_gpu_decode_ids == []
    assert sorted(result.batch0_cpu_decode_ids + result.batch1_cpu_decode_ids) == list(range(8))
    assert len(result.batch0_cpu_decode_ids) == len(result.batch1_cpu_decode_ids) == 4


def test_cpu_all_preempts_what_the_host_cannot_hold():
    running = [decode(0, 20, "gpu"), decode(1, 20, "gpu")]   # two blocks each on the host
    result = plan("cpu-all", running=running, pool_state=pools(cpu_free=3))
    assert result.swap_out_ids == [0] and result.preempt_ids == [1]


def test_gpu_only_preempts_the_newest_when_blocks_run_out():
    running = [decode(0, 17, "gpu"), decode(1, 33, "gpu"), decode(2, 49, "gpu")]   # hold 1, 2, 3 blocks
    result = plan("gpu-only", waiting=[prefill(9, 16)], running=running, pool_state=pools(gpu_free=0))
    assert result.preempt_ids == [2] and result.batch0_gpu_decode_ids == [0, 1]
    assert result.prefill_ids_gpu == [] and not result.pipelined and result.swap_out_ids == []


def test_gpu_only_never_uses_the_host_pool():
    result = plan("gpu-only", waiting=[prefill(0, 16), prefill(1, 16)], pool_state=pools(gpu_free=1))
    assert result.prefill_ids_gpu == [0] and result.prefill_ids_cpu == []
    with pytest.raises(ValueError, match="pool 'cpu' is not used by policy 'gpu-only'"):
        plan("gpu-only", running=[decode(0, 5, "cpu")])


@pytest.mark.parametrize("make, message", [
    (lambda: plan("vllm"), "policy: 'vllm'"),
    (lambda: plan(swap_in_watermark=0.0), "swap_in_watermark"),
    (lambda: plan(waiting=[prefill(1, 4)], running=[decode(1, 4, "gpu")]), "request_id 1 appears more than once"),
    (lambda: decode(0, 4, "disk"), "DecodeView.pool"),
    (lambda: decode(0, 0, "gpu"), "DecodeView.context_len"),
    (lambda: PrefillView(0, 8, 4, 0), "PrefillView.context_len"),
    (lambda: PrefillView(0, 8, 8, 0, pool="tape"), "PrefillView.pool"),
    (lambda: pools(gpu_free=5, gpu_total=4), "PoolState.gpu_free_blocks"),
    (lambda: StepBudget(0, 5), "StepBudget.max_num_tokens"),
])
def test_bad_input_is_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def blocks(tokens: int) -> int:
    return -(-tokens // 16)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), policy=st.sampled_from(["neo", "cpu-all", "gpu-only"]))
def test_plans_respect_budgets_pools_and_arrival_order(seed, policy):
    rng = random.Random(seed)
    gpu_pool = "gpu" if policy == "gpu-only" else None
    arrivals = rng.sample(range(1000), 70)   # distinct, in no particular order
    running = [decode(i, rng.randint(1, 3000), gpu_pool or rng.choice(["gpu", "cpu"]), arrival=arrivals[i])
               for i in range(rng.randint(0, 60))]
    waiting = [prefill(1000 + i, rng.randint(1, 300), arrival=1000 + arrivals[60 + i])
               for i in range(rng.randint(0, 8))]
    gpu_held = sum(blocks(d.context_len - 1) for d in running if d.pool == "gpu")
    cpu_held = sum(blocks(d.context_len - 1) for d in running if d.pool == "cpu")
    state = pools(gpu_free=rng.randint(0, 60), cpu_free=rng.randint(0, 400))
    state = pools(gpu_free=state.gpu_free_blocks, gpu_total=gpu_held + state.gpu_free_blocks,
                  cpu_free=state.cpu_free_blocks, cpu_total=cpu_held + state.cpu_free_blocks)
    budget = StepBudget(max_num_tokens=rng.randint(300, 2000), max_num_seqs=rng.randint(1, 80))
    result = plan(policy, waiting, running, state, budget)

    by_id = {v.request_id: v for v in [*waiting, *running]}
    prefill_ids = result.prefill_ids_gpu + result.prefill_ids_cpu
    decode_ids = result.batch0_gpu_decode_ids + result.batch0_cpu_decode_ids + result.batch1_cpu_decode_ids
    scheduled = prefill_ids + decode_ids
    assert len(set(scheduled + result.preempt_ids)) == len(scheduled) + len(result.preempt_ids)
    assert not (result.swap_in_ids and result.swap_out_ids)
    assert len(scheduled) <= budget.max_num_seqs
    assert set(result.prefill_num_tokens) == set(prefill_ids)
    assert all(0 < result.prefill_num_tokens[i] <= by_id[i].num_tokens for i in prefill_ids)
    assert sum(result.prefill_num_tokens.values()) + len(decode_ids) <= budget.max_num_tokens
    in_order = [v.request_id for v in sorted(waiting, key=lambda v: v.arrival)]
    assert sorted(prefill_ids, key=lambda i: by_id[i].arrival) == in_order[:len(prefill_ids)]
    gpu_resident = {d.request_id for d in running if d.pool == "gpu"}
    if policy == "neo":   # a GPU decode runs, moves or is preempted; it never just waits
        assert gpu_resident <= set(result.batch0_gpu_decode_ids + result.swap_out_ids + result.preempt_ids)
    if policy == "neo" and result.prefill_ids_cpu:
        first_host = min(by_id[i].arrival for i in result.prefill_ids_cpu)
        assert all(by_id[i].arrival < first_host for i in result.prefill_ids_gpu)

    moved_to_gpu = set(result.swap_in_ids)
    gpu_used = sum(blocks(by_id[i].context_len) for i in result.batch0_gpu_decode_ids)
    gpu_used += sum(blocks(result.prefill_num_tokens[i]) for i in result.prefill_ids_gpu)
    waiting_on_gpu = [d for d in running if d.pool == "gpu" and d.request_id not in result.batch0_gpu_decode_ids
                      and d.request_id not in result.swap_out_ids + result.preempt_ids]
    gpu_used += sum(blocks(d.context_len - 1) for d in waiting_on_gpu)
    assert gpu_used <= state.gpu_total_blocks
    left_host = moved_to_gpu | set(result.preempt_ids)
    host_resident = [d for d in running if (d.pool == "cpu" and d.request_id not in left_host)
                     or d.request_id in result.swap_out_ids]
    host_used = sum(blocks(d.context_len) for d in host_resident)
    host_used += sum(blocks(result.prefill_num_tokens[i]) for i in result.prefill_ids_cpu)
    assert host_used <= state.cpu_total_blocks
    if result.pipelined and result.gpu_only_rate > 0:
        assert result.pipelined_rate > result.gpu_only_rate
    assert result.predicted_step_s >= 0.0 and (result.predicted_step_s > 0) == bool(scheduled)
