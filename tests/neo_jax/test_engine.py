"""LLMEngine.compile_ahead (the step programs of a workload compiled before it runs, in parallel threads), the
host time of a step by phase, and the step kept in flight by asynchronous scheduling."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from neo_jax.config import EngineConfig
from neo_jax.engine import LLMEngine
from neo_jax.model_runner import num_step_compilations, num_xla_compilations
from neo_jax.sampling_params import SamplingParams

# Sizes no other test uses, so that every program of the workload is new to the process; a GPU pool of 20 blocks
# preempts (gpu-only) or offloads (cpu-all) some of the 6 requests.
OPTIONS = dict(max_model_len=48, block_size=4, num_gpu_blocks=20, num_cpu_blocks=80, max_num_seqs=3,
               max_num_batched_tokens=24)


def workload() -> list[tuple[list[int], SamplingParams]]:
    rng = np.random.default_rng(7)
    return [(rng.integers(3, 500, size=int(rng.integers(20, 40))).tolist(),
             SamplingParams(temperature=0.0, max_tokens=int(rng.integers(2, 8)), ignore_eos=True))
            for _ in range(6)]


def run(engine: LLMEngine, requests: list[tuple[list[int], SamplingParams]]) -> list[list[int]]:
    added = [engine.add_request(prompt, params) for prompt, params in requests]
    while engine.has_unfinished_requests():
        engine.step()
    return [request.output_token_ids for request in added]


@pytest.mark.parametrize("policy", ["gpu-only", "cpu-all"])
def test_compile_ahead_leaves_nothing_to_compile(policy):
    engine = LLMEngine(EngineConfig("tiny", policy=policy, **OPTIONS))
    requests = workload()
    runs = []
    for name in ("run", "run_pipeline"):
        method = getattr(engine.runner, name)
        setattr(engine.runner, name, lambda *args, method=method: runs.append(args) or method(*args))
    before, xla_before = num_step_compilations(), num_xla_compilations()
    num_programs = engine.compile_ahead(requests, max_workers=2)
    assert len(runs) == num_programs, "each program runs once, to load it"
    assert num_programs > 1 and num_step_compilations() - before == num_programs
    assert num_xla_compilations() - xla_before >= num_programs
    assert engine.pool.num_free_blocks == engine.pool.num_usable_blocks  # the dry run used pools of its own
    assert engine.scheduler.stats.num_steps == 0
    compiled, xla_compiled = num_step_compilations(), num_xla_compilations()
    outputs = run(engine, requests)
    assert num_step_compilations() == compiled and num_xla_compilations() == xla_compiled
    expected = run(LLMEngine(EngineConfig("tiny", policy=policy, **OPTIONS)), requests)  # not compiled ahead
    assert outputs == expected, "the programs' runs on the idle engine change no later output"
    stats = engine.scheduler.stats
    assert stats.num_preemptions if policy == "gpu-only" else stats.num_pipelined_steps


def test_tokens_that_end_requests_make_later_steps_compile_instead():
    """With EOS honoured, the dry run (every token 0, never EOS) may schedule other steps than the real run; the
    engine still serves the real run, compiling what the dry run missed."""
    engine = LLMEngine(EngineConfig("tiny", **{**OPTIONS, "max_num_seqs": 5}))
    requests = [(prompt, SamplingParams(temperature=0.0, max_tokens=8)) for prompt, _ in workload()]
    engine.compile_ahead(requests)
    outputs = run(engine, requests)
    assert all(1 <= len(tokens) <= 8 for tokens in outputs)


def run_one_at_a_time(engine: LLMEngine, requests: list[tuple[list[int], SamplingParams]]) -> None:
    for request in requests:
        run(engine, [request])


@pytest.mark.parametrize("with_arrivals", [True, False])
def test_compile_ahead_of_a_serving_load_covers_its_steps(with_arrivals):
    """Requests that arrive one by one run in steps of their own, which a dry run of them all queued at once never
    schedules: compiled ahead with their arrivals the load compiles nothing more, without them it does."""
    engine = LLMEngine(EngineConfig("tiny", **{**OPTIONS, "num_gpu_blocks": 22 if with_arrivals else 23}))
    requests = workload()
    arrivals = [1000.0 * i for i in range(len(requests))] if with_arrivals else None
    engine.compile_ahead(requests, max_workers=2, arrivals=arrivals, step_seconds=(0.0, 1.0))
    compiled = num_step_compilations()
    run_one_at_a_time(engine, requests)
    assert (num_step_compilations() == compiled) == with_arrivals


def test_a_step_reports_its_host_time_by_phase():
    engine = LLMEngine(EngineConfig("tiny", **OPTIONS))
    for prompt, params in workload()[:2]:
        engine.add_request(prompt, params)
    engine.step()  # compiles
    start = time.perf_counter()
    engine.step()
    wall_s = time.perf_counter() - start
    phases = dataclasses.asdict(engine.last_step_phases)
    assert list(phases) == ["schedule_s", "pack_s", "launch_s", "device_wait_s", "book_s"]
    assert all(seconds >= 0 for seconds in phases.values())
    assert phases["schedule_s"] > 0 and phases["pack_s"] > 0 and phases["launch_s"] > 0
    assert sum(phases.values()) <= wall_s


def test_async_scheduling_keeps_one_step_in_flight():
    """Each step() launches a step and books the one before it: the first books nothing, a last one only
    drains; the outputs are the synchronous engine's."""
    engine = LLMEngine(EngineConfig("tiny", **OPTIONS))
    requests = [engine.add_request(prompt, params) for prompt, params in workload()[:2]]
    assert engine.step() == [] and engine.has_step_in_flight
    assert all(r.num_ready_output_tokens == 0 for r in requests)
    finished, calls = [], 1
    while engine.has_unfinished_requests():
        finished += engine.step()
        calls += 1
    assert not engine.has_step_in_flight and sorted(finished, key=lambda r: r.request_id) == requests
    assert calls == engine.scheduler.stats.num_steps + 1
    synchronous = LLMEngine(EngineConfig("tiny", async_scheduling=False, **OPTIONS))
    assert [r.output_token_ids for r in requests] == run(synchronous, workload()[:2])
    assert synchronous.scheduler.stats.num_steps == engine.scheduler.stats.num_steps
