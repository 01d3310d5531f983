"""The benchmark metrics follow vLLM's definitions on hand-made traces."""

import numpy as np
import pytest

from neo_jax.benchmark_metrics import (
    RequestTrace, bandwidth_bound, format_bound, kv_bytes_per_token, poisson_arrivals, random_lengths, summarize,
)


def test_summary_of_hand_made_traces() -> None:
    traces = [RequestTrace(arrival=0.0, prompt_len=10, token_times=[0.5, 0.6, 0.8]),
              RequestTrace(arrival=1.0, prompt_len=20, token_times=[1.2, 1.5])]
    summary = summarize(traces, duration_s=2.0)
    assert summary["completed"] == 2
    assert summary["request_throughput"] == pytest.approx(1.0)
    assert summary["output_throughput"] == pytest.approx(2.5)
    assert summary["total_token_throughput"] == pytest.approx(17.5)
    assert summary["mean_ttft_ms"] == pytest.approx((500 + 200) / 2)
    assert summary["mean_tpot_ms"] == pytest.approx((150 + 300) / 2)
    assert summary["median_itl_ms"] == pytest.approx(200)
    assert summary["p99_itl_ms"] == pytest.approx(np.percentile([100, 200, 300], 99))
    assert summary["mean_e2el_ms"] == pytest.approx((800 + 500) / 2)


def test_unfinished_requests_are_left_out() -> None:
    traces = [RequestTrace(0.0, 5, [0.1]), RequestTrace(0.0, 5, [])]
    summary = summarize(traces, duration_s=1.0)
    assert summary["completed"] == 1 and "mean_tpot_ms" not in summary


def test_poisson_arrivals_have_the_asked_rate() -> None:
    arrivals = poisson_arrivals(20000, 50.0, np.random.default_rng(0))
    assert np.all(np.diff(arrivals) >= 0)
    assert 20000 / arrivals[-1] == pytest.approx(50.0, rel=0.03)
    assert not poisson_arrivals(5, float("inf"), np.random.default_rng(0)).any()
    with pytest.raises(ValueError, match="request_rate"):
        poisson_arrivals(5, 0.0, np.random.default_rng(0))


def test_random_lengths_stay_in_range() -> None:
    lengths = random_lengths(1000, 100, 0.5, np.random.default_rng(0))
    assert min(lengths) >= 50 and max(lengths) <= 150 and len(set(lengths)) > 50
    assert random_lengths(3, 7, 0.0, np.random.default_rng(0)) == [7, 7, 7]
    with pytest.raises(ValueError, match="range_ratio"):
        random_lengths(3, 7, 1.0, np.random.default_rng(0))


def test_bandwidth_bound_of_hand_made_counters() -> None:
    per_token = kv_bytes_per_token(num_layers=2, num_kv_heads=4, head_dim=8, dtype_bytes=2)
    assert per_token == 256
    # 10 steps of 20 ms; the GPU read 1e6 tokens = 25.6 MB per step; the host reads 10 GB/s = 200 MB per step.
    bound = bandwidth_bound(10e9, 0.2, 10, 1_000_000, 500_000, per_token)
    assert bound["mean_step_ms"] == pytest.approx(20.0)
    assert bound["gpu_kv_mb_per_step"] == pytest.approx(25.6)
    assert bound["cpu_read_fraction"] == pytest.approx(12.8 / 200)
    assert bound["bound"] == pytest.approx(1 + 200 / 25.6)
    assert format_bound(bound["bound"]) == "bound: up to 8.81x gpu-only"
    assert bandwidth_bound(10e9, 0.2, 10, 0, 5, per_token)["bound"] is None
    with pytest.raises(ValueError, match="num_steps"):
        bandwidth_bound(10e9, 0.2, 0, 1, 1, per_token)
