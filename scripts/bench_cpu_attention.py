"""The CPU paged decode-attention op vs the machine's read bandwidth vs torch's CPU attention, in one run.

Llama-3-8B attention shapes by default (32 q heads, 8 kv heads, head_dim 128, bf16 K/V and q, block 16).
One K/V pool is filled once; each (requests, context) cell draws its blocks at random from it, so the op
reads a paged cache. Per cell, on the same data:
  - our op (neo_jax.cpu_ops.paged_decode_attention): GB/s of K/V read;
  - torch.nn.functional.scaled_dot_product_attention over the cell's K/V gathered into contiguous
    [requests, kv_heads, context, head_dim] tensors beforehand (the gather is not timed), same threads, the
    peer of the goal; and torch on the paged cache as a torch user would run it, the gather timed with it;
  - the read bandwidth: cpu_ops.read_bandwidth_probe, a STREAM-like sum over an array larger than the
    caches on the op's own pool, before and after the sweep (the best repeat is the bar).
Times are the best of a few repeats (fewer for long cells). Cells whose K/V exceed --max-kv-gb are skipped.

  python scripts/bench_cpu_attention.py --output-json cpu_attention.json
  python scripts/bench_cpu_attention.py --quick      # a small smoke run
"""

from __future__ import annotations

import argparse
import math
import mmap
import os
import sys
import time
from typing import Any, Callable

import ml_dtypes
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import (  # noqa: E402
    machine_info, nonnegative_int, output_file, positive_float, positive_int, write_json,
)

from neo_jax import cpu_ops  # noqa: E402

DTYPES = {"bfloat16": (ml_dtypes.bfloat16, torch.bfloat16), "float16": (np.float16, torch.float16),
          "float32": (np.float32, torch.float32)}
GOAL_MIN_REQUESTS, GOAL_MIN_CONTEXT = 64, 1024
GOAL_FRACTION_OF_READ, GOAL_SPEEDUP_VS_TORCH = 0.85, 2.0
# --quick's defaults: what an option given explicitly still overrides.
QUICK_DEFAULTS = {"requests": [1, 4, 16], "contexts": [128, 1024], "num_q_heads": 8, "num_kv_heads": 2,
                  "max_kv_gb": 0.5, "probe_gb": 0.25, "seconds_per_cell": 0.02}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=positive_int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    parser.add_argument("--contexts", type=positive_int, nargs="+",
                        default=[128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--num-q-heads", type=positive_int, default=32)
    parser.add_argument("--num-kv-heads", type=positive_int, default=8)
    parser.add_argument("--head-dim", type=positive_int, default=128)
    parser.add_argument("--block-size", type=positive_int, default=16)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="of K/V, q and the output")
    parser.add_argument("--max-kv-gb", type=positive_float, default=24.0, help="skip cells whose K/V exceed this")
    parser.add_argument("--probe-gb", type=positive_float, default=4.0, help="array size of the read-bandwidth probe")
    parser.add_argument("--seconds-per-cell", type=positive_float, default=0.1, help="timing budget per measurement")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="default: NEO_CPU_THREADS, else every physical core (the op alone keeps half of them "
                        "free on a machine with a CUDA GPU, for the engine's other threads)")
    parser.add_argument("--isa", default=None, choices=cpu_ops.available_isas(),
                        help="force a kernel (default: the CPU's best)")
    parser.add_argument("--huge-pages", action="store_true", help="back the K/V pool with transparent huge pages")
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help=f"small shapes and grid, for a CPU smoke run: the defaults become {QUICK_DEFAULTS}")
    parser.add_argument("--output-json", type=output_file, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK_DEFAULTS)
        args = parser.parse_args(argv)
    if any(context % args.block_size for context in args.contexts):
        parser.error("--contexts must be multiples of --block-size")
    if args.num_q_heads % args.num_kv_heads:
        parser.error("--num-q-heads must be a multiple of --num-kv-heads")
    if not fitting_cells(args):
        parser.error("--max-kv-gb leaves no (requests, context) cell to run")
    return args


def token_bytes(args: argparse.Namespace) -> int:
    """K and V bytes of one token."""
    _, torch_dtype = DTYPES[args.dtype]
    return 2 * args.num_kv_heads * args.head_dim * torch.empty((), dtype=torch_dtype).element_size()


def fitting_cells(args: argparse.Namespace) -> list[tuple[int, int]]:
    """The (requests, context) cells whose K/V fit in --max-kv-gb."""
    return [(r, c) for r in args.requests for c in args.contexts if r * c * token_bytes(args) <= args.max_kv_gb * 1e9]


def timed(call: Callable[[], Any], seconds_budget: float) -> tuple[float, float, int]:
    """(best, median, repeats) seconds of call() after one warm-up; repeats fit the budget, 2 to 50."""
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    repeats = int(min(50, max(2, seconds_budget / max(first, 1e-9))))
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return min(seconds), float(np.median(seconds)), repeats


def filled_cache(shape: tuple[int, ...], dtype: torch.dtype, huge_pages: bool,
                 rng: np.random.Generator) -> torch.Tensor:
    """A K or V pool of `shape`, filled (in parallel, by torch) with a tiled random pattern."""
    pattern = torch.from_numpy(rng.standard_normal(1 << 22, np.float32)).to(dtype)
    if huge_pages:
        memory = mmap.mmap(-1, math.prod(shape) * pattern.element_size(), mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        memory.madvise(mmap.MADV_HUGEPAGE)
        cache = torch.frombuffer(memory, dtype=dtype).view(shape)
    else:
        cache = torch.empty(shape, dtype=dtype)
    flat = cache.view(-1)
    whole = flat.numel() // pattern.numel() * pattern.numel()
    flat[:whole].view(-1, pattern.numel()).copy_(pattern.expand(whole // pattern.numel(), -1))
    flat[whole:].copy_(pattern[: flat.numel() - whole])
    return cache


def as_numpy(tensor: torch.Tensor, np_dtype) -> np.ndarray:
    """A zero-copy NumPy view (bf16 as ml_dtypes.bfloat16, which torch cannot export directly)."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np_dtype)
    return tensor.numpy()


def gathered(cache: torch.Tensor, block_tables: np.ndarray) -> torch.Tensor:
    """[requests, kv_heads, blocks * block_size, head_dim], contiguous, from the paged pool."""
    _, num_kv_heads, block_size, head_dim = cache.shape
    num_requests, num_blocks = block_tables.shape
    out = torch.empty((num_requests, num_kv_heads, num_blocks * block_size, head_dim), dtype=cache.dtype)
    blocks = torch.empty((num_blocks, num_kv_heads, block_size, head_dim), dtype=cache.dtype)
    for r, table in enumerate(torch.from_numpy(block_tables)):
        torch.index_select(cache, 0, table, out=blocks)
        out[r].view(num_kv_heads, num_blocks, block_size, head_dim).copy_(blocks.transpose(0, 1))
    return out


def best_read_bandwidth(num_bytes: int) -> float:
    return max(cpu_ops.read_bandwidth_probe(num_bytes, repeats=5))


def run_cell(args: argparse.Namespace, k_pool: torch.Tensor, v_pool: torch.Tensor, num_requests: int,
             context: int, rng: np.random.Generator) -> dict[str, Any]:
    np_dtype, torch_dtype = DTYPES[args.dtype]
    num_blocks, _, block_size, head_dim = k_pool.shape
    blocks_per_request = -(-context // block_size)
    block_tables = rng.choice(num_blocks, size=(num_requests, blocks_per_request), replace=False).astype(np.int32)
    context_lens = np.full(num_requests, context, np.int32)
    q_torch = torch.from_numpy(rng.standard_normal((num_requests, args.num_q_heads, head_dim), np.float32))
    q_torch = q_torch.to(torch_dtype)
    q = as_numpy(q_torch, np_dtype)
    k_cache, v_cache = as_numpy(k_pool, np_dtype), as_numpy(v_pool, np_dtype)
    out = np.empty_like(q)

    def our_op() -> None:
        cpu_ops.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, out=out, isa=args.isa)

    op_best, op_median, op_repeats = timed(our_op, args.seconds_per_cell)

    k, v = gathered(k_pool, block_tables), gathered(v_pool, block_tables)
    q_4d = q_torch.unsqueeze(2)  # [requests, q_heads, 1, head_dim]
    torch_out = {}

    def torch_sdpa() -> None:
        torch_out["out"] = torch.nn.functional.scaled_dot_product_attention(q_4d, k, v, enable_gqa=True)

    torch_best, torch_median, torch_repeats = timed(torch_sdpa, args.seconds_per_cell)

    def torch_paged() -> None:
        gathered_k, gathered_v = gathered(k_pool, block_tables), gathered(v_pool, block_tables)
        torch.nn.functional.scaled_dot_product_attention(q_4d, gathered_k, gathered_v, enable_gqa=True)

    torch_paged_best, _, _ = timed(torch_paged, args.seconds_per_cell)
    difference = (torch.from_numpy(out.astype(np.float32)) - torch_out["out"].squeeze(2).float()).abs().max()
    kv_bytes = 2 * num_requests * context * args.num_kv_heads * head_dim * k_pool.element_size()
    return {"num_requests": num_requests, "context": context, "kv_bytes": kv_bytes,
            "op_seconds": op_best, "op_seconds_median": op_median, "op_repeats": op_repeats,
            "op_gbps": kv_bytes / op_best / 1e9,
            "torch_seconds": torch_best, "torch_seconds_median": torch_median, "torch_repeats": torch_repeats,
            "torch_gbps": kv_bytes / torch_best / 1e9, "speedup_vs_torch": torch_best / op_best,
            "torch_paged_seconds": torch_paged_best, "speedup_vs_torch_paged": torch_paged_best / op_best,
            "max_abs_difference_vs_torch": float(difference)}


def print_table(title: str, cells: list[dict[str, Any]], value: Callable[[dict[str, Any]], str],
                requests: list[int], contexts: list[int]) -> None:
    by_key = {(c["num_requests"], c["context"]): c for c in cells}
    print(f"\n{title}\n{'reqs':>5} " + " ".join(f"{c:>7}" for c in contexts))
    for r in requests:
        row = [value(by_key[(r, c)]) if (r, c) in by_key else "-" for c in contexts]
        print(f"{r:>5} " + " ".join(f"{text:>7}" for text in row))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is None and "NEO_CPU_THREADS" not in os.environ:
        args.threads = cpu_ops.physical_cores()
    if args.threads is not None:
        cpu_ops.set_num_threads(args.threads)
    threads = cpu_ops.num_threads()
    torch.set_num_threads(threads)
    rng = np.random.default_rng(args.seed)
    _, torch_dtype = DTYPES[args.dtype]
    grid = fitting_cells(args)
    num_blocks = max(r * -(-c // args.block_size) for r, c in grid) + 1
    pool_shape = (num_blocks, args.num_kv_heads, args.block_size, args.head_dim)
    print(f"{threads} threads, isa {args.isa or cpu_ops.cpu_isa()}, chunks of {cpu_ops.chunk_tokens()} tokens, "
          f"K/V pool {pool_shape} x 2 {args.dtype}")

    probe_bytes = int(args.probe_gb * 1e9)
    read_before = best_read_bandwidth(probe_bytes)
    print(f"read bandwidth before the sweep: {read_before:.1f} GB/s")
    k_pool, v_pool = (filled_cache(pool_shape, torch_dtype, args.huge_pages, rng) for _ in range(2))
    cells = []
    for num_requests, context in grid:
        cells.append(run_cell(args, k_pool, v_pool, num_requests, context, rng))
        cell = cells[-1]
        print(f"{num_requests:>4} x {context:>6}: op {cell['op_gbps']:6.1f} GB/s, torch {cell['torch_gbps']:6.1f}"
              f" GB/s, |op - torch| <= {cell['max_abs_difference_vs_torch']:.3g}")
    del k_pool, v_pool
    read_after = best_read_bandwidth(probe_bytes)
    read_gbps = max(read_before, read_after)
    for cell in cells:
        cell["fraction_of_read_bandwidth"] = cell["op_gbps"] / read_gbps

    goal_cells = [c for c in cells if c["num_requests"] >= GOAL_MIN_REQUESTS and c["context"] >= GOAL_MIN_CONTEXT]
    goal = {"cells": len(goal_cells), "min_fraction_of_read_bandwidth": None, "min_speedup_vs_torch": None,
            "min_speedup_vs_torch_paged": None, "met": False}
    if goal_cells:
        for key, field in (("min_fraction_of_read_bandwidth", "fraction_of_read_bandwidth"),
                           ("min_speedup_vs_torch", "speedup_vs_torch"),
                           ("min_speedup_vs_torch_paged", "speedup_vs_torch_paged")):
            goal[key] = min(c[field] for c in goal_cells)
        goal["met"] = (goal["min_fraction_of_read_bandwidth"] >= GOAL_FRACTION_OF_READ
                       and goal["min_speedup_vs_torch"] >= GOAL_SPEEDUP_VS_TORCH)
    results = {
        "machine": machine_info(), "threads": threads, "isa": args.isa or cpu_ops.cpu_isa(),
        "chunk_tokens": cpu_ops.chunk_tokens(),
        "shape": {"num_q_heads": args.num_q_heads, "num_kv_heads": args.num_kv_heads, "head_dim": args.head_dim,
                  "block_size": args.block_size, "dtype": args.dtype, "pool_blocks": num_blocks,
                  "huge_pages": args.huge_pages},
        "read_bandwidth_gbps": read_gbps, "read_bandwidth_gbps_before_after": [read_before, read_after],
        "torch": torch.__version__, "goal_at_least_64_requests_1k_context": goal, "cells": cells,
    }
    write_json(args.output_json, results)
    show = dict(requests=args.requests, contexts=args.contexts)
    print_table("op GB/s of K/V read", cells, lambda c: f"{c['op_gbps']:.1f}", **show)
    print_table(f"op / read bandwidth ({read_gbps:.1f} GB/s)", cells,
                lambda c: f"{c['fraction_of_read_bandwidth']:.2f}", **show)
    print_table("op speed / torch SDPA speed (K/V gathered beforehand)", cells,
                lambda c: f"{c['speedup_vs_torch']:.2f}", **show)
    print_table("op speed / torch gather + SDPA speed", cells, lambda c: f"{c['speedup_vs_torch_paged']:.2f}",
                **show)
    print(f"\ngoal (>= {GOAL_MIN_REQUESTS} requests x >= {GOAL_MIN_CONTEXT} context): {goal}")


if __name__ == "__main__":
    main()
