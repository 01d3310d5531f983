"""Owns the params and the KV pools, packs scheduled steps, and runs the jitted step (GPU cache donated).

A step that touches no host memory runs `model_step`; one with host-resident requests, host-bound prefills or
swaps runs `pipeline_step`. Both return the sampled tokens and the logits they were sampled from
(`last_logits`, left on the device; tests compare them across policies through
`LaunchedStep.logits_by_request`). `launch` enqueues a step and returns at once; `fetch` waits for its tokens.
Between the two the engine may launch the next step: its inputs name the tokens still on the device by
`pending_token` rows, which the program reads from the previous step's tokens (`previous_tokens`, a fixed-size
device buffer that every step updates, donated like the cache).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from neo_jax.batch import ScheduledChunk, StepBatch, pack_step
from neo_jax.config import EngineConfig, StepBuckets
from neo_jax.cpu_ops.handoff import HostKvPool
from neo_jax.host_inputs import HostLayout, host_layout, pack_host_inputs
from neo_jax.kv_cache import allocate_kv_cache
from neo_jax.models import llama
from neo_jax.models.config import ModelConfig
from neo_jax.pipeline_batch import PipelineBatch, PipelineSchedule, pack_pipeline_step
from neo_jax.pipeline_step import pipeline_step
from neo_jax.sampler import SamplingBatch, pack_sampling
from neo_jax.sequence import Request
from neo_jax.sharding import kv_cache_sharding
from neo_jax.step import model_step


_num_traces = 0
_counters_lock = threading.Lock()  # `compile` traces and compiles in several threads


def _counted(step: Callable) -> Callable:
    def counted_step(*args):
        global _num_traces
        # Python here runs only while jit traces, once per new (shapes, statics), right before XLA compiles.
        with _counters_lock:
            _num_traces += 1
        return step(*args)

    return counted_step


# XLA:GPU records runs of kernels into CUDA graphs ("command buffers"). A step's inputs are new buffers on every
# call, so the graphs are re-recorded before each launch: in an H200 trace, 3.1 ms of update and 2.4 ms of
# launch passed before batch-256's first kernel (a 24.3 ms step of 17.8 ms GPU work), and pipelined steps
# instantiated their 33 graphs anew (8.5 ms). Launched one by one, the kernels stay queued ahead of the GPU:
# the batch-256 step went from 25.6 to 20.8 ms on the H200 (benchmarks/results/engine_step_h200_c2cf812.md).
# NEO_XLA_COMMAND_BUFFERS=1 keeps XLA's default, for comparison.
STEP_COMPILER_OPTIONS = ({} if os.environ.get("NEO_XLA_COMMAND_BUFFERS") == "1"
                         else {"xla_gpu_enable_command_buffer": ""})


def _unpacking(step: Callable) -> Callable:
    """`step(params, kv_cache, batch, sampling, *statics)` taking batch and sampling packed (neo_jax.host_inputs),
    its pending tokens read from `previous_tokens` int32[L], which it returns with its own tokens in front."""
    def unpacking_step(params, kv_cache, previous_tokens: jax.Array, host_inputs: jax.Array, layout: HostLayout,
                       *statics):
        batch, sampling = layout.unpack(host_inputs)
        kv_cache, tokens, logits = step(params, kv_cache, batch.with_previous_tokens(previous_tokens), sampling,
                                        *statics)
        if tokens.shape[0] > previous_tokens.shape[0]:
            raise ValueError(f"a step samples {tokens.shape[0]} rows, more than previous_tokens holds "
                             f"({previous_tokens.shape[0]})")
        return kv_cache, previous_tokens.at[:tokens.shape[0]].set(tokens), tokens, logits

    return unpacking_step


# One jitted function of each kind for every runner: engines whose shapes and statics agree share programs.
# Arguments: params, kv_cache and previous_tokens (both donated), the packed batch and sampling with their
# HostLayout, then the statics.
jitted_step = jax.jit(_counted(_unpacking(model_step)), static_argnums=(4, 5, 6), donate_argnums=(1, 2),
                      compiler_options=STEP_COMPILER_OPTIONS)
jitted_pipeline_step = jax.jit(_counted(_unpacking(pipeline_step)), static_argnums=(4, 5, 6, 7),
                               donate_argnums=(1, 2), compiler_options=STEP_COMPILER_OPTIONS)


def num_step_compilations() -> int:
    """Step programs compiled in this process so far (all runners together)."""
    return _num_traces


_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_num_xla_compilations = 0


def _count_xla_compilation(event: str, seconds: float, **kwargs) -> None:
    global _num_xla_compilations
    if event == _BACKEND_COMPILE_EVENT:
        with _counters_lock:
            _num_xla_compilations += 1


jax.monitoring.register_event_duration_secs_listener(_count_xla_compilation)


def num_xla_compilations() -> int:
    """XLA compilations of any program in this process since this module loaded (JAX's monitoring events)."""
    return _num_xla_compilations


@dataclasses.dataclass
class PackedStep:
    """One scheduled step as the arrays of its program; `pipelined`: `pipeline_step`'s, else `model_step`'s."""

    pipelined: bool
    batch: StepBatch | PipelineBatch
    sampling: SamplingBatch
    sampled_requests: list[Request | None]  # the request of each sampled row (None: padding)

    def program_key(self) -> tuple[bool, HostLayout]:
        """Equal for steps that run the same compiled program."""
        return self.pipelined, host_layout((self.batch, self.sampling))


@dataclasses.dataclass
class LaunchedStep:
    """A step enqueued on the device: its packed inputs, and its outputs, not yet fetched."""

    step: PackedStep
    tokens: jax.Array   # int32[R]
    logits: jax.Array   # float32[R, V]
    pack_s: float       # host seconds packing it
    launch_s: float     # and launching it

    def logits_by_request(self) -> dict[int, np.ndarray]:
        """The logits float32[V] each request samples from in this step (waits for the step)."""
        logits = np.asarray(self.logits)
        return {r.request_id: logits[row] for row, r in enumerate(self.step.sampled_requests) if r is not None}


class ModelRunner:
    """Executes steps on one model's params and GPU KV cache (both sharded over `mesh` when given)."""

    def __init__(self, model_config: ModelConfig, params: llama.Params, config: EngineConfig, num_blocks: int,
                 max_model_len: int, host_pool: HostKvPool | None = None, mesh: Mesh | None = None) -> None:
        self.model_config = model_config
        self.params = params
        self.block_size = config.block_size
        self.buckets = StepBuckets.for_engine(config, max_model_len)
        self.mesh = mesh
        self.kv_cache = allocate_kv_cache(model_config, num_blocks, config.block_size,
                                          None if mesh is None else kv_cache_sharding(mesh))
        self.host_pool = host_pool
        self.previous_tokens = jnp.zeros(self.buckets.max_sampled_rows, jnp.int32)  # the latest step's tokens first
        if mesh is not None:
            self.previous_tokens = jax.device_put(self.previous_tokens, NamedSharding(mesh, P()))
        self.last_logits: jax.Array | None = None  # float32[R, V] of the latest launched step's sampled rows

    def run(self, batch: StepBatch, sampling: SamplingBatch) -> jax.Array:
        """Runs one packed step on the device; the sampled tokens int32[R] (not yet fetched)."""
        self.kv_cache, self.previous_tokens, tokens, self.last_logits = jitted_step(
            *self._program_args(False, batch, sampling))
        return tokens

    def run_pipeline(self, batch: PipelineBatch, sampling: SamplingBatch) -> jax.Array:
        """Runs one packed pipeline step; the sampled tokens int32[R] (not yet fetched)."""
        self.kv_cache, self.previous_tokens, tokens, self.last_logits = jitted_pipeline_step(
            *self._program_args(True, batch, sampling))
        return tokens

    def _program_args(self, pipelined: bool, batch: StepBatch | PipelineBatch, sampling: SamplingBatch) -> tuple:
        statics = (self.model_config, self.host_pool, self.mesh) if pipelined else (self.model_config, self.mesh)
        return (self.params, self.kv_cache, self.previous_tokens, *pack_host_inputs((batch, sampling)), *statics)

    def pack(self, schedule: PipelineSchedule | list[ScheduledChunk],
             eos_token_ids: tuple[int, ...]) -> PackedStep:
        """The arrays of a scheduled step (nothing runs)."""
        if isinstance(schedule, PipelineSchedule) and schedule.uses_host:
            batch, sampled_requests = pack_pipeline_step(schedule, self.block_size, self.buckets)
            return PackedStep(True, batch, pack_sampling(sampled_requests, eos_token_ids), sampled_requests)
        chunks = schedule.gpu_chunks if isinstance(schedule, PipelineSchedule) else schedule
        batch, sampled_requests = pack_step(chunks, self.block_size, self.buckets)
        return PackedStep(False, batch, pack_sampling(sampled_requests, eos_token_ids), sampled_requests)

    def run_packed(self, step: PackedStep) -> jax.Array:
        """Runs a packed step with the program of its kind; the sampled tokens int32[R] (not yet fetched)."""
        return (self.run_pipeline if step.pipelined else self.run)(step.batch, step.sampling)

    def launch(self, schedule: PipelineSchedule | list[ScheduledChunk],
               eos_token_ids: tuple[int, ...]) -> LaunchedStep:
        """Packs the step and enqueues it on the device; returns without waiting for it."""
        start = time.perf_counter()
        step = self.pack(schedule, eos_token_ids)
        packed = time.perf_counter()
        tokens = self.run_packed(step)
        return LaunchedStep(step, tokens, self.last_logits, packed - start, time.perf_counter() - packed)

    def fetch(self, launched: LaunchedStep) -> np.ndarray:
        """Waits for a launched step; its sampled tokens int32[R] (row i: `launched.step.sampled_requests[i]`)."""
        return np.asarray(launched.tokens)

    def compile(self, steps: Iterable[PackedStep], max_workers: int = 4) -> int:
        """Compiles the programs of `steps` ahead of time, `max_workers` at once (XLA compiles outside the GIL);
        JAX keeps them, so the jitted calls of those shapes compile nothing. Then runs each program once, which
        loads it onto the device: in the H200 throughput runs the slowest steps were each new program's first,
        150-160 ms (benchmark_step times a 2048-token prefill step at 78 ms). Run on an idle engine only: the runs
        write K/V at the steps' slots (which later requests overwrite before they read them). Returns the number
        of programs."""
        programs: dict[tuple, PackedStep] = {}
        for step in steps:
            programs.setdefault(step.program_key(), step)

        def compile_program(step: PackedStep) -> None:
            jitted = jitted_pipeline_step if step.pipelined else jitted_step
            jitted.lower(*self._program_args(step.pipelined, step.batch, step.sampling)).compile()

        with ThreadPoolExecutor(max_workers) as executor:
            list(executor.map(compile_program, programs.values()))
        jax.block_until_ready([self.run_packed(step) for step in programs.values()])
        return len(programs)
