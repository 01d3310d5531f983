"""KV pool sizing from a memory budget, buckets, and engine option validation."""

from __future__ import annotations

import pytest

from neo_jax.config import EngineConfig, StepBuckets, bucket, power_of_two_at_least, powers_of_two
from neo_jax.kv_cache import GIB, activation_reserve_bytes, kv_bytes_per_block, num_gpu_blocks
from neo_jax.models.config import PRESETS

LLAMA3 = PRESETS["llama-3-8b"]


class FakeGPU:
    def __init__(self, bytes_limit: int, bytes_in_use: int) -> None:
        self.stats = {"bytes_limit": bytes_limit, "bytes_in_use": bytes_in_use}

    def memory_stats(self) -> dict[str, int]:
        return self.stats


def test_bytes_per_block_of_llama3_8b():
    # K and V, 32 layers, 8 KV heads, 16 tokens, 128 dims, bf16.
    assert kv_bytes_per_block(LLAMA3, 16) == 2 * 32 * 8 * 16 * 128 * 2


def test_blocks_from_the_allocator_limit_minus_weights_and_reserve():
    config = EngineConfig(model="llama-3-8b", gpu_memory_utilization=0.9, max_num_seqs=4096)
    gpu = FakeGPU(bytes_limit=60 * GIB, bytes_in_use=16 * GIB)
    expected = int((60 * GIB * 0.9 - 16 * GIB - activation_reserve_bytes(LLAMA3, config))
                   // kv_bytes_per_block(LLAMA3, 16))
    assert num_gpu_blocks(LLAMA3, config, 8192, gpu) == expected


def test_gpu_kv_cache_gb_caps_and_num_gpu_blocks_overrides():
    gpu = FakeGPU(bytes_limit=60 * GIB, bytes_in_use=16 * GIB)
    capped = EngineConfig(model="llama-3-8b", gpu_kv_cache_gb=2.0, max_num_seqs=4096)
    assert num_gpu_blocks(LLAMA3, capped, 8192, gpu) == 2 * GIB // kv_bytes_per_block(LLAMA3, 16)
    assert num_gpu_blocks(LLAMA3, EngineConfig(model="llama-3-8b", num_gpu_blocks=7), 8192, gpu) == 7


def test_never_more_blocks_than_max_num_seqs_full_requests():
    config = EngineConfig(model="llama-3-8b", max_num_seqs=2)
    assert num_gpu_blocks(LLAMA3, config, 1024, FakeGPU(80 * GIB, 0)) == 2 * 64 + 1


def test_a_budget_without_room_for_the_scratch_block_raises():
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        num_gpu_blocks(LLAMA3, EngineConfig(model="llama-3-8b"), 8192, FakeGPU(20 * GIB, 17 * GIB))


def test_buckets():
    assert powers_of_two(16, 100) == (16, 32, 64, 100)
    assert powers_of_two(8, 2) == (8,)
    assert [power_of_two_at_least(n, 16) for n in (0, 16, 17, 1100, 4096)] == [16, 16, 32, 2048, 4096]
    assert [bucket(n, (1, 2, 4)) for n in (0, 1, 3, 4)] == [0, 1, 4, 4]
    with pytest.raises(ValueError, match="exceeds the largest bucket 4"):
        bucket(5, (1, 2, 4))
    buckets = StepBuckets.for_engine(EngineConfig(model="tiny", max_num_seqs=8, max_num_batched_tokens=64,
                                                  block_size=16), max_model_len=1000)
    assert buckets.num_seqs == (2, 4, 8) and buckets.num_tokens == (16, 32, 64)
    assert buckets.num_blocks == (8, 16, 32, 63)
    assert buckets.num_sample_rows(4, 64) == 12 and buckets.num_sample_rows(2, 0) == 2
    assert buckets.num_context(64, 64) == 64 and buckets.num_context(65, 64) == 128


def test_max_model_len_cannot_exceed_the_model():
    with pytest.raises(ValueError, match="max_model_len"):
        EngineConfig(model="tiny", max_model_len=4096).resolved_max_model_len(PRESETS["tiny"])
