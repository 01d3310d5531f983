"""Replay a throughput workload through the scheduler alone: no model, no device, a given cost table.

    python scripts/simulate_schedule.py --model llama-3-8b --dtype bfloat16 --policy neo --cost-table T.json \
        --gpu-kv-cache-gb 1.5 --cpu-kv-cache-gb 16 --num-prompts 64 --input-len 1000 --output-len 300 \
        --range-ratio 0.1 --max-model-len 2048

Shows what a policy does with a machine's cost table before any GPU time is spent: how many steps pipeline,
swap or run on the GPU alone, how many requests wait in the host pool, and the plan's predicted rates. Every
sampled token is 0 (`ignore_eos` workloads schedule the same steps whatever the tokens are), and the scheduler
sees the same pools as the engine would (`--gpu-kv-cache-gb` etc. sized for the model's KV blocks).
`--request-rate R` replays benchmark_serving.py's Poisson arrivals (same seed) instead of sending every request
at once, on a clock that each step advances by its plan's predicted time: whether a serving load makes the pools
run short, before a GPU runs it (the cost model leaves out swaps and the step's fixed costs, so the clock runs
somewhat fast).
"""

from __future__ import annotations

import argparse
import collections
import json

import numpy as np

from bench_common import Workload, add_engine_arguments, add_workload_arguments, greedy, step_kind
from neo_jax.benchmark_metrics import poisson_arrivals
from neo_jax.block_manager import BlockPool
from neo_jax.config import EngineConfig
from neo_jax.cost_model import CostModel
from neo_jax.booking import dry_run
from neo_jax.kv_cache import num_cpu_blocks, num_gpu_blocks
from neo_jax.models.config import get_config
from neo_jax.pipeline_scheduler import PipelineScheduler


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_arguments(parser)
    add_workload_arguments(parser)
    parser.add_argument("--request-rate", type=float, default=None,
                        help="Poisson arrivals at this many requests per second (default: all at once)")
    args = parser.parse_args(argv)
    if args.policy == "gpu-only" or args.cost_table is None:
        parser.error("simulate_schedule.py replays an offload policy ('cpu-all', 'neo') with a --cost-table")
    model_config = get_config(args.model)
    if args.dtype:
        model_config = model_config.with_dtype(args.dtype)
    config = EngineConfig(model=args.model, dtype=args.dtype, policy=args.policy, max_model_len=args.max_model_len,
                          gpu_kv_cache_gb=args.gpu_kv_cache_gb, cpu_kv_cache_gb=args.cpu_kv_cache_gb,
                          max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          block_size=args.block_size, cost_table=args.cost_table)
    max_model_len = config.resolved_max_model_len(model_config)
    gpu_pool = BlockPool("gpu", num_gpu_blocks(model_config, config, max_model_len), args.block_size)
    host_pool = BlockPool("cpu", num_cpu_blocks(model_config, config, max_model_len), args.block_size)
    scheduler = PipelineScheduler(config, gpu_pool, host_pool, CostModel.load(args.cost_table))
    workload = Workload.from_args(args, model_config.vocab_size)
    requests = [(prompt, greedy(output_len)) for prompt, output_len in zip(workload.prompts, workload.output_lens)]
    kinds: collections.Counter[str] = collections.Counter()
    batch1_rows, host_waiting, predicted_s = [], [], 0.0
    arrivals = None if args.request_rate is None else poisson_arrivals(
        args.num_prompts, args.request_rate, np.random.default_rng(args.seed))
    for schedule in dry_run(scheduler, requests, model_config.eos_token_ids, max_model_len, arrivals,
                            step_seconds=lambda: scheduler.last_plan.predicted_step_s):
        kinds[step_kind(bool(schedule.swap_out or schedule.swap_in), bool(schedule.batch1_cpu_chunks))] += 1
        batch1_rows.append(len(schedule.batch1_cpu_chunks))
        on_cpu = {c.request.request_id for c in schedule.batch0_cpu_chunks + schedule.batch1_cpu_chunks}
        host_waiting.append(sum(r.kv_pool == "cpu" and r.request_id not in on_cpu for r in scheduler.running))
        predicted_s += scheduler.last_plan.predicted_step_s
    result = {"request_rate": args.request_rate, "output_tokens": sum(workload.output_lens),
              "steps": sum(kinds.values()), "steps_by_kind": dict(kinds),
              "mean_batch1_rows": float(np.mean(batch1_rows)),
              "mean_host_requests_not_decoding": float(np.mean(host_waiting)),
              "predicted_seconds": predicted_s,
              "predicted_output_tokens_per_s": sum(workload.output_lens) / predicted_s,
              "counters": vars(scheduler.stats)}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
