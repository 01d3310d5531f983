"""The benchmark metrics follow vLLM's definitions on hand-made traces."""

import numpy as np
import pytest

from neo_jax.benchmark_metrics import RequestTrace, poisson_arrivals, random_lengths, summarize


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
