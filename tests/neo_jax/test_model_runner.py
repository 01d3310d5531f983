"""The model runner's step programs: what XLA compiles for the shapes the runner packs."""

from __future__ import annotations

import re

from neo_jax.config import EngineConfig
from neo_jax.engine import LLMEngine
from neo_jax.model_runner import jitted_step
from neo_jax.sampling_params import SamplingParams


def test_a_one_request_decode_step_updates_the_kv_cache_in_place():
    engine = LLMEngine(EngineConfig("tiny", max_model_len=64, block_size=16, num_gpu_blocks=64,
                                    async_scheduling=False))
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True))
    engine.step()  # the prefill
    step = engine.runner.pack(engine.scheduler.schedule(), engine.eos_token_ids)
    assert step.batch.decode_context_lens.tolist() == [4, 0]  # the one decode and a padding row
    runner = engine.runner
    hlo = jitted_step.lower(*runner._program_args(False, step.batch, step.sampling)).compile().as_text()
    layers, blocks, *row = runner.kv_cache.k.shape
    cache_shapes = {",".join(map(str, dims)) for dims in ([layers, blocks, *row], [layers * blocks, *row])}
    copied = re.findall(r"= \w+\[([\d,]+)\]\{[\d,]*\} copy\(", hlo)
    assert cache_shapes.isdisjoint(copied), "the step copies the KV cache"
