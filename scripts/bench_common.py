"""What the benchmark scripts share: engine options on the command line, the machine and commit, the time spent
in engine steps with the scheduler's counters, the host read bandwidth and the bound it puts on the gain, JSON out."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

import jax
import numpy as np

from neo_jax.benchmark_metrics import bandwidth_bound, kv_bytes_per_token, random_lengths, random_prompts
from neo_jax.config import EngineConfig
from neo_jax.cost_model import DTYPE_BYTES, MachineId
from neo_jax.cpu_ops import cpu_isa, read_bandwidth_probe
from neo_jax.engine import LLMEngine
from neo_jax.model_runner import num_step_compilations, num_xla_compilations
from neo_jax.models.config import SUPPORTED_DTYPES, get_config
from neo_jax.sampling_params import SamplingParams
from neo_jax.sequence import Request
from neo_jax.step_plan import POLICIES

T = TypeVar("T")


def checked_type(convert: Callable[[str], T], accept: Callable[[T], bool], requirement: str,
                 name: str) -> Callable[[str], T]:
    """An argparse `type=`: `convert` the text, then refuse a value that `accept` rejects, saying it `requirement`
    (argparse prefixes the argument's name and exits with status 2)."""

    def parse(text: str) -> T:
        value = convert(text)
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}")
        return value

    parse.__name__ = name  # argparse's "invalid <name> value" when `convert` itself fails
    return parse


positive_int = checked_type(int, lambda value: value > 0, "a positive integer", "positive_int")
nonnegative_int = checked_type(int, lambda value: value >= 0, "an integer >= 0", "nonnegative_int")
positive_float = checked_type(float, lambda value: 0 < value < math.inf, "a positive finite number", "positive_float")
# inf sends every request at once; nan would wait forever for the first arrival.
request_rate = checked_type(float, lambda value: value > 0, "a positive number or inf", "request_rate")
range_ratio = checked_type(float, lambda value: 0 <= value < 1, "in [0, 1)", "range_ratio")
memory_fraction = checked_type(float, lambda value: 0 < value <= 1, "in (0, 1]", "memory_fraction")
uint32 = checked_type(int, lambda value: 0 <= value < 2**32, "in [0, 2**32)", "uint32")


def output_file(text: str) -> str:
    """An argparse `type=` of a file the run writes at its end: its directory is created now, so that a run
    never ends unable to write its results."""
    path = pathlib.Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot create the directory of {text!r}: {error.strerror}") from error
    return text


def existing_path(text: str) -> pathlib.Path:
    """An argparse `type=` of a file or directory that must already exist."""
    path = pathlib.Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text!r} does not exist")
    return path


def existing_file(text: str) -> str:
    """An argparse `type=` of a file that must already exist."""
    if not existing_path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a file")
    return text


def option_error(parser: argparse.ArgumentParser, error: ValueError) -> NoReturn:
    """Exits as argparse does (status 2) with the engine's `error`, whose leading `field:` (an EngineConfig field,
    as `--max-model-len` sets `max_model_len`) becomes `argument --field:`."""
    field, colon, rest = str(error).partition(": ")
    if colon and field.isidentifier():
        parser.error(f"argument --{field.replace('_', '-')}: {rest}")
    parser.error(str(error))


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the engine's config that decide its schedule, and --output-json."""
    parser.add_argument("--model", default="tiny", help="preset name or HF checkpoint directory")
    parser.add_argument("--dtype", default=None, choices=SUPPORTED_DTYPES, help="default: the model's")
    parser.add_argument("--policy", default="gpu-only", choices=POLICIES)
    parser.add_argument("--max-model-len", type=positive_int, default=None)
    parser.add_argument("--gpu-kv-cache-gb", type=positive_float, default=None)
    parser.add_argument("--cpu-kv-cache-gb", type=positive_float, default=None, help="host KV pool size (GiB)")
    parser.add_argument("--cost-table", type=existing_file, default=None, help="cost model JSON (default: the "
                        "profiled table of this model and machine, see scripts/profile.py)")
    parser.add_argument("--gpu-memory-utilization", type=memory_fraction, default=0.9)
    parser.add_argument("--max-num-seqs", type=positive_int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=positive_int, default=2048)
    parser.add_argument("--block-size", type=positive_int, default=16)
    parser.add_argument("--seed", type=uint32, default=0)
    parser.add_argument("--tensor-parallel-size", type=positive_int, default=1,
                        help="GPUs the weights and KV cache split over")
    parser.add_argument("--scenario", default=None, help="name of the setting in plots (default: model and KV sizes)")
    parser.add_argument("--output-json", type=output_file, default=None, help="write the results here")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a run of the engine itself (not of a schedule's simulation)."""
    parser.add_argument("--no-async-scheduling", action="store_true",
                        help="fetch each step's tokens before scheduling the next (default: overlap them)")
    parser.add_argument("--bandwidth-probe-mb", type=positive_int, default=1024,
                        help="MiB the host read-bandwidth probe reads")


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-prompts", type=positive_int, default=64)
    parser.add_argument("--input-len", type=positive_int, default=128)
    parser.add_argument("--output-len", type=positive_int, default=32)
    parser.add_argument("--range-ratio", type=range_ratio, default=0.0, help="lengths uniform in len*(1 +- ratio)")


@dataclasses.dataclass
class Workload:
    """Random prompts (token ids) and the number of tokens to generate for each, drawn from --seed."""

    prompts: list[list[int]]
    input_lens: list[int]
    output_lens: list[int]

    @classmethod
    def from_args(cls, args: argparse.Namespace, vocab_size: int) -> Workload:
        rng = np.random.default_rng(args.seed)
        input_lens = random_lengths(args.num_prompts, args.input_len, args.range_ratio, rng)
        output_lens = random_lengths(args.num_prompts, args.output_len, args.range_ratio, rng)
        return cls(random_prompts(input_lens, vocab_size, rng), input_lens, output_lens)


def engine_config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace,
                            **options: Any) -> EngineConfig:
    """The engine's config from `add_engine_arguments`' options and `options` (EngineConfig fields)."""
    try:
        return EngineConfig(
            model=args.model, dtype=args.dtype, policy=args.policy, max_model_len=args.max_model_len,
            gpu_kv_cache_gb=args.gpu_kv_cache_gb, gpu_memory_utilization=args.gpu_memory_utilization,
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
            cpu_kv_cache_gb=args.cpu_kv_cache_gb, cost_table=args.cost_table, block_size=args.block_size,
            seed=args.seed, tensor_parallel_size=args.tensor_parallel_size, **options)
    except ValueError as error:
        option_error(parser, error)


def checked_workload(parser: argparse.ArgumentParser, args: argparse.Namespace, config: EngineConfig) -> Workload:
    """The workload of `add_workload_arguments`' options, drawn before any model loads: a prompt longer than
    max_model_len, which the engine rejects (`LLMEngine.prompt_error`), is an error on --input-len."""
    try:
        model_config = get_config(config.model)
        max_model_len = config.resolved_max_model_len(model_config)
    except ValueError as error:
        option_error(parser, error)
    workload = Workload.from_args(args, model_config.vocab_size)
    longest = max(workload.input_lens)
    if longest > max_model_len:
        parser.error(f"argument --input-len: a prompt of {longest} tokens is longer than "
                     f"max_model_len={max_model_len}, which the engine rejects")
    return workload


def engine_from_config(parser: argparse.ArgumentParser, config: EngineConfig) -> LLMEngine:
    """The engine; sizes that its loaded model or the machine cannot take are argument errors too."""
    try:
        return LLMEngine(config)
    except ValueError as error:
        option_error(parser, error)


def scenario_name(args: argparse.Namespace) -> str:
    """`--scenario`, else model, tensor-parallel size and GPU KV budget: what the policies compared in one scenario
    share (not the host pool, which only the offload policies have)."""
    if args.scenario:
        return args.scenario
    gpu = "auto" if args.gpu_kv_cache_gb is None else f"{args.gpu_kv_cache_gb:g} GiB"
    tensor_parallel = f" tp{args.tensor_parallel_size}" if args.tensor_parallel_size > 1 else ""
    return f"{os.path.basename(os.path.normpath(args.model))}{tensor_parallel}, GPU KV {gpu}"


def host_read_gb_per_s(probe_mb: int) -> float:
    """Median GB/s of the CPU op's multithreaded read probe, measured now."""
    return float(np.median(read_bandwidth_probe(probe_mb << 20, 5)))


def greedy(output_len: int) -> SamplingParams:
    """The benchmarks' requests: greedy, exactly `output_len` tokens (EOS ignored), so runs are reproducible."""
    return SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)


def compile_ahead(engine: LLMEngine, prompts: list[list[int]], output_lens: list[int], max_workers: int,
                  arrivals: Sequence[float] | None = None, step_seconds: Sequence[float] = (0.0,)) -> int:
    """`LLMEngine.compile_ahead` over the benchmark's greedy requests, timed on stdout; the number of programs."""
    start = time.perf_counter()
    requests = [(prompt, greedy(n)) for prompt, n in zip(prompts, output_lens)]
    num_programs = engine.compile_ahead(requests, max_workers, arrivals, step_seconds)
    print(f"compiled {num_programs} step programs in {time.perf_counter() - start:.1f} s")
    return num_programs


def step_kind(moves_kv: bool, pipelined: bool) -> str:
    """How the benchmarks sort steps: "swap" (moved KV between the pools), "pipelined" (had a batch-1), "gpu"."""
    return "swap" if moves_kv else "pipelined" if pipelined else "gpu"


class StepMeter:
    """Steps an engine, keeping the wall time of each step, and the scheduler's counters and the step programs
    compiled from the moment the meter was made.

    A step's time is that of the `engine.step()` call that books its tokens, with the counters its scheduling
    changed: under asynchronous scheduling the call that schedules a step books the one before it, whose device
    time it waits for (the first call books nothing: its time goes to the next)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.step_times: list[float] = []
        self.step_counters: list[dict[str, int]] = []  # per step, the counters it changed and by how much
        self.step_phases: list[dict[str, float]] = []   # per step, engine.last_step_phases of its booking call
        self._start = self._last = dataclasses.asdict(engine.scheduler.stats)
        self._start_compilations = num_step_compilations()
        self._start_xla_compilations = num_xla_compilations()
        self._unbooked: collections.deque[dict[str, int]] = collections.deque()  # counters of launched steps
        self._unbooked_seconds = 0.0

    def _stepping_books_a_step(self) -> bool:
        """Asked before `engine.step()`: whether the call books a step. Asked after it: whether it launched one
        (under synchronous scheduling every call does both; a schedule that found nothing launches nothing)."""
        return self.engine.has_step_in_flight or not self.engine.config.async_scheduling

    def step(self) -> list[Request]:
        booking = self._stepping_books_a_step()
        start = time.perf_counter()
        finished = self.engine.step()
        self._unbooked_seconds += time.perf_counter() - start
        before, self._last = self._last, dataclasses.asdict(self.engine.scheduler.stats)
        changed = {name: now - before[name] for name, now in self._last.items() if now != before[name]}
        if changed and self._stepping_books_a_step():
            self._unbooked.append(changed)
        if booking:
            self.step_times.append(self._unbooked_seconds)
            self.step_counters.append(self._unbooked.popleft())
            self.step_phases.append(dataclasses.asdict(self.engine.last_step_phases))
            self._unbooked_seconds = 0.0
        return finished

    def seconds_by_kind(self) -> dict[str, dict[str, float]]:
        """Steps and seconds per `step_kind`."""
        kinds: dict[str, dict[str, float]] = {}
        for seconds, changed in zip(self.step_times, self.step_counters):
            kind = step_kind("num_swap_out" in changed or "num_swap_in" in changed, "num_pipelined_steps" in changed)
            totals = kinds.setdefault(kind, {"steps": 0, "seconds": 0.0})
            totals["steps"] += 1
            totals["seconds"] += seconds
        return kinds

    def slowest_steps(self, count: int = 8) -> list[dict[str, Any]]:
        order = sorted(range(len(self.step_times)), key=self.step_times.__getitem__, reverse=True)[:count]
        return [{"step": i, "ms": 1000.0 * self.step_times[i], **self.step_counters[i]} for i in order]

    def median_phase_ms(self) -> dict[str, float]:
        """Per phase of `StepPhases` (schedule_s -> schedule_ms, ...), its median over the steps."""
        return {name.removesuffix("_s") + "_ms": 1000.0 * float(np.median([p[name] for p in self.step_phases]))
                for name in self.step_phases[0]}

    def counters(self) -> dict[str, int]:
        return {name: now - self._start[name] for name, now in self._last.items()}

    def bound(self, host_gb_per_s: float) -> dict[str, Any]:
        """The run's counters and its bandwidth bound on the gain over GPU-only (benchmark_metrics), with the
        median and longest step, the median host time of each phase of a step, and the step programs compiled
        meanwhile (each an XLA compile inside the run)."""
        counters, config = self.counters(), self.engine.model_config
        per_token = kv_bytes_per_token(config.num_layers, config.num_kv_heads, config.head_dim,
                                       DTYPE_BYTES[config.dtype])
        bound = bandwidth_bound(host_gb_per_s * 1e9, sum(self.step_times), counters["num_steps"],
                                counters["gpu_kv_tokens_read"], counters["cpu_kv_tokens_read"], per_token)
        return {"counters": counters, **bound, "median_step_ms": 1000.0 * float(np.median(self.step_times)),
                "max_step_ms": 1000.0 * max(self.step_times), "median_phase_ms": self.median_phase_ms(),
                "seconds_by_step_kind": self.seconds_by_kind(),
                "slowest_steps": self.slowest_steps(),
                "step_compilations": num_step_compilations() - self._start_compilations,
                "xla_compilations": num_xla_compilations() - self._start_xla_compilations}


def format_step(bound: dict[str, Any]) -> str:
    """The median step and its phases, from `StepMeter.bound`, for the summary line."""
    phases = ", ".join(f"{name.removesuffix('_ms')} {ms:.2f}" for name, ms in bound["median_phase_ms"].items())
    return f"median step {bound['median_step_ms']:.2f} ms ({phases})"


def pool_sizes(engine: LLMEngine) -> dict[str, int]:
    return {"num_gpu_blocks": engine.pool.num_blocks,
            "num_cpu_blocks": engine.host_pool.num_blocks if engine.host_pool is not None else 0}


def machine_info() -> dict[str, Any]:
    """The accelerator, the host CPU (as the cost tables name it) and the commit, for the JSON of every benchmark."""
    # The GPU machine runs a copy of the working tree whose .git may lag: NEO_JAX_COMMIT names the real commit.
    commit = os.environ.get("NEO_JAX_COMMIT")
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    device = jax.devices()[0]
    machine = MachineId.current(device.device_kind)
    return {"device": f"{device.platform}:{device.device_kind}", "num_devices": jax.device_count(),
            "cpu": machine.cpu_model, "cpu_count": len(os.sched_getaffinity(0)), "cpu_isa": cpu_isa(),
            "cpu_attention_threads": machine.cpu_threads, "jax": jax.__version__, "commit": commit,
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}


def json_safe(value: Any) -> Any:
    """`value` with each infinite or NaN float as the string "inf", "-inf" or "nan", as vLLM writes
    `"request_rate": "inf"`: standard JSON has no such numbers (`float()` reads the strings back); paths as
    strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def write_json(path: str | None, results: dict[str, Any], echo: bool = True) -> None:
    text = json.dumps(json_safe(results), indent=2, allow_nan=False)
    if echo:
        print(text)
    if path:
        with open(path, "w") as f:
            f.write(text)
