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
somewhat fast). A prompt longer than --max-model-len, which the engine would reject, is an error on --input-len;
`output_tokens` counts the tokens the requests produce (max_model_len cuts a request short, as in the engine).
The results go to stdout and --output-json.
"""

from __future__ import annotations

import argparse
import collections
from typing import Any

import numpy as np

from bench_common import (
    add_engine_arguments, add_workload_arguments, checked_workload, engine_config_from_args, greedy, option_error,
    request_rate, scenario_name, step_kind, write_json,
)
from neo_jax.benchmark_metrics import poisson_arrivals
from neo_jax.block_manager import BlockPool
from neo_jax.booking import dry_run, scheduled_chunks
from neo_jax.config import EngineConfig
from neo_jax.cost_model import CostModel
from neo_jax.kv_cache import num_cpu_blocks, num_gpu_blocks
from neo_jax.models.config import ModelConfig, get_config
from neo_jax.pipeline_scheduler import PipelineScheduler


def new_scheduler(parser: argparse.ArgumentParser, config: EngineConfig,
                  model_config: ModelConfig) -> PipelineScheduler:
    """The engine's scheduler for `config`, on pools of the engine's sizes; sizes or a cost table the model or
    machine cannot take are argument errors, before any work starts."""
    max_model_len = config.resolved_max_model_len(model_config)
    try:
        gpu_pool = BlockPool("gpu", num_gpu_blocks(model_config, config, max_model_len), config.block_size)
        host_pool = BlockPool("cpu", num_cpu_blocks(model_config, config, max_model_len), config.block_size)
        cost_model = CostModel.load(config.cost_table)
    except ValueError as error:
        option_error(parser, error)
    return PipelineScheduler(config, gpu_pool, host_pool, cost_model)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_arguments(parser)
    add_workload_arguments(parser)
    parser.add_argument("--request-rate", type=request_rate, default=None,
                        help="Poisson arrivals at this many requests per second (default: all at once)")
    args = parser.parse_args(argv)
    if args.policy == "gpu-only" or args.cost_table is None:
        parser.error("simulate_schedule.py replays an offload policy ('cpu-all', 'neo') with a --cost-table")
    config = engine_config_from_args(parser, args)
    workload = checked_workload(parser, args, config)  # also checks --model and --max-model-len
    model_config = get_config(args.model).with_dtype(args.dtype) if args.dtype else get_config(args.model)
    max_model_len = config.resolved_max_model_len(model_config)
    scheduler = new_scheduler(parser, config, model_config)
    requests = [(prompt, greedy(output_len)) for prompt, output_len in zip(workload.prompts, workload.output_lens)]
    kinds: collections.Counter[str] = collections.Counter()
    batch1_rows, host_waiting, predicted_s, output_tokens = [], [], 0.0, 0
    arrivals = None if args.request_rate is None else poisson_arrivals(
        args.num_prompts, args.request_rate, np.random.default_rng(args.seed))
    for schedule in dry_run(scheduler, requests, model_config.eos_token_ids, max_model_len, arrivals,
                            step_seconds=lambda: scheduler.last_plan.predicted_step_s):
        kinds[step_kind(bool(schedule.swap_out or schedule.swap_in), bool(schedule.batch1_cpu_chunks))] += 1
        batch1_rows.append(len(schedule.batch1_cpu_chunks))
        on_cpu = {c.request.request_id for c in schedule.batch0_cpu_chunks + schedule.batch1_cpu_chunks}
        host_waiting.append(sum(r.kv_pool == "cpu" and r.request_id not in on_cpu for r in scheduler.running))
        predicted_s += scheduler.last_plan.predicted_step_s
        output_tokens += sum(chunk.samples for chunk in scheduled_chunks(schedule))
    result = {"scenario": scenario_name(args), "policy": args.policy, "args": vars(args),
              "num_gpu_blocks": scheduler.pool.num_blocks, "num_cpu_blocks": scheduler.host_pool.num_blocks,
              "request_rate": args.request_rate, "output_tokens": output_tokens,
              "steps": sum(kinds.values()), "steps_by_kind": dict(kinds),
              "mean_batch1_rows": float(np.mean(batch1_rows)),
              "mean_host_requests_not_decoding": float(np.mean(host_waiting)),
              "predicted_seconds": predicted_s,
              "predicted_output_tokens_per_s": output_tokens / predicted_s,
              "counters": vars(scheduler.stats)}
    write_json(args.output_json, result)
    return result


if __name__ == "__main__":
    main()
