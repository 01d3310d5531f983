"""Predicted per-layer GPU and CPU times that the scheduling policies weigh against each other.

A `CostModel` holds tables that `scripts/profile.py` measures for one model on one machine, all in
seconds per transformer layer:

| table | argument(s) | what was timed |
| --- | --- | --- |
| `linear` | tokens in the batch | projections, MLP and norms of one layer |
| `prefill_attention` | prompt tokens of one request | causal attention of one prefill on the GPU |
| `gpu_decode_attention` | total context tokens of the GPU decodes | paged decode attention on the GPU |
| `cpu_decode_attention` | (CPU decodes, their total context tokens) | the CPU attention op |
| `handoff` | CPU decodes in the handed-off batch | GPU->host->GPU round trip beyond the CPU work |

Between measured points the tables (neo_jax/cost_tables.py) interpolate linearly; beyond them they
extrapolate the end segment, clamped at zero. JSON form (`CostModel.save` / `CostModel.load`):

    {"schema_version": 3, "model": str, "dtype": str, "block_size": int, "num_layers": int,
     "machine": {"cpu_model": str, "cpu_threads": int, "gpu_name": str},
     "tables": {"linear": {"points": [...], "seconds": [...]}, "prefill_attention": {...},
                "gpu_decode_attention": {...}, "handoff": {...},
                "cpu_decode_attention": {"rows": [...], "columns": [...], "seconds": [[...], ...]}}}

`load_cost_model` picks the table of the current model and machine from a directory, or warns and
builds `fallback_cost_model` from first principles (bytes and FLOPs over bandwidths given as
`HardwareSpec`). Pure Python: no JAX.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
import warnings
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neo_jax.cost_tables import Table1D, Table2D

if TYPE_CHECKING:
    from neo_jax.models.config import ModelConfig

# 2: scripts/profile.py times the handoff around a decoder layer, as the step runs it; version-1 tables
# charged a third of the handoff's cost on the H200, so they are re-measured rather than read.
# 3: the machine is named by the CPU op's thread count (`cpu_threads`), not the host's cores: the pool's
# default became half the cores on GPU machines, and both the CPU attention and the handoff times depend on it.
SCHEMA_VERSION = 3
DEFAULT_COST_TABLE_DIR = Path(os.environ.get("NEO_JAX_COST_TABLES", "~/.cache/neo_jax/cost_tables")).expanduser()
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class CostTableMissingWarning(UserWarning):
    """No profiled table matches the model and machine; a first-principles fallback is in use."""


def _cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclasses.dataclass(frozen=True)
class MachineId:
    """What a cost table was measured on; a table applies only to an equal machine."""

    cpu_model: str
    cpu_threads: int  # threads of the CPU attention op's pool (neo_jax.cpu_ops.num_threads())
    gpu_name: str

    @classmethod
    def current(cls, gpu_name: str, cpu_threads: int | None = None) -> MachineId:
        """This host's CPU model and the accelerator name the caller read from JAX; `cpu_threads` defaults to
        the CPU op's pool as it is now (importing the extension)."""
        if cpu_threads is None:
            from neo_jax.cpu_ops import num_threads
            cpu_threads = num_threads()
        return cls(cpu_model=_cpu_model_name(), cpu_threads=cpu_threads, gpu_name=gpu_name)

    def describe(self) -> str:
        return f"cpu {self.cpu_model!r} ({self.cpu_threads} attention threads), gpu {self.gpu_name!r}"


def _field(mapping: Any, key: str, where: str) -> Any:
    if not isinstance(mapping, dict) or key not in mapping:
        raise ValueError(f"cost table JSON: missing field '{where}{key}'")
    return mapping[key]


_TABLES_1D = ("linear", "prefill_attention", "gpu_decode_attention", "handoff")


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Per-layer time predictions for one model (name, dtype, block size) on one machine."""

    model: str
    machine: MachineId
    dtype: str
    block_size: int
    num_layers: int
    linear: Table1D                  # vs tokens in the batch
    prefill_attention: Table1D       # vs prompt tokens of one request
    gpu_decode_attention: Table1D    # vs total context tokens of the batch's GPU decodes
    cpu_decode_attention: Table2D    # vs (number of CPU decodes, their total context tokens)
    handoff: Table1D                 # vs number of CPU decodes handed off

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of {tuple(DTYPE_BYTES)}")
        for field in ("block_size", "num_layers"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field}: must be positive, got {getattr(self, field)}")

    def linear_time(self, tokens: int) -> float:
        return self.linear(tokens) if tokens > 0 else 0.0

    def prefill_attention_time(self, num_tokens: int, context_len: int) -> float:
        """A chunk of `num_tokens` ending at `context_len` does the causal work of a whole prompt of
        sqrt(num_tokens * (2 * context_len - num_tokens)) tokens; the table is indexed by that."""
        if num_tokens <= 0:
            return 0.0
        return self.prefill_attention(math.sqrt(num_tokens * (2 * context_len - num_tokens)))

    def gpu_decode_attention_time(self, total_context: int) -> float:
        return self.gpu_decode_attention(total_context) if total_context > 0 else 0.0

    def cpu_decode_attention_time(self, num_requests: int, total_context: int) -> float:
        return self.cpu_decode_attention(num_requests, total_context) if num_requests > 0 else 0.0

    def handoff_time(self, num_requests: int) -> float:
        return self.handoff(num_requests) if num_requests > 0 else 0.0

    @cached_property
    def linear_knee_tokens(self) -> float:
        """Batch width where the linear layers stop being bound by reading weights: the small-batch
        time over the per-token slope of the largest measured segment. Below it, fewer tokens
        barely shorten the layer."""
        points, seconds = self.linear.points, self.linear.seconds
        if len(points) == 1:
            return points[0]
        slope = (seconds[-1] - seconds[-2]) / (points[-1] - points[-2])
        return seconds[0] / slope if slope > 0.0 else points[-1]

    def matches(self, model: str, dtype: str, block_size: int, machine: MachineId) -> bool:
        return (self.model, self.dtype, self.block_size, self.machine) == (model, dtype, block_size, machine)

    def describe(self) -> str:
        return f"model {self.model!r} ({self.dtype}, block {self.block_size}) on {self.machine.describe()}"

    def to_dict(self) -> dict[str, Any]:
        tables = {name: getattr(self, name).to_dict() for name in _TABLES_1D}
        tables["cpu_decode_attention"] = self.cpu_decode_attention.to_dict()
        return {"schema_version": SCHEMA_VERSION, "model": self.model, "dtype": self.dtype,
                "block_size": self.block_size, "num_layers": self.num_layers,
                "machine": dataclasses.asdict(self.machine), "tables": tables}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CostModel:
        version = _field(data, "schema_version", "")
        if version != SCHEMA_VERSION:
            raise ValueError(f"cost table JSON: schema_version {version!r}, this code reads {SCHEMA_VERSION}")
        machine = _field(data, "machine", "")
        tables = _field(data, "tables", "")
        one_d = {name: Table1D(_field(_field(tables, name, "tables."), "points", f"tables.{name}."),
                               _field(tables[name], "seconds", f"tables.{name}."), name=name)
                 for name in _TABLES_1D}
        cpu = _field(tables, "cpu_decode_attention", "tables.")
        where = "tables.cpu_decode_attention."
        return cls(
            model=str(_field(data, "model", "")), dtype=str(_field(data, "dtype", "")),
            block_size=int(_field(data, "block_size", "")), num_layers=int(_field(data, "num_layers", "")),
            machine=MachineId(str(_field(machine, "cpu_model", "machine.")),
                              int(_field(machine, "cpu_threads", "machine.")),
                              str(_field(machine, "gpu_name", "machine."))),
            cpu_decode_attention=Table2D(_field(cpu, "rows", where), _field(cpu, "columns", where),
                                         _field(cpu, "seconds", where), name="cpu_decode_attention"),
            **one_d)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> CostModel:
        with open(path) as file:
            return cls.from_dict(json.load(file))


def gpu_side_name(device_kind: str, tensor_parallel_size: int) -> str:
    """The `MachineId.gpu_name` of a GPU side of `tensor_parallel_size` devices of `device_kind`."""
    return device_kind if tensor_parallel_size == 1 else f"{device_kind} x{tensor_parallel_size}"


def cost_table_path(directory: str | os.PathLike, model: str, dtype: str, block_size: int,
                    machine: MachineId) -> Path:
    """Where `scripts/profile.py` saves the table of this model and machine."""
    parts = (model, dtype, f"block{block_size}", machine.cpu_model, f"{machine.cpu_threads}threads", machine.gpu_name)
    return Path(directory) / ("__".join(re.sub(r"[^A-Za-z0-9.-]+", "-", p).strip("-") for p in parts) + ".json")


@dataclasses.dataclass(frozen=True)
class HardwareSpec:
    """Rates for the first-principles fallback; defaults are the H100 machine's (DEVICE.md)."""

    gpu_flops: float = 400e12              # dense bf16 FLOP/s reachable by the GEMMs
    gpu_memory_bandwidth: float = 2.5e12   # bytes/s of HBM read
    cpu_memory_bandwidth: float = 80e9     # bytes/s of host memory read by all cores
    host_link_bandwidth: float = 40e9      # bytes/s of pinned copies each way
    handoff_latency_s: float = 100e-6      # fixed cost of one GPU->CPU->GPU round trip

    def over_gpus(self, num_gpus: int) -> HardwareSpec:
        """The rates of `num_gpus` such GPUs splitting each layer's work (tensor parallel), all-reduces ignored."""
        return dataclasses.replace(self, gpu_flops=self.gpu_flops * num_gpus,
                                   gpu_memory_bandwidth=self.gpu_memory_bandwidth * num_gpus)


def _roofline(flops: float, nbytes: float, hardware: HardwareSpec) -> float:
    return max(flops / hardware.gpu_flops, nbytes / hardware.gpu_memory_bandwidth)


def fallback_cost_model(config: ModelConfig, *, model: str, machine: MachineId, block_size: int,
                        hardware: HardwareSpec = HardwareSpec()) -> CostModel:
    """Tables computed from the model's shapes and `hardware`'s rates instead of measurements."""
    nbytes = DTYPE_BYTES[config.dtype]
    q_width, kv_width = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    params = config.hidden_size * (2 * q_width + 2 * kv_width) + 3 * config.hidden_size * config.intermediate_size
    kv_bytes_per_token = 2 * kv_width * nbytes
    knee = nbytes * hardware.gpu_flops / (2 * hardware.gpu_memory_bandwidth)  # weight reads = GEMM FLOPs
    token_points = sorted({2.0 ** i for i in range(15)} | {knee})
    prompt_points = sorted({2.0 ** i for i in range(17)} | {1.5 * 2.0 ** i for i in range(1, 16)})
    context_points = (0.0, 2.0 ** 24)
    request_points = (1.0, 1024.0)
    handoff_bytes = (2 * q_width + 2 * kv_width) * nbytes

    def cpu_seconds(context: float) -> float:
        return context * kv_bytes_per_token / hardware.cpu_memory_bandwidth

    return CostModel(
        model=model, machine=machine, dtype=config.dtype, block_size=block_size, num_layers=config.num_layers,
        linear=Table1D(token_points, [_roofline(2 * params * t, params * nbytes, hardware) for t in token_points],
                       name="linear"),
        prefill_attention=Table1D(prompt_points, [_roofline(2 * p * p * q_width, p * kv_bytes_per_token, hardware)
                                                  for p in prompt_points], name="prefill_attention"),
        gpu_decode_attention=Table1D(context_points, [c * kv_bytes_per_token / hardware.gpu_memory_bandwidth
                                                      for c in context_points], name="gpu_decode_attention"),
        cpu_decode_attention=Table2D(request_points, context_points,
                                     [[cpu_seconds(c) for c in context_points]] * len(request_points),
                                     name="cpu_decode_attention"),
        handoff=Table1D(request_points, [hardware.handoff_latency_s + n * handoff_bytes / hardware.host_link_bandwidth
                                         for n in request_points], name="handoff"),
    )


def load_cost_model(config: ModelConfig, *, model: str, machine: MachineId, block_size: int,
                    directory: str | os.PathLike = DEFAULT_COST_TABLE_DIR,
                    hardware: HardwareSpec = HardwareSpec()) -> CostModel:
    """The profiled table in `directory` for this model, dtype, block size and machine; when none
    matches, warns (`CostTableMissingWarning`, saying what was found) and returns the fallback."""
    directory = Path(directory)
    found = []
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            candidate = CostModel.load(path)
        except (OSError, ValueError) as error:
            found.append(f"{path.name}: unreadable ({error})")
            continue
        if candidate.matches(model, config.dtype, block_size, machine):
            return candidate
        found.append(f"{path.name}: {candidate.describe()}")
    wanted = f"model {model!r} ({config.dtype}, block {block_size}) on {machine.describe()}"
    seen = "; ".join(found) if found else "no tables"
    warnings.warn(f"no cost table for {wanted} in {directory} ({seen}); run scripts/profile.py to measure one. "
                  "Scheduling with the first-principles fallback cost model.", CostTableMissingWarning, stacklevel=2)
    return fallback_cost_model(config, model=model, machine=machine, block_size=block_size, hardware=hardware)
