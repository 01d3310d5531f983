"""The CPU-GPU pipeline against the GPU-only engine: same tokens, and the same logits.

XLA's CPU matmuls and reductions may round differently when a step's composition changes (which prefills share
it, how the context is padded), so a whole GPU-only run is not a bitwise oracle for a run that schedules
differently. A mirror is: every step the offloading engine takes is replayed by a GPU-only runner on the very
same chunks, with every request's KV in its own GPU cache. Batch-0's GPU rows (GPU decodes, prefills to either
pool) must give the same logits bit for bit. CPU decodes attend through the handoff calls over the host pool
instead of the mirror's paged-attention call, from q/k/v rows that sit elsewhere in other-sized batches than
in the mirror; their rows differed from the mirror's by up to 2.4e-7 with some weights and not with others.
XLA's CPU matmuls are not batch-invariant: a row of a float32 [M, 128] x [128, 512] product (the tiny preset's
LM head) came out up to 1.4e-6 apart for M = 2..32 and M = 64, and a one-row product of a [1, 256] x [256, 768]
one rounded unlike the same row of wider products, while [M, 128] x [128, 128] agreed for every M tried; which
op of a CPU row's path changes its bits was not isolated (a lone batch-1 request matches the plain step bit for
bit). Batch-1 also runs its out-projection and MLP of layer l next to its QKV of layer l+1, which XLA fuses
differently. So the rows of CPU decodes must agree to float32 rounding (the tokens are identical either way).
On a GPU, where XLA fuses each program its own way, every row agrees to float32 rounding (2.7e-7 at most on the
H100); matmuls run at "highest" precision there, since float32 matmuls default to TF32.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from neo_jax.batch import ScheduledChunk
from neo_jax.block_manager import BlockPool
from neo_jax.config import EngineConfig
from neo_jax.cost_model import CostModel, MachineId
from neo_jax.cost_tables import Table1D, Table2D
from neo_jax.engine import LLMEngine
from neo_jax.model_runner import ModelRunner
from neo_jax.pipeline_batch import PipelineSchedule
from neo_jax.sampling_params import SamplingParams
from neo_jax.sequence import Request

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
OPTIONS = dict(max_model_len=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=32)
MS = 1e-3


@pytest.fixture(autouse=True)
def float32_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


def cost_table(tmp_path, cpu_ms_per_1k_tokens: float) -> str:
    """A cost model file: 1 ms linear layers, CPU attention at the given speed, no handoff cost."""
    cpu = cpu_ms_per_1k_tokens * MS
    model = CostModel(
        model="tiny", machine=MachineId("test", 1, "test"), dtype="float32", block_size=4, num_layers=2,
        linear=Table1D((1, 1000), (1 * MS, 2 * MS)), prefill_attention=Table1D((0, 1000), (0.0, 1 * MS)),
        gpu_decode_attention=Table1D((0, 1000), (0.0, 0.2 * MS)),
        cpu_decode_attention=Table2D((1, 100), (0, 1000), ((0.0, cpu), (0.0, cpu))),
        handoff=Table1D((1,), (0.0,)))
    return str(model.save(tmp_path / f"cost_{cpu_ms_per_1k_tokens}.json"))


def prompts(seed: int, count: int = 7) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 250, size=int(rng.integers(2, 30))).tolist() for _ in range(count)]


class GpuOnlyMirror:
    """Replays each step of an engine on a GPU-only runner whose cache holds every request's KV."""

    def __init__(self, engine: LLMEngine) -> None:
        num_blocks = 8 * OPTIONS["max_model_len"] // OPTIONS["block_size"] + 1
        self.pool = BlockPool("gpu", num_blocks, OPTIONS["block_size"])
        self.runner = ModelRunner(engine.model_config, engine.runner.params, engine.config, num_blocks,
                                  engine.max_model_len)
        self.shadows: dict[int, Request] = {}
        self.eos = engine.eos_token_ids

    def replay(self, chunks: list[ScheduledChunk]) -> dict[int, np.ndarray]:
        mirrored = []
        for chunk in chunks:
            request = chunk.request
            shadow = self.shadows.setdefault(request.request_id, Request(
                request.request_id, request.prompt_token_ids, request.sampling_params, request.seed))
            if chunk.start == 0:  # first chunk, or recomputed after a preemption
                self.pool.free(shadow)
            shadow.output_token_ids = list(request.output_token_ids)
            shadow.num_computed_tokens = chunk.start
            self.pool.grow(shadow, chunk.start + chunk.num_tokens)
            mirrored.append(ScheduledChunk(shadow, chunk.num_tokens))
        return self.runner.launch(mirrored, self.eos).logits_by_request()


def step_roles(schedule: PipelineSchedule, request_id: int) -> dict[str, object]:
    """Where a request sits in a step, and what the step does (for a failure's message)."""
    def ids(chunks) -> list[int]:
        return [c.request.request_id for c in chunks]

    role = ("host prefill" if request_id in schedule.host_prefill_ids
            else "batch-0 CPU share" if request_id in ids(schedule.batch0_cpu_chunks)
            else "batch-1" if request_id in ids(schedule.batch1_cpu_chunks) else "batch-0 GPU")
    return {"role": role, "gpu": ids(schedule.gpu_chunks), "host prefills": sorted(schedule.host_prefill_ids),
            "share": ids(schedule.batch0_cpu_chunks), "batch-1": ids(schedule.batch1_cpu_chunks),
            "swap out": [m.request.request_id for m in schedule.swap_out],
            "swap in": [m.request.request_id for m in schedule.swap_in]}


def run_mirrored(config: EngineConfig, prompt_list: list[list[int]]) -> tuple[list[list[int]], LLMEngine, dict]:
    """Generates with the engine while its runner checks each step against the mirror (requests still hold
    their state from before the step when the runner launches it). Scheduling is synchronous, so that no input
    token is still on the device: test_async_scheduling_matches_sync covers the asynchronous engine."""
    engine = LLMEngine(dataclasses.replace(config, async_scheduling=False))
    mirror = GpuOnlyMirror(engine)
    events = {"batch0_cpu_rows": 0, "host_prefills": 0}
    launch = engine.runner.launch

    def launch_and_compare(schedule, eos_token_ids):
        launched = launch(schedule, eos_token_ids)
        logits = launched.logits_by_request()
        expected = mirror.replay(schedule.chunks)
        assert expected.keys() == logits.keys()
        cpu_decode_ids = {c.request.request_id for c in schedule.batch0_cpu_chunks + schedule.batch1_cpu_chunks}
        for request_id, row in logits.items():
            exact = request_id not in cpu_decode_ids and jax.default_backend() == "cpu"
            np.testing.assert_allclose(row, expected[request_id], rtol=0, atol=0 if exact else 2e-6,
                                       err_msg=f"request {request_id} {step_roles(schedule, request_id)} "
                                               f"in step {engine.scheduler.stats.num_steps}")
        events["batch0_cpu_rows"] += len(schedule.batch0_cpu_chunks)
        events["host_prefills"] += len(schedule.host_prefill_ids)
        return launched

    engine.runner.launch = launch_and_compare
    requests = [engine.add_request(p, GREEDY) for p in prompt_list]
    while engine.has_unfinished_requests():
        engine.step()
    return [r.output_token_ids for r in requests], engine, events


@pytest.fixture(scope="module")
def gpu_only_tokens():
    engine = LLMEngine(EngineConfig("tiny", num_gpu_blocks=200, **OPTIONS))
    requests = [engine.add_request(p, GREEDY) for p in prompts(0)]
    while engine.has_unfinished_requests():
        engine.step()
    return [r.output_token_ids for r in requests]


@pytest.mark.parametrize("policy, num_gpu_blocks, num_cpu_blocks, cpu_speed, expected_events", [
    ("cpu-all", 40, 120, 1.0, ("num_pipelined_steps", "host_prefills")),
    # neo sends prompts to the host only where the GPU pool is small enough that their decodes pipeline.
    ("neo", 16, 120, 0.01, ("num_pipelined_steps", "batch0_cpu_rows", "num_swap_out", "host_prefills")),
    ("neo", 24, 120, 100.0, ("num_swap_out", "num_swap_in")),
    ("neo", 14, 20, 0.01, ("num_preemptions", "host_prefills")),
])
def test_offloading_matches_gpu_only(tmp_path, gpu_only_tokens, policy, num_gpu_blocks, num_cpu_blocks, cpu_speed,
                                     expected_events):
    config = EngineConfig("tiny", policy=policy, num_gpu_blocks=num_gpu_blocks, num_cpu_blocks=num_cpu_blocks,
                          cost_table=cost_table(tmp_path, cpu_speed), **OPTIONS)
    tokens, engine, events = run_mirrored(config, prompts(0))
    assert tokens == gpu_only_tokens
    counters = {**vars(engine.scheduler.stats), **events}
    for event in expected_events:  # the placements this case exists for did happen
        assert counters[event] > 0, (event, counters)


@pytest.mark.parametrize("policy, num_gpu_blocks", [("gpu-only", 17), ("cpu-all", 40), ("neo", 14)])
def test_async_scheduling_matches_sync(tmp_path, policy, num_gpu_blocks):
    """Asynchronous scheduling gives synchronous scheduling's tokens and finish reasons, each request returned
    once: with seeded random and greedy sampling, a stop token that ends requests while their next step runs,
    min_tokens, different max_tokens, and preemptions or swaps and pipelined steps."""
    prompt_list = prompts(0, count=8)
    table = cost_table(tmp_path, 0.01)

    def generate(async_scheduling: bool, stop_token_ids: tuple[int, ...] = ()) -> tuple[list, dict]:
        engine = LLMEngine(EngineConfig("tiny", policy=policy, num_gpu_blocks=num_gpu_blocks, num_cpu_blocks=120,
                                        cost_table=table, async_scheduling=async_scheduling, **OPTIONS))
        requests = [engine.add_request(prompt, SamplingParams(
            temperature=1.0 if index % 2 else 0.0, seed=index, max_tokens=10 + index, min_tokens=index % 3,
            stop_token_ids=stop_token_ids, ignore_eos=True)) for index, prompt in enumerate(prompt_list)]
        finished = []
        while engine.has_unfinished_requests():
            finished += engine.step()
        assert sorted(r.request_id for r in finished) == sorted(r.request_id for r in requests)
        return [(r.output_token_ids, r.finish_reason) for r in requests], vars(engine.scheduler.stats)

    free_run, _ = generate(False)
    stop = free_run[0][0][3]  # the fourth token of the first request, greedy
    expected, sync_stats = generate(False, (stop,))
    outputs, stats = generate(True, (stop,))
    assert outputs == expected

    def kv_tokens_read(counters: dict) -> int:
        return counters["gpu_kv_tokens_read"] + counters["cpu_kv_tokens_read"]

    # The requests a stop token ended had their next step in flight: those rows ran, and were dropped.
    assert kv_tokens_read(stats) > kv_tokens_read(sync_stats)
    assert sum(reason == "stop" for _, reason in expected) >= 1 and any(reason == "length" for _, reason in expected)
    if policy != "cpu-all":  # which prefills every prompt to the host pool
        assert stats["num_preemptions"] + stats["num_swap_out"] > 0, stats
    if policy != "gpu-only":
        assert stats["num_pipelined_steps"] > 0, stats


def test_a_full_host_pool_makes_requests_wait(tmp_path):
    config = EngineConfig("tiny", policy="cpu-all", num_gpu_blocks=8, num_cpu_blocks=20,
                          cost_table=cost_table(tmp_path, 1.0), **OPTIONS)
    engine = LLMEngine(config)
    requests = [engine.add_request(p, GREEDY) for p in prompts(1, count=8)]
    max_running = 0
    while engine.has_unfinished_requests():
        engine.step()
        max_running = max(max_running, len(engine.scheduler.running))
    assert all(r.finish_reason == "length" and len(r.output_token_ids) == GREEDY.max_tokens for r in requests)
    assert max_running < len(requests)


def test_the_worker_pool_shuts_down_at_exit():
    script = textwrap.dedent("""
        from neo_jax.config import EngineConfig
        from neo_jax.engine import LLMEngine
        from neo_jax.sampling_params import SamplingParams
        engine = LLMEngine(EngineConfig("tiny", policy="cpu-all", num_gpu_blocks=8, num_cpu_blocks=40,
                                        max_model_len=32, block_size=4, max_num_batched_tokens=16))
        engine.add_request([1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
        print("done")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={"JAX_PLATFORMS": "cpu", "PATH": ""})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("done")
