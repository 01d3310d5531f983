"""Offline throughput, vLLM's benchmark_throughput conventions: every request is queued at once.

    python scripts/benchmark_throughput.py --model llama-3-8b --dtype bfloat16 --num-prompts 1000 \
        --input-len 1000 --output-len 300 --policy neo --gpu-kv-cache-gb 1.5 --output-json out.json

A warm-up pass over the same workload with few output tokens compiles the step's shapes first, so the
timed pass measures serving, not XLA compilation.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from tqdm import tqdm

from bench_common import add_engine_arguments, engine_from_args, machine_info, write_json
from neo_jax.benchmark_metrics import random_lengths, random_prompts
from neo_jax.engine import LLMEngine
from neo_jax.sampling_params import SamplingParams


def run_requests(engine: LLMEngine, prompts: list[list[int]], output_lens: list[int], desc: str) -> float:
    """Queues every request, steps the engine until all finish; the elapsed seconds."""
    start = time.perf_counter()
    for prompt, output_len in zip(prompts, output_lens):
        engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True))
    with tqdm(total=len(prompts), desc=desc, unit="req") as bar:
        while engine.has_unfinished_requests():
            bar.update(len(engine.step()))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_arguments(parser)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--range-ratio", type=float, default=0.0, help="lengths uniform in len*(1 +- ratio)")
    parser.add_argument("--warmup-output-len", type=int, default=4)
    args = parser.parse_args()

    engine = engine_from_args(args)
    rng = np.random.default_rng(args.seed)
    input_lens = random_lengths(args.num_prompts, args.input_len, args.range_ratio, rng)
    output_lens = random_lengths(args.num_prompts, args.output_len, args.range_ratio, rng)
    prompts = random_prompts(input_lens, engine.model_config.vocab_size, rng)
    run_requests(engine, prompts, [min(n, args.warmup_output_len) for n in output_lens], "warm-up")
    elapsed = run_requests(engine, prompts, output_lens, args.policy)

    total_in, total_out = sum(input_lens), sum(output_lens)
    write_json(args.output_json, {
        "benchmark": "throughput", "machine": machine_info(), "args": vars(args),
        "num_gpu_blocks": engine.pool.num_blocks, "elapsed_s": elapsed,
        "requests_per_s": args.num_prompts / elapsed, "total_tokens_per_s": (total_in + total_out) / elapsed,
        "output_tokens_per_s": total_out / elapsed,
    })


if __name__ == "__main__":
    main()
