"""Offline throughput, vLLM's benchmark_throughput conventions: every request is queued at once.

    python scripts/benchmark_throughput.py --model llama-3-8b --dtype bfloat16 --num-prompts 1000 \
        --input-len 1000 --output-len 300 --policy neo --gpu-kv-cache-gb 1.5 --output-json out.json

The timed pass must measure serving, not XLA compilation (the JSON's `step_compilations` counts the step
programs compiled during it, `xla_compilations` every XLA compile). `--warmup replay` (the default) first runs
the same workload untimed: greedy requests that ignore EOS step through the very same shapes again
(`--warmup-output-len N` cuts its outputs short).
`--warmup compile` instead schedules the workload without running the model and compiles its step programs,
`--compile-workers` at a time (`LLMEngine.compile_ahead`), then runs each once on the idle engine (loading it onto
the device: until ac89f7a each program's first step fell into the timed pass, 150-160 ms on the H200).
"""

from __future__ import annotations

import argparse
import time

from tqdm import tqdm

from bench_common import (
    StepMeter, add_engine_arguments, add_run_arguments, add_workload_arguments, checked_workload, compile_ahead,
    engine_config_from_args, engine_from_config, format_step, greedy, host_read_gb_per_s, machine_info,
    pool_sizes, positive_int, scenario_name, write_json,
)
from neo_jax.benchmark_metrics import format_bound
from neo_jax.engine import LLMEngine


def run_requests(engine: LLMEngine, prompts: list[list[int]], output_lens: list[int],
                 desc: str) -> tuple[float, StepMeter, int]:
    """Queues every request, steps the engine until all finish; the elapsed seconds, the steps' meter and the
    output tokens the requests produced (fewer than asked for where max_model_len cut a request short)."""
    meter = StepMeter(engine)
    start = time.perf_counter()
    requests = [engine.add_request(prompt, greedy(output_len)) for prompt, output_len in zip(prompts, output_lens)]
    with tqdm(total=len(prompts), desc=desc, unit="req") as bar:
        while engine.has_unfinished_requests():
            bar.update(len(meter.step()))
    elapsed = time.perf_counter() - start
    return elapsed, meter, sum(len(request.output_token_ids) for request in requests)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_arguments(parser)
    add_run_arguments(parser)
    add_workload_arguments(parser)
    parser.add_argument("--warmup", choices=("replay", "compile"), default="replay",
                        help="run the workload untimed first, or only compile its step programs")
    parser.add_argument("--warmup-output-len", type=positive_int, default=None,
                        help="with --warmup replay: output tokens per warm-up request (default: the workload's own)")
    parser.add_argument("--compile-workers", type=positive_int, default=4,
                        help="with --warmup compile: XLA compiles at once")
    args = parser.parse_args(argv)

    config = engine_config_from_args(parser, args, async_scheduling=not args.no_async_scheduling)
    workload = checked_workload(parser, args, config)
    engine = engine_from_config(parser, config)
    prompts, input_lens, output_lens = workload.prompts, workload.input_lens, workload.output_lens
    if args.warmup == "compile":
        compile_ahead(engine, prompts, output_lens, args.compile_workers)
    else:
        warmup_lens = output_lens if args.warmup_output_len is None else [min(n, args.warmup_output_len)
                                                                           for n in output_lens]
        run_requests(engine, prompts, warmup_lens, "warm-up")
    elapsed, meter, total_out = run_requests(engine, prompts, output_lens, args.policy)
    bound = meter.bound(host_read_gb_per_s(args.bandwidth_probe_mb))

    total_in = sum(input_lens)
    results = {
        "benchmark": "throughput", "scenario": scenario_name(args), "policy": args.policy, "machine": machine_info(),
        "args": vars(args), **pool_sizes(engine), "elapsed_s": elapsed, "input_tokens": total_in,
        "output_tokens": total_out,
        "requests_per_s": args.num_prompts / elapsed, "total_tokens_per_s": (total_in + total_out) / elapsed,
        "output_tokens_per_s": total_out / elapsed, "bandwidth_bound": bound,
    }
    write_json(args.output_json, results)
    print(f"{args.policy}: {results['requests_per_s']:.2f} req/s, {results['total_tokens_per_s']:.1f} tokens/s, "
          f"{results['output_tokens_per_s']:.1f} output tokens/s; {format_bound(bound['bound'])}; {format_step(bound)}")


if __name__ == "__main__":
    main()
