"""The engine loop: load a model, take requests, and step the scheduler and the model runner.

With asynchronous scheduling (the default) one step is always on the device while the host works: `step()`
schedules, packs and launches step n+1, then fetches step n's tokens and books them, then books step n+1's chunks
with a `pending_token` for each token it samples. Step n+1 was scheduled with step n's chunks booked and its
length-limited requests finished; a request that step n stops on a stop token is finished when its token is
fetched, and its row in step n+1 is dropped.

Threads: the caller's thread does all of the above, and XLA enqueues each program's kernels from it. The device
runs the steps in order, so a block freed while a step is in flight is reused only after that step. Host-pool
work (CPU attention, K/V stores and loads) runs on the op's worker pool (neo_jax.cpu_ops, pinned threads): on the
CPU backend inside the custom calls, on a GPU handed over by a dispatcher thread that takes the calls in sequence
order as the device rings their doorbells (neo_jax.cpu_ops.handoff), so those of step n+1 follow those of step n.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from neo_jax.batch import ScheduledChunk
from neo_jax.block_manager import BlockPool, blocks_for
from neo_jax.booking import advance_step, book_tokens, dry_run, scheduled_chunks
from neo_jax.config import EngineConfig
from neo_jax.cost_model import CostModel, HardwareSpec, MachineId, gpu_side_name, load_cost_model
from neo_jax.kv_cache import allocate_host_kv_pool, num_cpu_blocks, num_gpu_blocks
from neo_jax.model_runner import LaunchedStep, ModelRunner
from neo_jax.models import llama, loading
from neo_jax.models.config import ModelConfig, get_config
from neo_jax.pipeline_batch import PipelineSchedule
from neo_jax.pipeline_scheduler import PipelineScheduler
from neo_jax.sampling_params import SamplingParams
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


@dataclasses.dataclass
class StepPhases:
    """Host wall seconds of one `LLMEngine.step()`, phase by phase (the benchmarks report their medians)."""

    schedule_s: float = 0.0     # the scheduler's plan, applied to the pools
    pack_s: float = 0.0         # the step's padded arrays
    launch_s: float = 0.0       # the jitted call: dispatch, the input copy, XLA enqueueing the program
    device_wait_s: float = 0.0  # until the booked step's sampled tokens reach the host
    book_s: float = 0.0         # the tokens booked on their requests


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
        self._in_flight: LaunchedStep | None = None  # the step on the device whose tokens are not yet booked

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
        return self.scheduler.has_unfinished() or self.has_step_in_flight

    @property
    def has_step_in_flight(self) -> bool:
        """Whether a launched step's tokens are still to be booked (by the next `step()`)."""
        return self._in_flight is not None

    def step(self) -> list[Request]:
        """Schedules and launches one step, and books the tokens of the step before it (asynchronous scheduling)
        or of this one; returns the requests that those tokens finished. `last_step_phases` then holds the host
        time by phase: scheduling, packing and launching this step, waiting for and booking the booked one."""
        start = time.perf_counter()
        schedule = self.scheduler.schedule() if self.scheduler.has_unfinished() else []
        chunks = scheduled_chunks(schedule)
        if not chunks and self._in_flight is None:
            raise RuntimeError(f"the scheduler found nothing to run for {len(self.scheduler.waiting)} waiting and "
                               f"{len(self.scheduler.running)} running requests (KV pools too small?)")
        phases = StepPhases(schedule_s=time.perf_counter() - start)
        launched = None
        if chunks:
            launched = self.runner.launch(schedule, self.eos_token_ids)
            phases.pack_s, phases.launch_s = launched.pack_s, launched.launch_s
            if not self.config.async_scheduling:
                self._advance(launched, chunks, phases)
                self._in_flight, launched = launched, None
        finished = []
        if self._in_flight is not None:
            waiting = time.perf_counter()
            tokens = self.runner.fetch(self._in_flight)
            booking = time.perf_counter()
            phases.device_wait_s = booking - waiting
            finished = book_tokens(self.scheduler, self._in_flight.step.sampled_requests, tokens,
                                   self.eos_token_ids, self.max_model_len)
            phases.book_s += time.perf_counter() - booking
        if launched is not None:
            self._advance(launched, chunks, phases)
        self._in_flight = launched
        self.last_step_phases = phases
        return finished

    def _advance(self, launched: LaunchedStep, chunks: list[ScheduledChunk], phases: StepPhases) -> None:
        start = time.perf_counter()
        advance_step(self.scheduler, chunks, launched.step.sampled_requests, self.max_model_len)
        phases.book_s += time.perf_counter() - start

    def compile_ahead(self, requests: Sequence[tuple[Sequence[int], SamplingParams]], max_workers: int = 4,
                      arrivals: Sequence[float] | None = None, step_seconds: Sequence[float] = (0.0,)) -> int:
        """Compiles, `max_workers` at a time, the step programs that serving `requests` on this idle engine would
        run (the steps of `dry_run` on fresh pools of the engine's sizes), runs each once to load it onto the
        device, and returns their number. With `arrivals` (seconds, in request order) the requests join as a
        server's would, and which of them share a step depends on how long the steps take: one dry run per
        duration in `step_seconds`, the programs of all of them compiled."""

        def schedules() -> Iterator[PipelineSchedule | list[ScheduledChunk]]:
            for seconds in step_seconds:
                pool = BlockPool("gpu", self.pool.num_blocks, self.config.block_size)
                host_pool = self.host_pool and BlockPool("cpu", self.host_pool.num_blocks, self.config.block_size)
                yield from dry_run(self._new_scheduler(pool, host_pool), requests, self.eos_token_ids,
                                   self.max_model_len, arrivals, step_seconds=lambda seconds=seconds: seconds)

        return self.runner.compile((self.runner.pack(schedule, self.eos_token_ids) for schedule in schedules()),
                                   max_workers)
