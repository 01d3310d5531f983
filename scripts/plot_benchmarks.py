"""Plots the JSON files of benchmark_throughput.py and benchmark_serving.py.

    python scripts/plot_benchmarks.py benchmarks/results/*.json --output-dir benchmarks/results

throughput.png: output tokens/s per policy, grouped by scenario; each bar says its ratio to gpu-only in the
same scenario and its run's bandwidth bound, drawn as a tick at gpu-only's throughput x that bound.
latency.png: one row per scenario, p99 TTFT and p99 TPOT vs request rate, a line per policy (an infinite
rate, everything sent at once, has no place on the axis and is left out). A black X marks a point whose timed
run compiled step programs: its latencies time XLA, not the engine.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

from bench_common import existing_path  # noqa: E402

POLICY_ORDER = ("gpu-only", "cpu-all", "neo")
BASELINE = "gpu-only"


def load_results(paths: list[pathlib.Path]) -> list[dict]:
    """The benchmark JSON files among `paths` (directories are searched for *.json); others are skipped."""
    files = [f for p in paths for f in (sorted(p.glob("*.json")) if p.is_dir() else [p])]
    results = []
    for path in files:
        with open(path) as file:
            data = json.load(file)
        if isinstance(data, dict) and data.get("benchmark") in ("throughput", "serving"):
            if "scenario" not in data or "policy" not in data:
                raise ValueError(f"{path}: a {data['benchmark']} result without 'scenario' and 'policy'")
            results.append(data)
    return results


def policy_sort_key(policy: str) -> tuple[int, str]:
    return (POLICY_ORDER.index(policy) if policy in POLICY_ORDER else len(POLICY_ORDER), policy)


def policy_color(policy: str) -> str:
    """One color per policy in every figure."""
    return f"C{policy_sort_key(policy)[0]}"


def plotted_bound(run: dict) -> float | None:
    """The run's bandwidth bound; none for cpu-all, whose bound divides by the GPU-resident KV it hardly reads."""
    if run["policy"] == "cpu-all":
        return None
    return run.get("bandwidth_bound", {}).get("bound")


def plot_throughput(results: list[dict], path: pathlib.Path) -> pathlib.Path:
    runs = {(r["scenario"], r["policy"]): r for r in results if r["benchmark"] == "throughput"}
    if not runs:
        raise ValueError("no throughput results to plot")
    scenarios = list(dict.fromkeys(scenario for scenario, _ in runs))
    policies = sorted({policy for _, policy in runs}, key=policy_sort_key)
    width = 0.8 / len(policies)
    fig, ax = plt.subplots(figsize=(max(6.0, 2.5 * len(scenarios)), 4.5))
    tallest, labeled = 0.0, set()
    for p, policy in enumerate(policies):
        for s, scenario in enumerate(scenarios):
            run = runs.get((scenario, policy))
            if run is None:
                continue
            x = s + (p - (len(policies) - 1) / 2) * width
            value = run["output_tokens_per_s"]
            tallest = max(tallest, value)
            ax.bar(x, value, width, color=policy_color(policy), label=None if policy in labeled else policy)
            labeled.add(policy)
            baseline, bound = runs.get((scenario, BASELINE)), plotted_bound(run)
            notes, top = [], value
            if baseline is not None:
                notes.append(f"{value / baseline['output_tokens_per_s']:.2f}x")
                if bound is not None:
                    tick = baseline["output_tokens_per_s"] * bound
                    ax.hlines(tick, x - width / 2, x + width / 2, colors="black")
                    top = max(top, tick)
            if bound is not None:
                notes.append(f"bound {bound:.2f}x")
            ax.annotate("\n".join(notes), (x, top), ha="center", va="bottom", fontsize=7)  # above bar and tick
    ax.set_ylim(0, tallest * 1.35)
    ax.set_xticks(range(len(scenarios)), scenarios, fontsize=8)
    ax.set_ylabel("output tokens/s")
    ax.set_title("Offline throughput; black tick: gpu-only x the run's bandwidth bound", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def latency_curves(results: list[dict]) -> dict[str, dict[str, list[tuple[float, dict]]]]:
    """scenario -> policy -> (request rate, run) of the serving results at finite rates."""
    curves: dict = collections.defaultdict(lambda: collections.defaultdict(list))
    for result in results:
        rates = [(float(run["request_rate"]), run) for run in result.get("runs", [])]  # "inf", or Infinity before
        runs = [(rate, run) for rate, run in rates if math.isfinite(rate)]
        if result["benchmark"] == "serving" and runs:
            curves[result["scenario"]][result["policy"]].extend(runs)
    return curves


def timed_run_compiled(run: dict) -> bool:
    return run.get("bandwidth_bound", {}).get("step_compilations", 0) > 0


def plot_latency(curves: dict[str, dict[str, list[tuple[float, dict]]]], path: pathlib.Path) -> pathlib.Path:
    metrics = (("p99_ttft_ms", "p99 TTFT (ms)"), ("p99_tpot_ms", "p99 TPOT (ms)"))
    fig, axes = plt.subplots(len(curves), len(metrics), figsize=(10, 3.5 * len(curves)), squeeze=False)
    for row, (scenario, lines) in zip(axes, curves.items()):
        for ax, (key, label) in zip(row, metrics):
            compiled = []
            for policy in sorted(lines, key=policy_sort_key):
                points = sorted((rate, run[key]) for rate, run in lines[policy] if key in run)
                ax.plot([r for r, _ in points], [v for _, v in points], "o-", color=policy_color(policy), label=policy)
                compiled += [(rate, run[key]) for rate, run in lines[policy] if key in run and timed_run_compiled(run)]
            if compiled:
                ax.plot(*zip(*compiled), "X", color="black", markersize=9, linestyle="none",
                        label="compiled in the timed run")
            ax.set_xlabel("request rate (req/s)")
            ax.set_ylabel(label)
            ax.set_title(scenario, fontsize=9)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> list[pathlib.Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=existing_path, help="JSON files or directories of them")
    parser.add_argument("--output-dir", type=pathlib.Path, default=None, help="default: beside the first input")
    args = parser.parse_args(argv)
    results = load_results(args.inputs)
    first = args.inputs[0]
    output_dir = args.output_dir or (first if first.is_dir() else first.parent)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if any(r["benchmark"] == "throughput" for r in results):
        written.append(plot_throughput(results, output_dir / "throughput.png"))
    curves = latency_curves(results)
    if curves:
        written.append(plot_latency(curves, output_dir / "latency.png"))
    if not written:
        parser.error(f"no benchmark results in {', '.join(map(str, args.inputs))}")
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
