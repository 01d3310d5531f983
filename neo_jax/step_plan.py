"""What a scheduler hands to `neo_policy.plan_step` each step, and the `StepPlan` it gets back.

The views describe requests and pools with plain numbers and ids (no engine objects), so the policies are
pure Python that tests and benchmarks drive without JAX.
"""

from __future__ import annotations

import dataclasses

GPU, CPU = "gpu", "cpu"
POLICIES = ("gpu-only", "cpu-all", "neo")


def check_positive(owner: str, **values: int) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{owner}.{name}: must be positive, got {value}")


@dataclasses.dataclass(slots=True)
class DecodeView:
    """A running request that decodes one token this step. Mutable and slotted so that building
    hundreds per step stays cheap (an engine may also keep one per request and update it)."""

    request_id: int
    context_len: int   # KV tokens once this step's token is appended
    pool: str          # "gpu" or "cpu": where its KV lives now
    arrival: int       # arrival order; smaller is earlier

    def __post_init__(self) -> None:
        if self.context_len < 1:
            raise ValueError(f"DecodeView.context_len: must be positive, got {self.context_len}")
        if self.pool != GPU and self.pool != CPU:
            raise ValueError(f"DecodeView.pool: must be 'gpu' or 'cpu', got {self.pool!r}")


@dataclasses.dataclass(slots=True)
class PrefillView:
    """A request with prompt tokens left to compute. When the step's token budget runs short, the
    last prefill admitted gets a shorter chunk (`StepPlan.prefill_num_tokens`)."""

    request_id: int
    num_tokens: int          # prompt tokens it would compute this step (all it has left, or a cap)
    context_len: int         # KV tokens after those
    arrival: int             # arrival order; smaller is earlier
    pool: str | None = None  # pool holding its earlier chunks' KV; None before its first chunk

    def __post_init__(self) -> None:
        if self.num_tokens < 1:
            raise ValueError(f"PrefillView.num_tokens: must be positive, got {self.num_tokens}")
        if self.context_len < self.num_tokens:
            raise ValueError(f"PrefillView.context_len: {self.context_len} is below num_tokens {self.num_tokens}")
        if self.pool not in (None, GPU, CPU):
            raise ValueError(f"PrefillView.pool: must be None, 'gpu' or 'cpu', got {self.pool!r}")


@dataclasses.dataclass(frozen=True)
class PoolState:
    """Blocks of the two KV pools before this step allocates anything."""

    block_size: int
    gpu_total_blocks: int
    gpu_free_blocks: int
    cpu_total_blocks: int
    cpu_free_blocks: int

    def __post_init__(self) -> None:
        check_positive("PoolState", block_size=self.block_size)
        for pool in (GPU, CPU):
            total, free = getattr(self, f"{pool}_total_blocks"), getattr(self, f"{pool}_free_blocks")
            if not 0 <= free <= total:
                raise ValueError(f"PoolState.{pool}_free_blocks: {free} is not within [0, {pool}_total_blocks={total}]")


@dataclasses.dataclass(frozen=True)
class StepBudget:
    """Limits on one step over both batches: a decode costs one token, a prefill its chunk."""

    max_num_tokens: int
    max_num_seqs: int

    def __post_init__(self) -> None:
        check_positive("StepBudget", max_num_tokens=self.max_num_tokens, max_num_seqs=self.max_num_seqs)


@dataclasses.dataclass
class StepPlan:
    """One step's decisions, as request ids in arrival order. Prefills and GPU decodes run in
    batch-0; batch-1 (only when `pipelined`) holds CPU decodes; requests named nowhere wait."""

    policy: str
    pipelined: bool = False
    prefill_ids_gpu: list[int] = dataclasses.field(default_factory=list)   # KV into the GPU pool
    prefill_ids_cpu: list[int] = dataclasses.field(default_factory=list)   # KV into the host pool
    swap_out_ids: list[int] = dataclasses.field(default_factory=list)      # GPU -> host, before the step
    swap_in_ids: list[int] = dataclasses.field(default_factory=list)       # host -> GPU, before the step
    preempt_ids: list[int] = dataclasses.field(default_factory=list)       # KV freed: no pool has room
    prefill_num_tokens: dict[int, int] = dataclasses.field(default_factory=dict)  # chunk granted per prefill
    batch0_gpu_decode_ids: list[int] = dataclasses.field(default_factory=list)
    batch0_cpu_decode_ids: list[int] = dataclasses.field(default_factory=list)
    batch1_cpu_decode_ids: list[int] = dataclasses.field(default_factory=list)
    predicted_step_s: float = 0.0   # the chosen plan, all layers
    pipelined_rate: float = 0.0     # requests/s predicted for the two-batch plan; 0 when none was formed
    gpu_only_rate: float = 0.0      # requests/s predicted for the one-batch plan

    @property
    def num_requests(self) -> int:
        return (len(self.prefill_ids_gpu) + len(self.prefill_ids_cpu) + len(self.batch0_gpu_decode_ids)
                + len(self.batch0_cpu_decode_ids) + len(self.batch1_cpu_decode_ids))
