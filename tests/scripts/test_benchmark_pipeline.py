"""benchmark_pipeline.py end to end on the tiny model: every figure it reports is there and positive."""

from __future__ import annotations

import numpy as np

from neo_jax.block_manager import BlockPool
from neo_jax.config import EngineConfig, StepBuckets
from neo_jax.host_inputs import host_layout
from neo_jax.kv_cache import kv_bytes_per_block
from neo_jax.models.config import get_config
from neo_jax.pipeline_batch import PipelineSchedule, pack_pipeline_step


def test_reports_the_handoff_the_overlap_host_prefills_and_swaps(load_script, tmp_path):
    output = tmp_path / "pipeline.json"
    results = load_script("benchmark_pipeline").main([
        "--model", "tiny", "--dtype", "float32", "--gpu-batch", "2", "--cpu-batches", "1", "2", "--context", "32",
        "--block-size", "4", "--iters", "1", "--host-prefill-lens", "16", "--swap-requests", "1", "3",
        "--output-json", str(output)])
    assert output.exists()
    assert results["gpu_only"]["step_s"] > 0
    assert [row["cpu_batch"] for row in results["pipeline"]] == [1, 2]
    for row in results["pipeline"]:
        assert min(row["pipeline_s"], row["gpu_side_s"], row["cpu_side_s"], row["overlap_ratio"]) > 0
        assert min(row["idle_cpu_s"], row["overlap_ratio_pipelined"]) > 0
    split = results["pipeline"][1]
    assert min(split["split_pipeline_s"], split["split_idle_cpu_s"], split["overlap_ratio_split"]) > 0
    assert "split_pipeline_s" not in results["pipeline"][0]
    for key in ("handoff_us_per_layer", "handoff_one_token_us_per_layer", "batch1_overhead_us_per_layer"):
        assert key in results
    (prefill,) = results["host_prefill"]
    assert prefill["prefill_len"] == 16 and min(prefill["gpu_pool_s"], prefill["host_pool_s"]) > 0
    assert [row["swap_requests"] for row in results["swap"]] == [1, 3]
    for row in results["swap"]:
        assert row["moved_bytes"] == row["swap_requests"] * 32 * kv_bytes_per_block(get_config("tiny").with_dtype("float32"), 1)
        assert min(row["swap_out_s"], row["swap_in_s"]) > 0


def test_profile_traces_the_one_request_steps_with_their_host_events(load_script):
    results = load_script("benchmark_pipeline").main([
        "--model", "tiny", "--dtype", "float32", "--gpu-batch", "2", "--cpu-batches", "1", "--context", "32",
        "--block-size", "4", "--iters", "1", "--host-prefill-lens", "--profile"])
    (row,) = results["pipeline"]
    for name in ("batch1", "share", "share_one_token", "gpu_only"):
        host_events = row["profile_" + name]["top_host_events"]
        assert host_events and all(event["us_per_step"] > 0 for event in host_events)
        assert not any(event["name"].startswith("$") for event in host_events)  # no Python tracer lines


def test_one_token_twins_run_the_same_program_with_one_token_contexts(load_script):
    benchmark = load_script("benchmark_pipeline")
    chunks = benchmark.make_chunks(BlockPool("cpu", 64, 4), 3, 30, 1, 100, np.random.default_rng(0))
    twins = benchmark.one_token_contexts(chunks)
    buckets = StepBuckets.for_engine(EngineConfig(model="tiny", block_size=4), 64)
    packed = [pack_pipeline_step(PipelineSchedule([], batch1_cpu_chunks=c), 4, buckets)[0] for c in (chunks, twins)]
    assert host_layout(packed[0]) == host_layout(packed[1])
    assert packed[0].batch1_cpu.context_lens[:3].tolist() == [30] * 3
    assert packed[1].batch1_cpu.context_lens[:3].tolist() == [1] * 3
