"""Workloads and metrics of the throughput and serving benchmarks, with vLLM's definitions.

TTFT: arrival to first output token. TPOT: (end - first token) / (output tokens - 1), per request.
ITL: the gaps between consecutive output tokens, pooled over requests. E2EL: arrival to last token.
"""

from __future__ import annotations

import dataclasses

import numpy as np

PERCENTILES = (50, 90, 99)


def random_lengths(num_requests: int, mean_len: int, range_ratio: float, rng: np.random.Generator) -> list[int]:
    """Lengths uniform in [mean * (1 - ratio), mean * (1 + ratio)], at least 1 (vLLM's random dataset)."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    low = max(1, int(mean_len * (1 - range_ratio)))
    high = max(low, int(mean_len * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=num_requests).tolist()


def random_prompts(input_lens: list[int], vocab_size: int, rng: np.random.Generator) -> list[list[int]]:
    """Random token-id prompts that avoid the low ids where special tokens usually sit."""
    low = min(10, vocab_size - 1)
    return [rng.integers(low, vocab_size, size=n).tolist() for n in input_lens]


def poisson_arrivals(num_requests: int, request_rate: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival offsets in seconds of a Poisson process; an infinite rate sends everything at 0."""
    if request_rate <= 0:
        raise ValueError(f"request_rate must be > 0, got {request_rate}")
    if np.isinf(request_rate):
        return np.zeros(num_requests)
    return np.cumsum(rng.exponential(1.0 / request_rate, size=num_requests))


@dataclasses.dataclass
class RequestTrace:
    """When one request arrived and when each of its output tokens came out (seconds, one clock)."""

    arrival: float
    prompt_len: int
    token_times: list[float] = dataclasses.field(default_factory=list)

    @property
    def output_len(self) -> int:
        return len(self.token_times)


def _stats(name: str, values_s: list[float]) -> dict[str, float]:
    values_ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    if values_ms.size == 0:
        return {}
    stats = {f"mean_{name}_ms": float(values_ms.mean()), f"median_{name}_ms": float(np.median(values_ms))}
    stats.update({f"p{p}_{name}_ms": float(np.percentile(values_ms, p)) for p in PERCENTILES if p != 50})
    return stats


def summarize(traces: list[RequestTrace], duration_s: float) -> dict[str, float]:
    """Throughput and latency statistics of finished requests over a run of `duration_s` seconds."""
    done = [t for t in traces if t.output_len > 0]
    total_output = sum(t.output_len for t in done)
    total_input = sum(t.prompt_len for t in done)
    summary = {
        "completed": len(done),
        "duration_s": duration_s,
        "request_throughput": len(done) / duration_s,
        "output_throughput": total_output / duration_s,
        "total_token_throughput": (total_input + total_output) / duration_s,
    }
    summary.update(_stats("ttft", [t.token_times[0] - t.arrival for t in done]))
    summary.update(_stats("tpot", [(t.token_times[-1] - t.token_times[0]) / (t.output_len - 1)
                                   for t in done if t.output_len > 1]))
    summary.update(_stats("itl", [b - a for t in done for a, b in zip(t.token_times, t.token_times[1:])]))
    summary.update(_stats("e2el", [t.token_times[-1] - t.arrival for t in done]))
    return summary


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """Bytes of K and V that one context token holds over all layers."""
    return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes


def bandwidth_bound(host_read_bytes_per_s: float, step_seconds: float, num_steps: int, gpu_kv_tokens_read: int,
                    cpu_kv_tokens_read: int, kv_bytes_per_token: int) -> dict[str, float | None]:
    """How far CPU attention can lift throughput over the GPU-only plan, from one run's measurements.

    In a step of mean length t the host can read host_read_bytes_per_s * t bytes of KV; the GPU read
    G bytes of GPU-resident KV. Decodes are KV-bound, so the CPU's share adds at most that many bytes
    again: throughput <= (1 + host_read_bytes_per_s * t / G) x GPU-only. `bound` is None when no GPU
    KV was read (nothing to compare with). `cpu_read_fraction` says how much of the host bandwidth the
    run's CPU attention used.
    """
    if num_steps <= 0 or step_seconds <= 0:
        raise ValueError(f"num_steps and step_seconds must be positive, got {num_steps} and {step_seconds}")
    mean_step_s = step_seconds / num_steps
    gpu_bytes_per_step = gpu_kv_tokens_read * kv_bytes_per_token / num_steps
    cpu_bytes_per_step = cpu_kv_tokens_read * kv_bytes_per_token / num_steps
    host_bytes_per_step = host_read_bytes_per_s * mean_step_s
    return {
        "host_read_gb_per_s": host_read_bytes_per_s / 1e9,
        "mean_step_ms": mean_step_s * 1000.0,
        "gpu_kv_mb_per_step": gpu_bytes_per_step / 1e6,
        "cpu_kv_mb_per_step": cpu_bytes_per_step / 1e6,
        "cpu_read_fraction": cpu_bytes_per_step / host_bytes_per_step,
        "bound": 1.0 + host_bytes_per_step / gpu_bytes_per_step if gpu_bytes_per_step > 0 else None,
    }


def format_bound(bound: float | None) -> str:
    return "bound: none (no GPU-resident KV read)" if bound is None else f"bound: up to {bound:.2f}x gpu-only"
