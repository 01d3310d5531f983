"""Owns the params and the GPU KV cache, packs scheduled chunks, and runs the jitted step (cache donated)."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from neo_jax.batch import ScheduledChunk, StepBatch, pack_step
from neo_jax.config import EngineConfig, StepBuckets
from neo_jax.kv_cache import KVCache, allocate_kv_cache
from neo_jax.models import llama
from neo_jax.models.config import ModelConfig
from neo_jax.sampler import SamplingBatch, pack_sampling
from neo_jax.sharding import kv_cache_sharding
from neo_jax.step import model_step


_num_traces = 0


def _counted_step(params: llama.Params, kv_cache: KVCache, batch: StepBatch, sampling: SamplingBatch,
                  config: ModelConfig, mesh: Mesh | None) -> tuple[KVCache, jax.Array]:
    global _num_traces
    # Python here runs only while jit traces, once per new (shapes, config), right before XLA compiles.
    _num_traces += 1
    return model_step(params, kv_cache, batch, sampling, config, mesh)


# One jitted function for every runner: engines whose shapes and model config agree share compiled steps.
jitted_step = jax.jit(_counted_step, static_argnums=(4, 5), donate_argnums=(1,))


def num_step_compilations() -> int:
    """Step programs compiled in this process so far (all runners together)."""
    return _num_traces


class ModelRunner:
    """Executes steps on one model's params and GPU KV cache (both sharded over `mesh` when given)."""

    def __init__(self, model_config: ModelConfig, params: llama.Params, config: EngineConfig, num_blocks: int,
                 max_model_len: int, mesh: Mesh | None = None) -> None:
        self.model_config = model_config
        self.params = params
        self.block_size = config.block_size
        self.buckets = StepBuckets.for_engine(config, max_model_len)
        self.mesh = mesh
        self.kv_cache = allocate_kv_cache(model_config, num_blocks, config.block_size,
                                          None if mesh is None else kv_cache_sharding(mesh))

    def run(self, batch: StepBatch, sampling: SamplingBatch) -> jax.Array:
        """Runs one packed step on the device; the sampled tokens int32[R] (not yet fetched)."""
        self.kv_cache, tokens = jitted_step(self.params, self.kv_cache, batch, sampling, self.model_config,
                                            self.mesh)
        return tokens

    def execute(self, chunks: list[ScheduledChunk], eos_token_ids: tuple[int, ...]) -> dict[int, int]:
        """Computes the chunks; the sampled next token of each request that samples, by request id."""
        batch, sampled_requests = pack_step(chunks, self.block_size, self.buckets)
        tokens = np.asarray(self.run(batch, pack_sampling(sampled_requests, eos_token_ids)))
        return {r.request_id: int(tokens[row]) for row, r in enumerate(sampled_requests) if r is not None}
