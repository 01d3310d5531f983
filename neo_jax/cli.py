"""Command-line entry points (`neo-jax-generate`, `scripts/generate.py`)."""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence

from neo_jax.step_plan import POLICIES

DEFAULT_PROMPTS = (
    "The capital of France is",
    "Write a haiku about paged attention:",
    "Once upon a time, in a data center far away,",
    "CPU offloading lets a GPU serve",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Generate completions with neo-jax. With no --model: the tiny preset with random weights "
                    "(gibberish, through the byte-level tokenizer), on the GPU if JAX sees one, else the CPU.")
    parser.add_argument("prompts", nargs="*", help="prompts (default: a few built-in ones)")
    parser.add_argument("--prompts-file", help="a text file with one prompt per line")
    parser.add_argument("--model", default="tiny", help="HF checkpoint directory or preset name (default: tiny)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), help="default: the model's")
    parser.add_argument("--policy", default="gpu-only", choices=POLICIES)
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--gpu-kv-cache-gb", type=float, help="cap on the GPU KV cache, GiB")
    parser.add_argument("--cpu-kv-cache-gb", type=float,
                        help="host KV pool of the offload policies, GiB (default: half the free host memory)")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="devices the model is split over")
    parser.add_argument("--no-async-scheduling", action="store_true",
                        help="fetch each step's tokens before scheduling the next (default: overlap them)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0, help="engine seed: random weights and unseeded requests")
    parser.add_argument("--ignore-eos", action="store_true")
    return parser


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts given as arguments, then the file's non-blank lines; with neither, the built-in ones. A file
    that cannot be read or holds no prompt raises ValueError naming it (not a run of the built-in prompts)."""
    prompts = list(args.prompts)
    if args.prompts_file is not None:
        try:
            with open(args.prompts_file) as f:
                from_file = [line.rstrip("\n") for line in f if line.strip()]
        except OSError as error:
            raise ValueError(f"argument --prompts-file: cannot read {args.prompts_file}: {error.strerror}") from None
        if not from_file:
            raise ValueError(f"argument --prompts-file: {args.prompts_file} holds no prompt (every line is blank)")
        prompts += from_file
    return prompts or list(DEFAULT_PROMPTS)


def generate_main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        prompts = read_prompts(args)
    except ValueError as error:
        parser.error(str(error))
    from neo_jax.llm import LLM
    from neo_jax.sampling_params import SamplingParams

    try:
        llm = LLM(args.model, dtype=args.dtype, max_model_len=args.max_model_len, gpu_kv_cache_gb=args.gpu_kv_cache_gb,
                  policy=args.policy, cpu_kv_cache_gb=args.cpu_kv_cache_gb, seed=args.seed,
                  max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                  tensor_parallel_size=args.tensor_parallel_size, async_scheduling=not args.no_async_scheduling)
    except ValueError as error:  # an option the model or machine cannot take: say which, as argparse does
        parser.error(str(error))
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                            max_tokens=args.max_tokens, ignore_eos=args.ignore_eos)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    num_tokens = 0
    for output in outputs:
        completion = output.outputs[0]
        num_tokens += len(completion.token_ids)
        print(f"--- {output.prompt!r}")
        print(completion.text if output.error is None else f"[error] {output.error}")
    print(f"{len(outputs)} prompts, {num_tokens} tokens in {elapsed:.2f} s: {num_tokens / elapsed:.1f} tokens/s "
          "(compilation included)")
