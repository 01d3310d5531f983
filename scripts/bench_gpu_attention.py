"""Paged decode attention on the GPU: the CUDA kernel vs the gather-based reference vs a contiguous einsum.

Llama-3-8B attention shapes by default (32 q heads, 8 kv heads, head_dim 128, bf16, block 16), every request
at the full context. Reports GB/s of K/V read and % of the copy bandwidth (bytes read + written by x + 1)
measured in the same run. Each timing unrolls 4-16 calls in one program and takes the difference with half
as many, so launch overhead is not counted. Also times one scan over layers of a stacked cache, viewed as [L * N, ...] with per-layer block
offsets vs sliced per layer, to show whether slicing a layer out of the loop-carried cache costs a copy.

  python scripts/bench_gpu_attention.py --output-json gpu_attention.json
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import machine_info, output_file, positive_int, write_json  # noqa: E402

from neo_jax.kernels.paged_attention import (paged_decode_attention_cuda,  # noqa: E402
                                             paged_decode_attention_reference)


def contiguous_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """q [B, Hq, D], k/v [B, Hkv, T, D]: the same attention with no paging, the bar to reach."""
    batch, num_heads, head_dim = q.shape
    grouped = q.reshape(batch, k.shape[1], num_heads // k.shape[1], head_dim)
    scores = jnp.einsum("bhgd,bhtd->bhgt", grouped, k, preferred_element_type=jnp.float32) / math.sqrt(head_dim)
    weights = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhgt,bhtd->bhgd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(q.shape).astype(q.dtype)


def best_seconds(program: Callable, *operands, repeats: int = 5) -> float:
    jax.block_until_ready(program(*operands))
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(program(*operands))
        best = min(best, time.perf_counter() - start)
    return best


def seconds_per_call(attention: Callable, q_stack: jax.Array, *operands) -> float:
    """Calls attention on each q of q_stack, unrolled in one program; the difference between the whole stack
    and its first half cancels the program's launch and the host's wait. An optimization barrier per call keeps
    XLA from sharing work between calls (one gather of the cache for all, or one dot over all the q's)."""
    def run_all(q_stack, *operands):
        def body(total, q):
            q, *call_operands = jax.lax.optimization_barrier((q, *operands))
            return total + jnp.sum(attention(q, *call_operands).astype(jnp.float32)), None
        return jax.lax.scan(body, jnp.float32(0), q_stack, unroll=True)[0]

    program = jax.jit(run_all)
    half = q_stack.shape[0] // 2
    first_half = q_stack[:half]
    return (best_seconds(program, q_stack, *operands) - best_seconds(program, first_half, *operands)) / half


def copy_bandwidth(num_bytes: int) -> float:
    """Bytes read + written per second by x + 1 over a bf16 array of num_bytes."""
    x = jnp.ones((num_bytes // 2,), jnp.bfloat16)
    return 2 * num_bytes / best_seconds(jax.jit(lambda x: x + 1), x, repeats=10)


def paged_inputs(key: jax.Array, batch: int, context: int, args: argparse.Namespace):
    """q stack, caches with every request's blocks scattered over the pool, tables, lengths, contiguous K/V."""
    blocks_per_request = context // args.block_size
    num_blocks = batch * blocks_per_request
    keys = jax.random.split(key, 6)
    shape = (num_blocks, args.num_kv_heads, args.block_size, args.head_dim)
    k_cache = jax.random.normal(keys[0], shape, jnp.bfloat16)
    v_cache = jax.random.normal(keys[1], shape, jnp.bfloat16)
    block_tables = jax.random.permutation(keys[2], num_blocks).astype(jnp.int32).reshape(batch, blocks_per_request)
    context_lens = jnp.full((batch,), context, jnp.int32)
    kv_bytes = 2 * num_blocks * math.prod(shape[1:]) * 2
    calls = 2 * int(np.clip(args.bytes_per_program // kv_bytes, 2, 8))
    q_stack = jax.random.normal(keys[3], (calls, batch, args.num_heads, args.head_dim), jnp.bfloat16)
    contiguous_shape = (batch, args.num_kv_heads, context, args.head_dim)
    k_contiguous = jax.random.normal(keys[4], contiguous_shape, jnp.bfloat16)
    v_contiguous = jax.random.normal(keys[5], contiguous_shape, jnp.bfloat16)
    return q_stack, (k_cache, v_cache, block_tables, context_lens), (k_contiguous, v_contiguous)


def bench_shape(key: jax.Array, batch: int, context: int, copy_bytes_per_s: float,
                args: argparse.Namespace) -> dict:
    q_stack, paged, contiguous = paged_inputs(key, batch, context, args)
    kernel_out = jax.jit(paged_decode_attention_cuda)(q_stack[0], *paged)
    reference_out = jax.jit(paged_decode_attention_reference)(q_stack[0], *paged)
    max_error = float(jnp.max(jnp.abs(kernel_out.astype(jnp.float32) - reference_out.astype(jnp.float32))))
    if not max_error < 2e-2:
        raise AssertionError(f"kernel differs from the reference by {max_error} at batch {batch} x {context}")
    kv_bytes = 2 * batch * context * args.num_kv_heads * args.head_dim * 2
    row = {"batch": batch, "context": context, "kv_bytes": kv_bytes, "max_abs_error_vs_reference": max_error}
    timings = {"kernel": (paged_decode_attention_cuda, paged),
               "reference_gather": (paged_decode_attention_reference, paged),
               "contiguous_einsum": (contiguous_attention, contiguous)}
    for name, (attention, operands) in timings.items():
        seconds = seconds_per_call(attention, q_stack, *operands)
        row[name] = {"us": seconds * 1e6, "kv_gb_per_s": kv_bytes / seconds / 1e9,
                     "pct_of_copy_bandwidth": 100 * kv_bytes / seconds / copy_bytes_per_s}
    for partition_blocks in args.partition_sweep if f"{batch}x{context}" in args.sweep_shapes else []:
        attention = lambda q, *rest, p=partition_blocks: paged_decode_attention_cuda(q, *rest, partition_blocks=p)
        seconds = seconds_per_call(attention, q_stack, *paged)
        row.setdefault("kernel_by_partition_blocks", {})[str(partition_blocks)] = {
            "us": seconds * 1e6, "pct_of_copy_bandwidth": 100 * kv_bytes / seconds / copy_bytes_per_s}
    return row


def bench_layer_scan(key: jax.Array, args: argparse.Namespace) -> dict:
    """us per layer of a donated-cache scan over layers that writes one K/V slot and attends, two ways."""
    num_layers, batch, context = args.scan_layers, args.scan_batch, args.scan_context
    blocks_per_request = context // args.block_size
    num_blocks = batch * blocks_per_request
    shape = (num_layers, num_blocks, args.num_kv_heads, args.block_size, args.head_dim)
    block_tables = jnp.arange(num_blocks, dtype=jnp.int32).reshape(batch, blocks_per_request)
    context_lens = jnp.full((batch,), context, jnp.int32)
    q = jax.random.normal(key, (batch, args.num_heads, args.head_dim), jnp.bfloat16)

    def flattened_offset(q, k_layers, v_layers):
        k_flat, v_flat = k_layers.reshape(-1, *shape[2:]), v_layers.reshape(-1, *shape[2:])

        def layer_step(carry, layer):
            q, k_flat, v_flat = carry
            k_flat = k_flat.at[layer * num_blocks, :, 0].set(q[0, :args.num_kv_heads])
            v_flat = v_flat.at[layer * num_blocks, :, 0].set(q[0, :args.num_kv_heads])
            out = paged_decode_attention_cuda(q, k_flat, v_flat, block_tables + layer * num_blocks, context_lens)
            return (out, k_flat, v_flat), None

        (q, k_flat, v_flat), _ = jax.lax.scan(layer_step, (q, k_flat, v_flat), jnp.arange(num_layers))
        return q, k_flat.reshape(shape), v_flat.reshape(shape)

    def sliced(q, k_layers, v_layers):
        def layer_step(carry, layer):
            q, k_layers, v_layers = carry
            k_layers = k_layers.at[layer, 0, :, 0].set(q[0, :args.num_kv_heads])
            v_layers = v_layers.at[layer, 0, :, 0].set(q[0, :args.num_kv_heads])
            out = paged_decode_attention_cuda(q, k_layers[layer], v_layers[layer], block_tables, context_lens)
            return (out, k_layers, v_layers), None

        (q, k_layers, v_layers), _ = jax.lax.scan(layer_step, (q, k_layers, v_layers), jnp.arange(num_layers))
        return q, k_layers, v_layers

    result = {"layers": num_layers, "batch": batch, "context": context}
    for name, step in (("flattened_offset", flattened_offset), ("sliced", sliced)):
        program = jax.jit(step, donate_argnums=(1, 2))
        k_layers, v_layers = jnp.zeros(shape, jnp.bfloat16), jnp.zeros(shape, jnp.bfloat16)
        out, k_layers, v_layers = jax.block_until_ready(program(q, k_layers, v_layers))
        best = math.inf
        for _ in range(5):
            start = time.perf_counter()
            out, k_layers, v_layers = jax.block_until_ready(program(q, k_layers, v_layers))
            best = min(best, time.perf_counter() - start)
        result[f"{name}_us_per_layer"] = best / num_layers * 1e6
        del k_layers, v_layers
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=positive_int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--contexts", type=positive_int, nargs="+", default=[1024, 4096])
    parser.add_argument("--num-heads", type=positive_int, default=32)
    parser.add_argument("--num-kv-heads", type=positive_int, default=8)
    parser.add_argument("--head-dim", type=positive_int, default=128)
    parser.add_argument("--block-size", type=positive_int, default=16)
    parser.add_argument("--bytes-per-program", type=positive_int, default=1 << 32,
                        help="K/V bytes the calls of one timed program read (4 to 16 calls)")
    parser.add_argument("--partition-sweep", type=positive_int, nargs="*", default=[4, 8, 16, 32],
                        help="also time the kernel with these KV blocks per split at the sweep shapes")
    parser.add_argument("--sweep-shapes", nargs="*", default=["1x4096", "16x1024", "256x1024"],
                        help="batch x context shapes of the partition sweep")
    parser.add_argument("--scan-layers", type=positive_int, default=8)
    parser.add_argument("--scan-batch", type=positive_int, default=64)
    parser.add_argument("--scan-context", type=positive_int, default=1024)
    parser.add_argument("--output-json", type=output_file, default=None)
    args = parser.parse_args(argv)
    if jax.default_backend() != "gpu":
        raise SystemExit("bench_gpu_attention.py needs a CUDA GPU")

    copy_bytes_per_s = copy_bandwidth(1 << 32)
    results = {"machine": machine_info(), "copy_gb_per_s": copy_bytes_per_s / 1e9,
               "shapes": {k: getattr(args, k) for k in ("num_heads", "num_kv_heads", "head_dim", "block_size")},
               "results": []}
    key = jax.random.key(0)
    for batch in args.batches:
        for context in args.contexts:
            key, subkey = jax.random.split(key)
            results["results"].append(bench_shape(subkey, batch, context, copy_bytes_per_s, args))
            row = results["results"][-1]
            print(f"batch {batch:4d} x {context:5d}: " + ", ".join(
                f"{name} {row[name]['us']:.1f} us ({row[name]['pct_of_copy_bandwidth']:.0f}%)"
                for name in ("kernel", "reference_gather", "contiguous_einsum")), flush=True)
            write_json(args.output_json, results, echo=False)  # keep what is done if a later shape does not finish
    results["layer_scan"] = bench_layer_scan(key, args)
    write_json(args.output_json, results)


if __name__ == "__main__":
    main()
