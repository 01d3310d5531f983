"""benchmark_pipeline.py end to end on the tiny model: every figure it reports is there and positive."""

from __future__ import annotations


def test_reports_the_handoff_the_overlap_and_host_prefills(load_script, tmp_path):
    output = tmp_path / "pipeline.json"
    results = load_script("benchmark_pipeline").main([
        "--model", "tiny", "--dtype", "float32", "--gpu-batch", "2", "--cpu-batches", "1", "2", "--context", "32",
        "--block-size", "4", "--iters", "1", "--host-prefill-lens", "16", "--output-json", str(output)])
    assert output.exists()
    assert results["gpu_only"]["step_s"] > 0
    assert [row["cpu_batch"] for row in results["pipeline"]] == [1, 2]
    for row in results["pipeline"]:
        assert min(row["pipeline_s"], row["gpu_side_s"], row["cpu_side_s"], row["overlap_ratio"]) > 0
    assert "handoff_us_per_layer" in results and "batch1_overhead_us_per_layer" in results
    (prefill,) = results["host_prefill"]
    assert prefill["prefill_len"] == 16 and min(prefill["gpu_pool_s"], prefill["host_pool_s"]) > 0
