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
    StepMeter, Workload, add_engine_arguments, add_workload_arguments, compile_ahead, engine_from_args,
    format_step, greedy, host_read_gb_per_s, machine_info, pool_sizes, scenario_name, write_json,
)
from neo_jax.benchmark_metrics import format_bound
from neo_jax.engine import LLMEngine


def run_requests(engine: LLMEngine, prompts: list[list[int]], output_lens: list[int],
                 desc: str) -> tuple[float, StepMeter]:
    """Queues every request, steps the engine until all finish; the elapsed seconds and the steps' meter."""
    meter = StepMeter(engine)
    start = time.perf_counter()
    for prompt, output_len in zip(prompts, output_lens):
        engine.add_request(prompt, greedy(output_len))
    with tqdm(total=len(prompts), desc=desc, unit="req") as bar:
        while engine.has_unfinished_requests():
            bar.update(len(meter.step()))
    return time.perf_counter() - start, meter


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_arguments(parser)
    add_workload_arguments(parser)
    parser.add_argument("--warmup", choices=("replay", "compile"), default="replay",
                        help="run the workload untimed first, or only compile its step programs")
    parser.add_argument("--warmup-output-len", type=int, default=None,
                        help="with --warmup replay: output tokens per warm-up request (default: the workload's own)")
    parser.add_argument("--compile-workers", type=int, default=4, help="with --warmup compile: XLA compiles at once")
    args = parser.parse_args(argv)

    engine = engine_from_args(args)
    workload = Workload.from_args(args, engine.model_config.vocab_size)
    prompts, input_lens, output_lens = workload.prompts, workload.input_lens, workload.output_lens
    if args.warmup == "compile":
        compile_ahead(engine, prompts, output_lens, args.compile_workers)
    else:
        warmup_lens = output_lens if args.warmup_output_len is None else [min(n, args.warmup_output_len)
                                                                           for n in output_lens]
        run_requests(engine, prompts, warmup_lens, "warm-up")
    elapsed, meter = run_requests(engine, prompts, output_lens, args.policy)
    bound = meter.bound(host_read_gb_per_s(args.bandwidth_probe_mb))

    total_in, total_out = sum(input_lens), sum(output_lens)
    results = {
        "benchmark": "throughput", "scenario": scenario_name(args), "policy": args.policy, "machine": machine_info(),
        "args": vars(args), **pool_sizes(engine), "elapsed_s": elapsed,
        "requests_per_s": args.num_prompts / elapsed, "total_tokens_per_s": (total_in + total_out) / elapsed,
        "output_tokens_per_s": total_out / elapsed, "bandwidth_bound": bound,
    }
    write_json(args.output_json, results)
    print(f"{args.policy}: {results['requests_per_s']:.2f} req/s, {results['total_tokens_per_s']:.1f} tokens/s, "
          f"{results['output_tokens_per_s']:.1f} output tokens/s; {format_bound(bound['bound'])}; {format_step(bound)}")


if __name__ == "__main__":
    main()
