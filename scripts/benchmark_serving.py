"""Online serving, in process, vLLM's benchmark_serving metrics: Poisson arrivals at --request-rate.

    python scripts/benchmark_serving.py --model llama-3-8b --dtype bfloat16 --num-prompts 500 \
        --input-len 1000 --output-len 300 --request-rate 4 8 16 inf --policy neo --output-json out.json

Requests join the engine when their arrival time has passed; every step's new tokens are time-stamped
as soon as the step returns, which is when a server would stream them. Several rates make a sweep. Each
rate is first replayed untimed until a replay compiles no new step program (at most --warmup-replays times):
arrivals mix prefills and decodes into step shapes that an offline warm-up never meets, and XLA compiles each
shape once (~10 s for llama-3-8b on an H200). A replay's arrival clock stops while a step compiles, so it mixes
its arrivals as a run without compiles does and meets that run's shapes: replays whose clock ran on piled up
requests behind each compile, met new shapes for it, and still left 2-3 compilations in the timed runs of the
lower rates after three replays on the H200 at 7fea9ce. The JSON's `warmup_replays` and `step_compilations`
say how it went. `--warmup compile` first compiles, `--compile-workers` at a time, the programs of dry runs of
the rate's arrivals (`LLMEngine.compile_ahead`), one per guess of a step's duration in `--warmup-step-ms`
(which requests share a step depends on it), so that the replays, one at a time, meet few new shapes: on a fresh
H200 the replays alone compiled for over 200 s in (b) at 16 req/s (9d4d8ba).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from tqdm import tqdm

from bench_common import (
    StepMeter, add_engine_arguments, add_run_arguments, add_workload_arguments, checked_workload, compile_ahead,
    engine_config_from_args, engine_from_config, format_step, greedy, host_read_gb_per_s, machine_info, pool_sizes,
    positive_float, positive_int, request_rate, scenario_name, write_json,
)
from neo_jax.benchmark_metrics import RequestTrace, format_bound, poisson_arrivals, summarize
from neo_jax.engine import LLMEngine
from neo_jax.model_runner import num_step_compilations


def serve(engine: LLMEngine, prompts: list[list[int]], output_lens: list[int], arrivals: np.ndarray,
          pause_for_compiles: bool = False) -> tuple[list[RequestTrace], float, StepMeter]:
    """Replays the arrivals against the engine; each request's token times, the run's duration, the steps' meter.
    `pause_for_compiles`: a step that compiles a program takes no time on the arrival clock."""
    meter = StepMeter(engine)
    traces = [RequestTrace(arrival=float(a), prompt_len=len(p)) for a, p in zip(arrivals, prompts)]
    live: dict[int, tuple[RequestTrace, object]] = {}
    next_arrival = 0
    start = time.perf_counter()
    with tqdm(total=len(prompts), unit="req") as bar:
        while next_arrival < len(prompts) or engine.has_unfinished_requests():
            now = time.perf_counter() - start
            while next_arrival < len(prompts) and arrivals[next_arrival] <= now:
                request = engine.add_request(prompts[next_arrival], greedy(output_lens[next_arrival]))
                live[request.request_id] = (traces[next_arrival], request)
                next_arrival += 1
            if not engine.has_unfinished_requests():
                time.sleep(max(0.0, arrivals[next_arrival] - now))
                continue
            compiled_before, step_start = num_step_compilations(), time.perf_counter()
            finished = meter.step()
            if pause_for_compiles and num_step_compilations() != compiled_before:
                start += time.perf_counter() - step_start
            stamp = time.perf_counter() - start
            for trace, request in live.values():
                trace.token_times.extend([stamp] * (request.num_ready_output_tokens - trace.output_len))
            for request in finished:
                live.pop(request.request_id)
            bar.update(len(finished))
    return traces, time.perf_counter() - start, meter


def warm_up(engine: LLMEngine, prompts: list[list[int]], output_lens: list[int], arrivals: np.ndarray,
            max_replays: int) -> int:
    """Replays the arrivals untimed until a replay compiles no step program, at most `max_replays` times;
    returns the number of replays."""
    for replay in range(1, max_replays + 1):
        compiled_before = num_step_compilations()
        serve(engine, prompts, output_lens, arrivals, pause_for_compiles=True)
        if num_step_compilations() == compiled_before:
            break
    return replay


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_arguments(parser)
    add_run_arguments(parser)
    add_workload_arguments(parser)
    parser.add_argument("--request-rate", type=request_rate, nargs="+", default=[float("inf")],
                        help="requests per second; several values make a sweep; inf sends all at once")
    parser.add_argument("--warmup-replays", type=positive_int, default=3,
                        help="most untimed replays of each rate before its timed run")
    parser.add_argument("--warmup", choices=("replay", "compile"), default="replay",
                        help="replay each rate untimed, or first compile its dry runs' programs, then replay")
    parser.add_argument("--warmup-step-ms", type=positive_float, nargs="+", default=[5.0, 10.0, 20.0, 40.0],
                        help="with --warmup compile: step durations to dry-run the arrivals at")
    parser.add_argument("--compile-workers", type=positive_int, default=4,
                        help="with --warmup compile: XLA compiles at once")
    args = parser.parse_args(argv)

    config = engine_config_from_args(parser, args, async_scheduling=not args.no_async_scheduling)
    workload = checked_workload(parser, args, config)
    engine = engine_from_config(parser, config)
    prompts, output_lens = workload.prompts, workload.output_lens
    host_gb_per_s = host_read_gb_per_s(args.bandwidth_probe_mb)
    runs = []
    results = {"benchmark": "serving", "scenario": scenario_name(args), "policy": args.policy,
               "machine": machine_info(), "args": vars(args), **pool_sizes(engine), "runs": runs}
    for rate in args.request_rate:
        arrivals = poisson_arrivals(args.num_prompts, rate, np.random.default_rng(args.seed))
        compiled = {}
        if args.warmup == "compile":
            compiled["compiled_ahead"] = compile_ahead(engine, prompts, output_lens, args.compile_workers,
                                                       list(arrivals), [ms / 1000 for ms in args.warmup_step_ms])
        replays = warm_up(engine, prompts, output_lens, arrivals, args.warmup_replays)
        traces, duration, meter = serve(engine, prompts, output_lens, arrivals)
        runs.append({"request_rate": rate, **compiled, "warmup_replays": replays, **summarize(traces, duration),
                     "bandwidth_bound": meter.bound(host_gb_per_s)})
        print(f"{args.policy} rate {rate}: {runs[-1]['request_throughput']:.2f} req/s, "
              f"{runs[-1]['output_throughput']:.1f} output tokens/s, "
              f"p99 TPOT {runs[-1].get('p99_tpot_ms', float('nan')):.1f} ms; "
              f"{format_bound(runs[-1]['bandwidth_bound']['bound'])}; {format_step(runs[-1]['bandwidth_bound'])}")
        write_json(args.output_json, results, echo=False)  # a sweep cut short keeps the rates it finished
    write_json(args.output_json, results)


if __name__ == "__main__":
    main()
