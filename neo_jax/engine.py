"""The engine loop: load a model, take requests, and step the scheduler and the model runner."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from neo_jax.batch import ScheduledChunk
from neo_jax.block_manager import BlockPool, blocks_for
from neo_jax.config import EngineConfig
from neo_jax.cost_model import CostModel, HardwareSpec, MachineId, gpu_side_name, load_cost_model
from neo_jax.kv_cache import allocate_host_kv_pool, num_cpu_blocks, num_gpu_blocks
from neo_jax.model_runner import ModelRunner, StepPhases
from neo_jax.models import llama, loading
from neo_jax.models.config import ModelConfig, get_config
from neo_jax.sampling_params import SamplingParams
from neo_jax.pipeline_batch import PipelineSchedule
from neo_jax.pipeline_scheduler import PipelineScheduler
from neo_jax.scheduler import Scheduler
from neo_jax.sequence import Request
from neo_jax.sharding import init_sharded_params, make_mesh, shard_params
from neo_jax.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


def load_model(model: str, dtype: str | None, seed: int, mesh: Mesh | None = None) -> tuple[ModelConfig, llama.Params]:
    """An HF checkpoint directory's config and weights, or a preset with random weights drawn from `seed`;
    sharded over a tensor-parallel `mesh` when given."""
    if os.path.isdir(model):
        config, params = loading.load_hf_checkpoint(model, dtype)
        return config, params if mesh is None else shard_params(params, config, mesh)
    config = get_config(model)
    if dtype is not None:
        config = config.with_dtype(dtype)
    if mesh is None:
        return config, llama.init_params(config, jax.random.key(seed))
    return config, init_sharded_params(config, jax.random.key(seed), mesh)


class LLMEngine:
    """Requests in, finished requests out, one `step()` at a time."""

    def __init__(self, config: EngineConfig, model: tuple[ModelConfig, llama.Params] | None = None) -> None:
        """`model`: a config and params already in memory, served instead of loading `config.model`."""
        self.config = config
        mesh = make_mesh(config.tensor_parallel_size) if config.tensor_parallel_size > 1 else None
        self.model_config, params = model or load_model(config.model, config.dtype, config.seed, mesh)
        self.tokenizer = load_tokenizer(config.model, self.model_config)
        self.max_model_len = config.resolved_max_model_len(self.model_config)
        num_blocks = num_gpu_blocks(self.model_config, config, self.max_model_len)
        self.pool = BlockPool("gpu", num_blocks, config.block_size)
        self.host_pool = None  # the host pool's blocks, under an offload policy
        host_kv_pool = None    # and its memory
        self.cost_model = self._load_cost_model() if config.offloads else None
        if config.offloads:
            self.host_pool = BlockPool("cpu", num_cpu_blocks(self.model_config, config, self.max_model_len),
                                       config.block_size)
            host_kv_pool = allocate_host_kv_pool(self.model_config, self.host_pool.num_blocks, config.block_size,
                                                 config.tensor_parallel_size)
        self.scheduler = self._new_scheduler(self.pool, self.host_pool)
        self._check_one_request_fits()
        self.runner = ModelRunner(self.model_config, params, config, num_blocks, self.max_model_len, host_kv_pool,
                                  mesh)
        self._seed_generator = np.random.default_rng(config.seed)
        self._next_request_id = 0
        self.last_step_phases = StepPhases()

    def _new_scheduler(self, pool: BlockPool, host_pool: BlockPool | None) -> Scheduler | PipelineScheduler:
        if self.config.offloads:
            return PipelineScheduler(self.config, pool, host_pool, self.cost_model)
        return Scheduler(self.config, pool)

    def _check_one_request_fits(self) -> None:
        """A request of max_model_len tokens must fit in the pool that prefills may fill."""
        needed = blocks_for(self.max_model_len, self.config.block_size)
        pools = [self.pool] if self.config.policy == "gpu-only" else [self.host_pool]
        if self.config.policy == "neo":
            pools.append(self.pool)
        largest = max(pools, key=lambda p: p.num_usable_blocks)
        if largest.num_usable_blocks < needed:
            budget = "gpu_kv_cache_gb" if largest is self.pool else "cpu_kv_cache_gb"
            raise ValueError(f"max_model_len: one request of {self.max_model_len} tokens needs {needed} KV blocks but "
                             f"the {largest.name} pool has {largest.num_usable_blocks}; lower max_model_len or raise "
                             f"{budget}")

    def _load_cost_model(self) -> CostModel:
        if self.config.cost_table is not None:
            return CostModel.load(self.config.cost_table)
        tensor_parallel_size = self.config.tensor_parallel_size
        gpu_name = gpu_side_name(jax.devices()[0].device_kind, tensor_parallel_size)
        return load_cost_model(self.model_config, model=self.config.model, machine=MachineId.current(gpu_name),
                               block_size=self.config.block_size,
                               hardware=HardwareSpec().over_gpus(tensor_parallel_size))

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.model_config.eos_token_ids

    def new_request_id(self) -> int:
        self._next_request_id += 1
        return self._next_request_id - 1

    def prompt_error(self, prompt_token_ids: Sequence[int]) -> str | None:
        """Why this prompt cannot be served, or None."""
        if len(prompt_token_ids) == 0:
            return "prompt_token_ids: the prompt is empty"
        if len(prompt_token_ids) > self.max_model_len:
            return (f"prompt_token_ids: the prompt has {len(prompt_token_ids)} tokens, more than "
                    f"max_model_len={self.max_model_len}")
        vocab_size = self.model_config.vocab_size
        for token in prompt_token_ids:
            if not isinstance(token, (int, np.integer)) or isinstance(token, bool) or not 0 <= token < vocab_size:
                return f"prompt_token_ids: {token!r} is not a token id in [0, {vocab_size})"
        return None

    def add_request(self, prompt_token_ids: Sequence[int], sampling_params: SamplingParams,
                    seed: int | None = None) -> Request:
        """Queues a request; `seed` overrides sampling_params.seed. Raises ValueError for a bad prompt."""
        error = self.prompt_error(prompt_token_ids)
        if error is not None:
            raise ValueError(error)
        if seed is None:
            seed = sampling_params.seed
        if seed is None:
            seed = int(self._seed_generator.integers(2**32))
        request = Request(self.new_request_id(), [int(t) for t in prompt_token_ids], sampling_params, seed)
        self.scheduler.add(request)
        return request

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[Request]:
        """Schedules and runs one step; returns the requests that finished in it. `last_step_phases` then holds
        its host time by phase."""
        start = time.perf_counter()
        schedule = self.scheduler.schedule()
        chunks = scheduled_chunks(schedule)
        if not chunks:
            raise RuntimeError(f"the scheduler found nothing to run for {len(self.scheduler.waiting)} waiting and "
                               f"{len(self.scheduler.running)} running requests (KV pools too small?)")
        scheduled = time.perf_counter()
        sampled = self.runner.execute(schedule, self.eos_token_ids)
        executed = time.perf_counter()
        finished = book_step(self.scheduler, chunks, sampled, self.eos_token_ids, self.max_model_len)
        self.last_step_phases = dataclasses.replace(self.runner.last_phases, schedule_s=scheduled - start,
                                                    book_s=time.perf_counter() - executed)
        return finished

    def compile_ahead(self, requests: Sequence[tuple[Sequence[int], SamplingParams]], max_workers: int = 4) -> int:
        """Compiles, `max_workers` at a time, the step programs that serving `requests` on this idle engine would
        run (the steps of `dry_run` on fresh pools of the engine's sizes), runs each once to load it onto the
        device, and returns their number."""
        pool = BlockPool("gpu", self.pool.num_blocks, self.config.block_size)
        host_pool = self.host_pool and BlockPool("cpu", self.host_pool.num_blocks, self.config.block_size)
        schedules = dry_run(self._new_scheduler(pool, host_pool), requests, self.eos_token_ids, self.max_model_len)
        return self.runner.compile([self.runner.pack(schedule, self.eos_token_ids) for schedule in schedules],
                                   max_workers)


def scheduled_chunks(schedule: PipelineSchedule | list[ScheduledChunk]) -> list[ScheduledChunk]:
    """Every chunk a step computes, whichever batch it is in."""
    return schedule.chunks if isinstance(schedule, PipelineSchedule) else schedule


def book_step(scheduler: Scheduler | PipelineScheduler, chunks: list[ScheduledChunk], sampled: dict[int, int],
              eos_token_ids: tuple[int, ...], max_model_len: int) -> list[Request]:
    """Books a step's chunks and sampled tokens (by request id) on their requests; returns the requests it
    finished."""
    finished = []
    for chunk in chunks:
        request = chunk.request
        request.num_computed_tokens += chunk.num_tokens
        if request.request_id not in sampled:
            continue
        request.output_token_ids.append(sampled[request.request_id])
        reason = request.stop_reason(eos_token_ids, max_model_len)
        if reason is not None:
            scheduler.finish(request, reason)
            finished.append(request)
    return finished


def dry_run(scheduler: Scheduler | PipelineScheduler, requests: Sequence[tuple[Sequence[int], SamplingParams]],
            eos_token_ids: tuple[int, ...], max_model_len: int, arrivals: Sequence[float] | None = None,
            step_seconds: Callable[[], float] = lambda: 0.0,
            ) -> Iterator[PipelineSchedule | list[ScheduledChunk]]:
    """Serves `requests` on `scheduler` without a model, every sampled token taken to be 0, and yields each step's
    schedule before booking it. These are the steps of a real run when no request's length depends on its tokens
    (`ignore_eos`, no stop tokens); otherwise a real run may schedule differently. With `arrivals` (seconds, in
    request order) a request joins once a simulated clock has passed its arrival; each step advances the clock by
    `step_seconds()` (asked after the step is scheduled), an idle scheduler to the next arrival."""
    arrivals = [0.0] * len(requests) if arrivals is None else arrivals
    clock, next_request = 0.0, 0
    while next_request < len(requests) or scheduler.has_unfinished():
        while next_request < len(requests) and arrivals[next_request] <= clock:
            prompt, sampling_params = requests[next_request]
            scheduler.add(Request(next_request, list(prompt), sampling_params, seed=0))
            next_request += 1
        if not scheduler.has_unfinished():
            clock = arrivals[next_request]
            continue
        schedule = scheduler.schedule()
        yield schedule
        chunks = scheduled_chunks(schedule)
        book_step(scheduler, chunks, {c.request.request_id: 0 for c in chunks if c.samples}, eos_token_ids,
                  max_model_len)
        clock += step_seconds()
