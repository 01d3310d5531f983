"""Engine settings (`EngineConfig`) and the static shape buckets of the jitted step that follow from them."""

from __future__ import annotations

import dataclasses

from neo_jax.models.config import SUPPORTED_DTYPES, ModelConfig
from neo_jax.step_plan import POLICIES

MIN_TOKEN_BUCKET = 16
# Decode rows come in pairs at least: XLA turns a one-row scatter into a dynamic-update-slice, and on its CPU
# backend that made the step copy the whole KV cache several times (one request: 56 ms a step with 4096 tiny
# blocks against 1.5 ms for two). A padding row is dropped at the scratch block.
MIN_DECODE_BUCKET = 2
# Decode rows with short contexts share one block-table width (a few padded blocks cost little).
MIN_TABLE_BUCKET = 8


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the engine serves one model.

    KV budget on the GPU, in order of precedence: `num_gpu_blocks` (tests), else the blocks that fit in
    `gpu_memory_utilization` of the memory JAX may use (its allocator's limit, which already reflects
    XLA_PYTHON_CLIENT_MEM_FRACTION) minus what is in use and an activation reserve, capped by
    `gpu_kv_cache_gb` (GiB, lets benchmarks emulate a smaller GPU). Never more blocks than `max_num_seqs`
    requests of `max_model_len` tokens can fill. With `tensor_parallel_size` N > 1 the weights and the KV cache
    are split over N devices (neo_jax.sharding); the budgets above are per device.

    Policies: "gpu-only" (one batch, GPU pool only), "cpu-all" (every decode attends on the CPU over the host
    pool) and "neo" (load-aware CPU offloading). The offload policies add a host pool: `num_cpu_blocks`
    (tests), else `cpu_kv_cache_gb` GiB, else half the available host memory (no more than the requests can
    fill). They schedule with the cost table at `cost_table` (a JSON file from scripts/profile.py), else the
    table found for this model and machine, else a first-principles estimate. Under tensor parallelism one host
    pool serves every shard, each shard's CPU attention reading its own heads.

    `async_scheduling` (default on) schedules, packs and launches each step before fetching the tokens of the one
    still on the device, whose sampled tokens the new step reads on the device: the host's work between steps
    overlaps the device's instead of leaving it idle. The outputs are those of synchronous scheduling; a request
    that stops on a stop token computes one token more, which is dropped.
    """

    model: str
    dtype: str | None = None
    max_model_len: int | None = None
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    gpu_kv_cache_gb: float | None = None
    num_gpu_blocks: int | None = None
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    policy: str = "gpu-only"
    cpu_kv_cache_gb: float | None = None
    num_cpu_blocks: int | None = None
    cost_table: str | None = None
    seed: int = 0
    tensor_parallel_size: int = 1
    async_scheduling: bool = True

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of {SUPPORTED_DTYPES}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy: {self.policy!r} is not available; choose one of {POLICIES}")
        positive = ("block_size", "max_num_batched_tokens", "max_num_seqs", "tensor_parallel_size")
        for field in positive + ("max_model_len", "num_gpu_blocks", "num_cpu_blocks"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"{field}: must be a positive integer, got {value!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.gpu_kv_cache_gb is not None and self.gpu_kv_cache_gb <= 0:
            raise ValueError(f"gpu_kv_cache_gb: must be positive, got {self.gpu_kv_cache_gb}")
        if self.cpu_kv_cache_gb is not None and self.cpu_kv_cache_gb <= 0:
            raise ValueError(f"cpu_kv_cache_gb: must be positive, got {self.cpu_kv_cache_gb}")
        if self.num_cpu_blocks is not None and self.num_cpu_blocks < 2:
            raise ValueError(f"num_cpu_blocks: must be >= 2 (block 0 is scratch), got {self.num_cpu_blocks}")
        if self.num_gpu_blocks is not None and self.num_gpu_blocks < 2:
            raise ValueError(f"num_gpu_blocks: must be >= 2 (block 0 is scratch), got {self.num_gpu_blocks}")
        if not isinstance(self.async_scheduling, bool):
            raise ValueError(f"async_scheduling: must be True or False, got {self.async_scheduling!r}")
        if self.max_num_batched_tokens < MIN_TOKEN_BUCKET:
            raise ValueError(f"max_num_batched_tokens: must be >= {MIN_TOKEN_BUCKET}, got {self.max_num_batched_tokens}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed: must be in [0, 2**32), got {self.seed}")

    @property
    def offloads(self) -> bool:
        """Whether the policy keeps KV in a host pool too."""
        return self.policy != "gpu-only"

    def resolved_max_model_len(self, model_config: ModelConfig) -> int:
        if self.max_model_len is None:
            return model_config.max_position_embeddings
        if self.max_model_len > model_config.max_position_embeddings:
            raise ValueError(f"max_model_len: {self.max_model_len} exceeds the model's max_position_embeddings "
                             f"{model_config.max_position_embeddings}")
        return self.max_model_len


def powers_of_two(smallest: int, largest: int) -> tuple[int, ...]:
    """smallest, 2*smallest, ... up to the first value >= largest, which is replaced by `largest`."""
    sizes = [smallest]
    while sizes[-1] < largest:
        sizes.append(sizes[-1] * 2)
    sizes[-1] = max(largest, smallest)
    return tuple(sizes)


def power_of_two_at_least(size: int, smallest: int) -> int:
    """The smallest `smallest * 2**k` that holds `size`: an unbounded bucket (few sizes ever reach jit)."""
    bucket_size = smallest
    while bucket_size < size:
        bucket_size *= 2
    return bucket_size


def bucket(size: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds `size`; 0 stays 0 (that part of the step is absent)."""
    if size == 0:
        return 0
    for candidate in buckets:
        if candidate >= size:
            return candidate
    raise ValueError(f"size {size} exceeds the largest bucket {buckets[-1]}")


@dataclasses.dataclass(frozen=True)
class StepBuckets:
    """Padded sizes the step compiles for; each step rounds its dimensions up to these.

    The other dimensions follow from these, which keeps the number of distinct programs small: a step with
    B decode rows and P prefill tokens samples B + min(P // 2, max_num_seqs) rows (a prefill chunk has at
    least 2 tokens), and gathers P * 2**k context tokens (k = 0 when no prefill continues a cached prefix).
    """

    num_seqs: tuple[int, ...]      # decode rows
    num_tokens: tuple[int, ...]    # prefill tokens
    num_blocks: tuple[int, ...]    # block-table width of the decode rows
    max_num_seqs: int

    @classmethod
    def for_engine(cls, config: EngineConfig, max_model_len: int) -> StepBuckets:
        return cls(num_seqs=powers_of_two(MIN_DECODE_BUCKET, config.max_num_seqs),
                   num_tokens=powers_of_two(MIN_TOKEN_BUCKET, config.max_num_batched_tokens),
                   num_blocks=powers_of_two(MIN_TABLE_BUCKET, -(-max_model_len // config.block_size)),
                   max_num_seqs=config.max_num_seqs)

    def num_sample_rows(self, num_decode_rows: int, num_prefill_tokens: int) -> int:
        return num_decode_rows + min(num_prefill_tokens // 2, self.max_num_seqs)

    @property
    def max_sampled_rows(self) -> int:
        """A bound on any step's sampled rows: a pipeline step's GPU rows (decode rows and at most max_num_seqs
        prefills, above) and its two micro-batches' CPU rows, each at most the largest decode bucket."""
        return 4 * self.num_seqs[-1]

    @staticmethod
    def num_context(num_context_tokens: int, num_prefill_tokens: int) -> int:
        return power_of_two_at_least(num_context_tokens, num_prefill_tokens)
