"""PipelineScheduler: planning from the admissible prefix of the queue gives the plan of the whole queue."""

from __future__ import annotations

import numpy as np
import pytest

from neo_jax.block_manager import BlockPool
from neo_jax.config import EngineConfig
from neo_jax.cost_model import MachineId, fallback_cost_model
from neo_jax.booking import scheduled_chunks
from neo_jax.models.config import PRESETS
from neo_jax.pipeline_scheduler import PipelineScheduler
from neo_jax.sampling_params import SamplingParams
from neo_jax.sequence import Request


def make_scheduler(policy: str, queue_all: bool) -> PipelineScheduler:
    config = EngineConfig(model="llama-3-8b", policy=policy, block_size=16, max_num_seqs=8,
                          max_num_batched_tokens=512)
    cost = fallback_cost_model(PRESETS["llama-3-8b"], model="llama-3-8b", machine=MachineId("cpu", 1, "gpu"),
                               block_size=16)
    scheduler = PipelineScheduler(config, BlockPool("gpu", 160, 16), BlockPool("cpu", 400, 16), cost)
    if queue_all:  # what the plan saw before it was given only the admissible prefix
        scheduler._admissible_waiting = lambda: sorted(scheduler.waiting, key=lambda r: r.request_id)
    rng = np.random.default_rng(1)
    for request_id in range(200):
        prompt = rng.integers(0, 500, int(rng.integers(1, 300))).tolist()
        scheduler.add(Request(request_id, prompt, SamplingParams(max_tokens=int(rng.integers(1, 40))), seed=0))
    return scheduler


def step_once(scheduler: PipelineScheduler) -> list[tuple[int, int]]:
    """Schedules a step, books it as if every sampled token were 0, and returns its (request, tokens) chunks."""
    schedule = scheduler.schedule()
    chunks = scheduled_chunks(schedule)
    for chunk in chunks:
        samples = chunk.samples
        chunk.request.num_computed_tokens += chunk.num_tokens
        if samples:
            chunk.request.output_token_ids.append(0)
            if len(chunk.request.output_token_ids) >= chunk.request.sampling_params.max_tokens:
                scheduler.finish(chunk.request, "length")
    return sorted((chunk.request.request_id, chunk.num_tokens) for chunk in chunks)


@pytest.mark.parametrize("policy", ["neo", "cpu-all"])
def test_the_admissible_prefix_plans_like_the_whole_queue(policy):
    prefix_only, whole_queue = make_scheduler(policy, False), make_scheduler(policy, True)
    for _ in range(5000):
        assert len(prefix_only._admissible_waiting()) <= prefix_only.max_num_seqs
        queue = [request.request_id for request in prefix_only.waiting]
        assert queue == sorted(queue)
        assert step_once(prefix_only) == step_once(whole_queue)
        if not prefix_only.has_unfinished():
            break
    assert not prefix_only.has_unfinished() and not whole_queue.has_unfinished()
