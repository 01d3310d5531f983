"""What one step of the CPU-GPU pipeline computes (`PipelineSchedule`) and its packing into padded arrays.

Batch-0 is the GPU-only engine's batch (GPU-resident decodes, and prefills whose KV goes to either pool)
plus a share of host-resident decodes; batch-1 holds host-resident decodes only. A host-resident request's
slots and block tables index the host pool. Padding never touches live KV: padded host slots are -1 (the
host calls skip them), padded CPU rows have context length 0, and padded GPU slots point at scratch block 0.
Sampled rows are batch-0's GPU rows (as `pack_step` lays them out), then batch-0's CPU rows, then batch-1's.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from neo_jax.batch import (ScheduledChunk, StepBatch, fill_decode_rows, pack_step, prefill_spans,
                           resolve_pending_tokens, slots_of, split_chunks)
from neo_jax.config import MIN_TOKEN_BUCKET, StepBuckets, bucket, power_of_two_at_least
from neo_jax.sequence import Request

NO_HOST_SLOT = -1


@dataclasses.dataclass
class KvMove:
    """The first `num_tokens` KV rows of a request, copied between the pools before the step's layers run."""

    request: Request
    source_table: list[int]
    target_table: list[int]
    num_tokens: int


@dataclasses.dataclass
class PipelineSchedule:
    """One step: batch-0's GPU chunks (its host-pool prefills named by id), its CPU decodes, batch-1's."""

    gpu_chunks: list[ScheduledChunk]
    host_prefill_ids: frozenset[int] = frozenset()
    batch0_cpu_chunks: list[ScheduledChunk] = dataclasses.field(default_factory=list)
    batch1_cpu_chunks: list[ScheduledChunk] = dataclasses.field(default_factory=list)
    swap_out: list[KvMove] = dataclasses.field(default_factory=list)  # GPU pool -> host pool
    swap_in: list[KvMove] = dataclasses.field(default_factory=list)   # host pool -> GPU pool

    @property
    def chunks(self) -> list[ScheduledChunk]:
        return self.gpu_chunks + self.batch0_cpu_chunks + self.batch1_cpu_chunks

    @property
    def uses_host(self) -> bool:
        return bool(self.host_prefill_ids or self.batch0_cpu_chunks or self.batch1_cpu_chunks
                    or self.swap_out or self.swap_in)


@functools.partial(jax.tree_util.register_dataclass, meta_fields=[], data_fields=[
    "token_ids", "positions", "slot_mapping", "block_tables", "context_lens"])
@dataclasses.dataclass
class CpuDecodes:
    """C decode rows whose attention runs on the CPU over the host pool; M host blocks per table."""

    token_ids: jax.Array     # int32[C]
    positions: jax.Array     # int32[C]
    slot_mapping: jax.Array  # int32[C] host slot of the new token's KV; -1 pads
    block_tables: jax.Array  # int32[C, M]
    context_lens: jax.Array  # int32[C] the new token included; 0 pads

    @property
    def num_rows(self) -> int:
        return self.context_lens.shape[0]

    def with_previous_tokens(self, previous_tokens: jax.Array) -> CpuDecodes:
        return dataclasses.replace(self, token_ids=resolve_pending_tokens(self.token_ids, previous_tokens))


@functools.partial(jax.tree_util.register_dataclass, meta_fields=[], data_fields=[
    "gpu", "host_prefill_slots", "host_chunk_rows", "host_context_slots", "batch0_cpu", "batch1_cpu",
    "swap_out_gpu_slots", "swap_out_host_slots", "swap_in_host_slots", "swap_in_gpu_slots"])
@dataclasses.dataclass
class PipelineBatch:
    """Both micro-batches and the step's pool-to-pool copies (P prefill tokens, S context entries, W, Z rows)."""

    gpu: StepBatch                  # batch-0's GPU decodes and prefills; host-pool tokens aim at scratch slot 0
    host_prefill_slots: jax.Array   # int32[P] host slot of each prefill token whose KV goes to the host, else -1
    host_chunk_rows: jax.Array      # int32[S] for a context entry of a host prefill's own chunk: its prefill
                                    #   token (its K/V is on the GPU this step), else -1
    host_context_slots: jax.Array   # int32[S or 0] host slot of each entry of a host prefill's prefix (earlier
                                    #   chunks, read back from the host), else -1; empty when no prefix
    batch0_cpu: CpuDecodes          # batch-0's share of host-resident decodes
    batch1_cpu: CpuDecodes          # batch-1
    swap_out_gpu_slots: jax.Array   # int32[W] read from the GPU pool ...
    swap_out_host_slots: jax.Array  # int32[W] ... written into the host pool (-1 pads)
    swap_in_host_slots: jax.Array   # int32[Z] read from the host pool (-1 pads: a zero row) ...
    swap_in_gpu_slots: jax.Array    # int32[Z] ... written into the GPU pool

    @property
    def has_host_prefills(self) -> bool:
        return self.host_prefill_slots.shape[0] > 0

    def with_previous_tokens(self, previous_tokens: jax.Array) -> PipelineBatch:
        return dataclasses.replace(self, gpu=self.gpu.with_previous_tokens(previous_tokens),
                                   batch0_cpu=self.batch0_cpu.with_previous_tokens(previous_tokens),
                                   batch1_cpu=self.batch1_cpu.with_previous_tokens(previous_tokens))


def pack_cpu_decodes(chunks: list[ScheduledChunk], block_size: int,
                     buckets: StepBuckets) -> tuple[CpuDecodes, list[Request | None]]:
    num_rows = bucket(len(chunks), buckets.num_seqs)
    width = bucket(max((len(c.request.block_table) for c in chunks), default=0), buckets.num_blocks)
    token_ids = np.zeros(num_rows, np.int32)
    positions = np.zeros(num_rows, np.int32)
    slot_mapping = np.full(num_rows, NO_HOST_SLOT, np.int32)
    block_tables = np.zeros((num_rows, width), np.int32)
    context_lens = np.zeros(num_rows, np.int32)
    sampled: list[Request | None] = [None] * num_rows
    sampled[:len(chunks)] = fill_decode_rows(chunks, block_size, token_ids, positions, slot_mapping, block_tables,
                                             context_lens)
    return CpuDecodes(token_ids, positions, slot_mapping, block_tables, context_lens), sampled


def pack_moves(moves: list[KvMove], block_size: int, pad_source: int, pad_target: int) -> tuple[np.ndarray, ...]:
    """Source and target slots of every moved KV row, padded to a power of two (none: 0 rows)."""
    num_rows = sum(m.num_tokens for m in moves)
    size = power_of_two_at_least(num_rows, MIN_TOKEN_BUCKET) if num_rows else 0
    source = np.full(size, pad_source, np.int32)
    target = np.full(size, pad_target, np.int32)
    offset = 0
    for move in moves:
        positions = np.arange(move.num_tokens)
        source[offset:offset + move.num_tokens] = slots_of(move.source_table, positions, block_size)
        target[offset:offset + move.num_tokens] = slots_of(move.target_table, positions, block_size)
        offset += move.num_tokens
    return source, target


def pack_pipeline_step(schedule: PipelineSchedule, block_size: int,
                       buckets: StepBuckets) -> tuple[PipelineBatch, list[Request | None]]:
    """The padded arrays of a pipeline step and the request each sampled row belongs to (None: discard)."""
    gpu, gpu_sampled = pack_step(schedule.gpu_chunks, block_size, buckets)
    num_prefill_tokens, num_context = gpu.prefill_request_ids.shape[0], gpu.context_slots.shape[0]
    _, prefills = split_chunks(schedule.gpu_chunks)
    host_prefills = [c for c in prefills if c.request.request_id in schedule.host_prefill_ids]
    host_prefill_slots = np.full(num_prefill_tokens if host_prefills else 0, NO_HOST_SLOT, np.int32)
    host_chunk_rows = np.full(num_context if host_prefills else 0, -1, np.int32)
    has_prefix = any(c.start > 0 for c in host_prefills)
    host_context_slots = np.full(num_context if has_prefix else 0, NO_HOST_SLOT, np.int32)
    num_decode_rows = gpu.num_decodes
    for chunk, token_slice, context_slice in prefill_spans(prefills, num_decode_rows):
        if chunk.request.request_id not in schedule.host_prefill_ids:
            continue
        prefill_slice = slice(token_slice.start - num_decode_rows, token_slice.stop - num_decode_rows)
        host_prefill_slots[prefill_slice] = gpu.slot_mapping[token_slice]
        gpu.slot_mapping[token_slice] = 0
        prefix = slice(context_slice.start, context_slice.start + chunk.start)
        if has_prefix:
            host_context_slots[prefix] = gpu.context_slots[prefix]
        host_chunk_rows[prefix.stop:context_slice.stop] = np.arange(prefill_slice.start, prefill_slice.stop)
        gpu.context_slots[context_slice] = 0
    batch0_cpu, batch0_sampled = pack_cpu_decodes(schedule.batch0_cpu_chunks, block_size, buckets)
    batch1_cpu, batch1_sampled = pack_cpu_decodes(schedule.batch1_cpu_chunks, block_size, buckets)
    swap_out_gpu, swap_out_host = pack_moves(schedule.swap_out, block_size, 0, NO_HOST_SLOT)
    swap_in_host, swap_in_gpu = pack_moves(schedule.swap_in, block_size, NO_HOST_SLOT, 0)
    batch = PipelineBatch(gpu, host_prefill_slots, host_chunk_rows, host_context_slots, batch0_cpu, batch1_cpu,
                          swap_out_gpu, swap_out_host, swap_in_host, swap_in_gpu)
    return batch, gpu_sampled + batch0_sampled + batch1_sampled
