"""Python cost of one scheduling decision: `plan_step` for N running requests, per policy and load mix.

Times many steps over freshly drawn scenarios (contexts, pool fill, waiting prompts) with the
first-principles cost model of a Llama-3-8B shape, and prints JSON: mean / p50 / p99 microseconds
per plan, and the cost of building the views the engine hands over each step.

    python scripts/bench_scheduler.py [--num-running 512] [--steps 2000]
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time

from bench_common import machine_info, nonnegative_int, output_file, positive_int, write_json
from neo_jax.cost_model import MachineId, fallback_cost_model
from neo_jax.models.config import PRESETS
from neo_jax.neo_policy import plan_step
from neo_jax.step_plan import DecodeView, PoolState, PrefillView, StepBudget

BLOCK_SIZE = 16
# name: (policy, share of running requests whose KV is on the host)
MIXES = {"gpu-only": ("gpu-only", 0.0), "neo-gpu-resident": ("neo", 0.0), "neo-half-host": ("neo", 0.5),
         "neo-all-host": ("neo", 1.0), "cpu-all": ("cpu-all", 0.5)}


def draw_scenario(rng: random.Random, num_running: int, host_share: float, num_waiting: int):
    decodes = [DecodeView(i, rng.randint(64, 4096), "cpu" if rng.random() < host_share else "gpu", i)
               for i in range(num_running)]
    waiting = [PrefillView(num_running + i, n, n, num_running + i)
               for i, n in enumerate(rng.randint(32, 1024) for _ in range(num_waiting))]
    held = {pool: sum(-(-(d.context_len - 1) // BLOCK_SIZE) for d in decodes if d.pool == pool)
            for pool in ("gpu", "cpu")}
    gpu_free = rng.randint(0, 64)  # a nearly full GPU pool: swaps and host prefills happen
    pools = PoolState(BLOCK_SIZE, held["gpu"] + gpu_free, gpu_free, held["cpu"] + 100_000, 100_000)
    return waiting, decodes, pools


def time_plans(policy: str, scenarios: list, budget: StepBudget, cost, steps: int) -> list[float]:
    seconds = []
    for step in range(steps):
        waiting, decodes, pools = scenarios[step % len(scenarios)]
        start = time.perf_counter()
        plan_step(policy, waiting, decodes, pools, budget, cost)
        seconds.append(time.perf_counter() - start)
    return seconds


def summary(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {"mean_us": round(statistics.fmean(ordered) * 1e6, 1),
            "p50_us": round(ordered[len(ordered) // 2] * 1e6, 1),
            "p99_us": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6, 1)}


def time_view_building(num_running: int, steps: int) -> list[float]:
    seconds = []
    for step in range(steps):
        start = time.perf_counter()
        [DecodeView(i, 1000 + step, "gpu", i) for i in range(num_running)]
        seconds.append(time.perf_counter() - start)
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-running", type=positive_int, default=512)
    parser.add_argument("--num-waiting", type=nonnegative_int, default=16)
    parser.add_argument("--steps", type=positive_int, default=2000)
    parser.add_argument("--scenarios", type=positive_int, default=50, help="distinct scenarios cycled through")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-json", type=output_file, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    cost = fallback_cost_model(PRESETS["llama-3-8b"], model="llama-3-8b", machine=MachineId.current("synthetic"),
                               block_size=BLOCK_SIZE)
    budget = StepBudget(max_num_tokens=8192, max_num_seqs=1024)
    rng = random.Random(args.seed)
    results = {}
    for name, (policy, host_share) in MIXES.items():
        scenarios = [draw_scenario(rng, args.num_running, host_share, args.num_waiting) for _ in range(args.scenarios)]
        time_plans(policy, scenarios, budget, cost, min(args.steps, 100))  # warm up
        results[name] = summary(time_plans(policy, scenarios, budget, cost, args.steps))
    write_json(args.output_json, {
        "num_running": args.num_running, "num_waiting": args.num_waiting, "steps": args.steps,
        "python": platform.python_version(), "machine": machine_info(),
        "plan_step": results,
        "build_decode_views": summary(time_view_building(args.num_running, min(args.steps, 500))),
    })


if __name__ == "__main__":
    main()
