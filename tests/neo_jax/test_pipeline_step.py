"""The order the pipelined step's compiled schedule gives the host calls and the GPU work between them.

Per layer l, the CPU's batch-1 attention must be started before batch-0's GPU work of layer l and waited for
after it, and batch-0's CPU share must be started before batch-1's projections and waited for after them:

    start share(l) < [batch-0 GPU attention] < wait batch-1(l) < [batch-1 post-attention + QKV(l+1)]
                   < start batch-1(l+1) < wait share(l)

The entry computation of XLA's scheduled module lists its instructions in execution order, so the test reads
the custom calls' positions there and counts the matmuls (instructions reading a weight matrix) between them.
Since XLA orders instructions by their operands alone, the order must also be data: the other tests follow the
entry computation's operands from each GPU attention back to the starts it overlaps (its layer's share and
batch-1's), and from each start back to the stores of a swap-out whose request it reads. The host calls are
pure to XLA (no effects, so JAX dispatches the step from C++): the last tests check that and that a swap-out's
stores stay in a step that has no CPU attention to read their token.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neo_jax.batch import ScheduledChunk
from neo_jax.block_manager import BlockPool, blocks_for
from neo_jax.config import EngineConfig
from neo_jax.engine import load_model
from neo_jax.host_inputs import pack_host_inputs
from neo_jax.kv_cache import allocate_host_kv_pool
from neo_jax.model_runner import ModelRunner, jitted_pipeline_step
from neo_jax.models.config import PRESETS
from neo_jax.pipeline_batch import KvMove, PipelineSchedule, pack_pipeline_step
from neo_jax import pipeline_step as pipeline_step_module
from neo_jax.pipeline_step import pipeline_step, swap_calls, swap_kv
from neo_jax.sampler import pack_sampling
from neo_jax.sampling_params import SamplingParams
from neo_jax.sequence import Request

CONTEXT = 20
BLOCK_SIZE = 4
GPU_ROWS, SHARE_ROWS, BATCH1_ROWS = 2, 2, 4  # decode buckets start at 2


def decodes(pool: BlockPool, first_id: int, count: int, vocab_size: int) -> list[ScheduledChunk]:
    """`count` requests of CONTEXT tokens whose last token is decoded this step."""
    rng = np.random.default_rng(first_id)
    chunks = []
    for request_id in range(first_id, first_id + count):
        request = Request(request_id, rng.integers(3, vocab_size, CONTEXT).tolist(),
                          SamplingParams(temperature=0.0, max_tokens=1), seed=0)
        request.num_computed_tokens = CONTEXT - 1
        pool.grow(request, CONTEXT)
        chunks.append(ScheduledChunk(request, 1))
    return chunks


def pipeline_step_args(swap_out: bool, share: bool = True, batch1: bool = True, swap_in: bool = False,
                       host_prefill: bool = False) -> tuple:
    """The arguments of `jitted_pipeline_step` for a step with GPU decodes, a CPU share (unless not `share`) and
    batch-1 (unless not `batch1`); with `swap_out`, a request's KV is copied from the GPU pool to the host pool
    before the layers (batch-1's first request, which then attends from there); with `swap_in`, the first GPU
    decode's KV comes from the host pool; with `host_prefill`, a prompt is prefilled into the host pool."""
    model_config, params = load_model("tiny", "float32", seed=0)
    config = EngineConfig("tiny", dtype="float32", policy="cpu-all", block_size=BLOCK_SIZE, max_model_len=32,
                          max_num_seqs=8)
    num_blocks = 9 * blocks_for(CONTEXT, BLOCK_SIZE) + 1
    host_pool = allocate_host_kv_pool(model_config, num_blocks, BLOCK_SIZE)
    runner = ModelRunner(model_config, params, config, num_blocks, 32, host_pool)
    vocab = model_config.vocab_size
    gpu_blocks, host_blocks = BlockPool("gpu", num_blocks, BLOCK_SIZE), BlockPool("cpu", num_blocks, BLOCK_SIZE)
    gpu_chunks = decodes(gpu_blocks, 0, GPU_ROWS, vocab)
    batch1_chunks = decodes(host_blocks, 20, BATCH1_ROWS, vocab)
    moves_out, moves_in = [], []
    if swap_out:
        gpu_copy = decodes(gpu_blocks, 30, 1, vocab)[0].request
        moves_out.append(KvMove(batch1_chunks[0].request, source_table=gpu_copy.block_table,
                                target_table=batch1_chunks[0].request.block_table, num_tokens=CONTEXT - 1))
    if swap_in:
        host_copy = decodes(host_blocks, 40, 1, vocab)[0].request
        moves_in.append(KvMove(gpu_chunks[0].request, source_table=host_copy.block_table,
                               target_table=gpu_chunks[0].request.block_table, num_tokens=CONTEXT - 1))
    host_prefill_ids = frozenset()
    if host_prefill:
        prompt = Request(50, list(range(3, 3 + CONTEXT)), SamplingParams(temperature=0.0, max_tokens=1), seed=0)
        host_blocks.grow(prompt, CONTEXT)
        gpu_chunks.append(ScheduledChunk(prompt, CONTEXT))
        host_prefill_ids = frozenset({prompt.request_id})
    schedule = PipelineSchedule(gpu_chunks, host_prefill_ids=host_prefill_ids,
                                batch0_cpu_chunks=decodes(host_blocks, 10, SHARE_ROWS, vocab) if share else [],
                                batch1_cpu_chunks=batch1_chunks if batch1 else [], swap_out=moves_out,
                                swap_in=moves_in)
    batch, rows = pack_pipeline_step(schedule, BLOCK_SIZE, runner.buckets)
    sampling = pack_sampling(rows, model_config.eos_token_ids)
    return params, runner.kv_cache, batch, sampling, model_config, host_pool


def compile_pipeline_step(swap_out: bool, share: bool = True, batch1: bool = True, swap_in: bool = False,
                          host_prefill: bool = False) -> str:
    """The compiled HLO of the step of `pipeline_step_args`."""
    params, kv_cache, batch, sampling, *statics = pipeline_step_args(swap_out, share, batch1, swap_in, host_prefill)
    previous_tokens = jnp.zeros(4 * 8, jnp.int32)  # StepBuckets.max_sampled_rows at max_num_seqs 8
    lowered = jitted_pipeline_step.lower(params, kv_cache, previous_tokens, *pack_host_inputs((batch, sampling)),
                                         *statics)
    return lowered.compile().as_text()


def entry_lines(hlo: str) -> list[str]:
    """The instructions of the module's entry computation, in schedule order."""
    entry = hlo[hlo.index("\nENTRY "):]
    return entry[:entry.index("\n}")].splitlines()[1:]


@pytest.fixture(scope="module")
def entry_schedule() -> tuple[list[str], int]:
    """The instructions of the compiled step's entry computation, in schedule order, and the layer count."""
    return entry_lines(compile_pipeline_step(swap_out=False)), PRESETS["tiny"].num_layers


def weight_names(lines: list[str]) -> set[str]:
    """The entry parameters that are weight matrices (float, rank 2)."""
    names = set()
    for line in lines:
        match = re.match(r"\s*(%\S+) = f(16|32)\[\d+,\d+\]\S* parameter\(", line)
        if match:
            names.add(match.group(1))
    return names


def schedule_events(lines: list[str]) -> list[tuple[str, int]]:
    """("start", rows 0), ("wait", rows of its output), ("attention", 0) and ("matmul", 0) in schedule order."""
    weights = weight_names(lines)
    events = []
    for line in lines:
        if 'custom_call_target="neo_cpu_attention_start"' in line:
            events.append(("start", 0))
        elif 'custom_call_target="neo_cpu_attention_wait"' in line:
            events.append(("wait", int(re.search(r"= \w+\[(\d+),", line).group(1))))
        elif 'custom_call_target="neo_paged_decode_attention"' in line:
            events.append(("attention", 0))
        elif "parameter(" not in line and any(re.search(re.escape(name) + r"\b", line) for name in weights):
            events.append(("matmul", 0))
    return events


def test_host_calls_and_gpu_work_follow_the_pipeline_order(entry_schedule):
    lines, num_layers = entry_schedule
    events = schedule_events(lines)
    calls = [kind for kind, _ in events if kind in ("start", "wait")]
    # batch-1's layer-0 start, then per layer: the share's start, batch-1's wait, batch-1's next start (none
    # after the last layer), the share's wait.
    assert calls == ["start"] + ["start", "wait", "start", "wait"] * (num_layers - 1) + ["start", "wait", "wait"]
    waits = [rows for kind, rows in events if kind == "wait"]
    assert waits == [BATCH1_ROWS, SHARE_ROWS] * num_layers

    def between(first: int, second: int) -> list[str]:
        return [kind for kind, _ in events[first + 1:second]]

    call_positions = [i for i, (kind, _) in enumerate(events) if kind in ("start", "wait")]
    for layer in range(num_layers):
        base = 1 + 4 * layer
        share_start, batch1_wait = call_positions[base], call_positions[base + 1]
        # batch-0's GPU attention runs while the CPU attends for batch-1
        assert "attention" in between(share_start, batch1_wait)
        if layer + 1 < num_layers:
            next_batch1_start, share_wait = call_positions[base + 2], call_positions[base + 3]
            # batch-1's out-projection, MLP and next QKV (5 matmuls: wo, gate, up, down, the fused wqkv) run
            # while the CPU attends for the share
            assert between(batch1_wait, next_batch1_start).count("matmul") >= 5
            # batch-0's out-projection, MLP and next QKV come after the share's wait, before its next start
            assert between(share_wait, call_positions[base + 4]).count("matmul") >= 5
        else:
            share_wait = call_positions[base + 2]
            assert between(batch1_wait, share_wait).count("matmul") >= 4


def operands_by_instruction(lines: list[str]) -> dict[str, list[str]]:
    return {match.group(1): re.findall(r"%[\w.\-]+", match.group(2))
            for match in (re.match(r"\s*(?:ROOT )?(%[\w.\-]+) = (.*)", line) for line in lines) if match}


def instruction_name(line: str) -> str:
    return re.match(r"\s*(?:ROOT )?(%[\w.\-]+) =", line).group(1)


def reaches(operands: dict[str, list[str]], name: str, targets: set[str]) -> bool:
    """Whether instruction `name` depends on one of `targets` through its operands."""
    seen, stack = set(), [name]
    while stack:
        current = stack.pop()
        if current in targets:
            return True
        seen.add(current)
        stack.extend(op for op in operands.get(current, []) if op not in seen)
    return False


@pytest.mark.parametrize("share", [True, False])
def test_gpu_attention_reads_the_tokens_of_the_starts_it_overlaps(share):
    """Data, not only schedule order: batch-0's GPU attention of layer l depends on the starts of layer l's CPU
    share and of batch-1's layer l, so no XLA scheduler can hand those to the CPU after the GPU work that
    should overlap them."""
    lines = entry_lines(compile_pipeline_step(swap_out=False, share=share))
    num_layers = PRESETS["tiny"].num_layers
    operands = operands_by_instruction(lines)
    constants = {instruction_name(line): int(match.group(1)) for line in lines
                 if (match := re.search(r"= s32\[\] constant\((\d+)\)", line))}
    starts = {}  # (rows, layer) -> instruction
    for line in lines:
        if 'custom_call_target="neo_cpu_attention_start"' in line:
            name = instruction_name(line)
            rows = int(re.search(r"num_reqs = (\d+)", line).group(1))
            starts[rows, constants[operands[name][1]]] = name  # operand 1: the layer
    attentions = [instruction_name(line) for line in lines
                  if 'custom_call_target="neo_paged_decode_attention"' in line]
    assert len(attentions) == num_layers
    for layer, attention in enumerate(attentions):  # each layer's attention reads the previous one's output
        assert reaches(operands, attention, {starts[BATCH1_ROWS, layer]}), ("batch-1", layer)
        if share:
            assert reaches(operands, attention, {starts[SHARE_ROWS, layer]}), ("share", layer)


def custom_calls(lines: list[str], target: str) -> list[str]:
    return [instruction_name(line) for line in lines if f'custom_call_target="{target}"' in line]


def test_cpu_attention_starts_after_the_swap_out_stores():
    """A request swapped out this step attends on the CPU in the same step: every start must read the swap's
    token, since XLA orders custom calls by their operands alone (an optimization_barrier did not)."""
    lines = entry_lines(compile_pipeline_step(swap_out=True))
    stores = custom_calls(lines, "neo_host_kv_store")
    assert len(stores) == 1, "the swap-out stores every layer's rows in one call"
    starts = custom_calls(lines, "neo_cpu_attention_start")
    assert len(starts) == 2 * PRESETS["tiny"].num_layers
    assert all(reaches(operands_by_instruction(lines), start, set(stores)) for start in starts)


@pytest.mark.parametrize("batch1", [True, False])
def test_host_pool_writes_follow_the_swap_in_loads(batch1):
    """A swap-in frees its host blocks when the step is planned, so the step's own host-pool writes (the starts'
    appends of new decode tokens, a host prefill's stores) may land in them: each must follow the loads in data.
    The GPU ran such a write first (a swapped-in request's logits were off by 0.1 on the H200): with no
    swap-out, the swaps' token was a loop-invariant zero, which XLA folded out of the starts' operands."""
    lines = entry_lines(compile_pipeline_step(swap_out=False, batch1=batch1, swap_in=True, host_prefill=True))
    loads = set(custom_calls(lines, "neo_host_kv_load"))
    assert len(loads) == 1, "the swap-in loads every layer's rows in one call"
    writers = custom_calls(lines, "neo_cpu_attention_start") + custom_calls(lines, "neo_host_kv_store")
    num_layers = PRESETS["tiny"].num_layers
    assert len(writers) == (3 if batch1 else 2) * num_layers
    operands = operands_by_instruction(lines)
    assert [w for w in writers if not reaches(operands, w, loads)] == []


def test_swap_out_stores_stay_in_a_step_without_cpu_attention():
    """The host calls are pure to XLA, so a store lives only while something reads its token: with no CPU
    attention to take the swaps' token, the step's output must."""
    hlo = compile_pipeline_step(swap_out=True, share=False, batch1=False)
    assert 'custom_call_target="neo_host_kv_store"' in hlo
    assert 'custom_call_target="neo_cpu_attention_start"' not in hlo


@pytest.mark.parametrize("swap_out", [False, True])
def test_the_step_has_no_effects(swap_out):
    """An effect in the jaxpr (e.g. a custom call declared side-effecting) sends every call of the jitted step
    through JAX's Python dispatch instead of its C++ fast path (on the H200, most of the 13 ms by which a
    one-request pipelined step outlasted the GPU-only step)."""
    args = pipeline_step_args(swap_out)
    jaxpr = jax.make_jaxpr(pipeline_step, static_argnums=(4, 5))(*args)
    assert not jaxpr.effects
    assert any(equation.primitive.name == "ffi_call" for equation in jaxpr.jaxpr.eqns)


@pytest.mark.parametrize("layers_per_call", [1, 2, 0.6])
def test_swaps_move_as_many_rows_per_host_call_as_the_byte_caps_allow(monkeypatch, layers_per_call):
    """Every layer's rows, in calls that may cut through a layer."""
    _, kv_cache, batch, _, model_config, host_pool = pipeline_step_args(swap_out=True, swap_in=True)
    num_layers, rng = model_config.num_layers, np.random.default_rng(3)
    k_gpu, v_gpu = (rng.standard_normal(kv_cache.k.shape).astype(np.float32) for _ in "kv")
    host_pool.k_cache[...] = rng.standard_normal(host_pool.k_cache.shape)
    host_pool.v_cache[...] = rng.standard_normal(host_pool.v_cache.shape)
    host_k_before = host_pool.k_cache.copy()
    rows = batch.swap_out_gpu_slots.shape[0]
    row_bytes = 2 * model_config.num_kv_heads * model_config.head_dim * 4
    rows_per_call = int(layers_per_call * rows)
    for cap in ("SWAP_STORE_BYTES", "SWAP_LOAD_BYTES"):
        monkeypatch.setattr(pipeline_step_module, cap, rows_per_call * (row_bytes + 8) + 4 * 256)
    flat = lambda cache: jnp.asarray(cache.reshape(-1, *cache.shape[2:]))  # [L * N, Hkv, bs, Dh]
    swap = jax.jit(lambda k, v, batch: swap_kv(host_pool, k, v, batch, jnp.arange(num_layers)[:, None]))
    hlo = swap.lower(flat(k_gpu), flat(v_gpu), batch).compile().as_text()
    for target in ("neo_host_kv_store", "neo_host_kv_load"):
        assert hlo.count(f'custom_call_target="{target}"') == -(-num_layers * rows // rows_per_call), target
    k_swapped, v_swapped, _ = swap(flat(k_gpu), flat(v_gpu), batch)
    k_swapped = np.asarray(k_swapped).reshape(k_gpu.shape)
    v_swapped = np.asarray(v_swapped).reshape(v_gpu.shape)

    def at(cache, layer, slot):
        return cache[layer, slot // BLOCK_SIZE, :, slot % BLOCK_SIZE]

    moves_out = [(g, h) for g, h in zip(batch.swap_out_gpu_slots.tolist(), batch.swap_out_host_slots.tolist())
                 if h >= 0]
    moves_in = [(h, g) for h, g in zip(batch.swap_in_host_slots.tolist(), batch.swap_in_gpu_slots.tolist())
                if h >= 0]
    assert len(moves_out) == len(moves_in) == CONTEXT - 1
    for layer in range(num_layers):
        for gpu_slot, host_slot in moves_out:
            np.testing.assert_array_equal(at(host_pool.k_cache, layer, host_slot), at(k_gpu, layer, gpu_slot))
            np.testing.assert_array_equal(at(host_pool.v_cache, layer, host_slot), at(v_gpu, layer, gpu_slot))
        for host_slot, gpu_slot in moves_in:
            np.testing.assert_array_equal(at(k_swapped, layer, gpu_slot), at(host_k_before, layer, host_slot))
            np.testing.assert_array_equal(at(v_swapped, layer, gpu_slot), at(host_pool.v_cache, layer, host_slot))


@pytest.mark.parametrize("total_rows,row_bytes,staging_bytes", [(100, 64, 4096), (100, 64, 1 << 20), (7, 1000, 10)])
def test_swap_calls_cover_every_row_once_within_the_staging(total_rows, row_bytes, staging_bytes):
    pieces = swap_calls(total_rows, row_bytes, staging_bytes)
    assert [row for piece in pieces for row in range(total_rows)[piece]] == list(range(total_rows))
    for piece in pieces:
        rows = piece.stop - piece.start
        assert rows == 1 or rows * (row_bytes + 8) + 4 * 256 <= staging_bytes
