"""The parts of a swap between the GPU and host KV pools, timed apart (scripts/benchmark_pipeline.py's swap rows
time only their sum inside a step).

Per count S of `--requests`, the K and V rows of S requests of `--context` tokens of `--model` (every layer, the
rows a swap moves) go through:
  store_s          a jitted host_kv_store of the rows (device -> host pool), in calls of at most --call-mb each,
                   until its token is fetched: what XLA's stream waits for;
  store_synced_s   the same until synchronize() returns: the host has also scattered the rows into the pool;
  store_repeated_s mean of back-to-back stores, each fetched but none synchronized (as consecutive swap steps);
                   after them, stored_rows_match says whether the pool holds the rows (first and last layer);
  load_s           a jitted host_kv_load of the rows (host pool -> device) until they are fetched;
  append_kv_s      the host's scatter alone: append_kv of the rows (already in host memory) into the pool's
                   NumPy views, on the op's threads.
Each as the mean of `--iters` calls after untimed ones (the first compiles), with GB/s of K/V moved. The rows go
to whole blocks in shuffled order, as a swap's do (the H200 runs of 436054c and a877c04 sent every row to a random
slot). On a GPU the stores and loads go through the CUDA handoff; on the CPU backend through its synchronous
handlers. Calls of 16 MiB are the engine's swap-out stores (neo_jax/pipeline_step.py): the device staging of the
CUDA handoff.

    python scripts/benchmark_swap.py --model llama-3-8b --requests 1 4 --call-mb 16 256 --output-json swap.json
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from bench_common import machine_info, output_file, positive_float, positive_int, write_json
from benchmark_pipeline import seconds_per_call
from neo_jax.cpu_ops import append_kv, num_threads
from neo_jax.cpu_ops.handoff import HostKvPool, host_kv_load, host_kv_store, synchronize, token_after
from neo_jax.kv_cache import allocate_host_kv_pool
from neo_jax.models.config import SUPPORTED_DTYPES, get_config
from neo_jax.pipeline_step import swap_calls


def swap_slots(rng: np.random.Generator, num_blocks: int, num_rows: int, block_size: int) -> np.ndarray:
    """int32 [num_rows] slots as a swap moves them: whole blocks in shuffled order, each block's slots in order."""
    blocks = rng.permutation(num_blocks)[:-(-num_rows // block_size)]
    return (blocks[:, None] * block_size + np.arange(block_size)).reshape(-1)[:num_rows].astype(np.int32)


def time_call_size(pool: HostKvPool, k_host: np.ndarray, v_host: np.ndarray, slots: np.ndarray, call_bytes: int,
                   iters: int) -> dict[str, Any]:
    """Stores and loads of k_host / v_host [L, m, kv_heads, head_dim] at `slots` of every layer, in calls of at most
    `call_bytes` of staging."""
    num_layers, _, heads, head_dim = k_host.shape
    row_bytes = 2 * heads * head_dim * pool.dtype.itemsize
    pieces = swap_calls(num_layers * slots.size, row_bytes, call_bytes)
    layers = jnp.repeat(jnp.arange(num_layers, dtype=jnp.int32), slots.size)  # every layer's rows, layer-major
    layer_slots = jnp.tile(jnp.asarray(slots), num_layers)
    k_rows, v_rows = jnp.asarray(k_host).reshape(-1, heads, head_dim), jnp.asarray(v_host).reshape(-1, heads, head_dim)

    @jax.jit
    def store(k: jax.Array, v: jax.Array) -> jax.Array:
        done = jnp.zeros((), jnp.int32)
        for piece in pieces:
            done = done + host_kv_store(pool, k[piece], v[piece], layers[piece], layer_slots[piece])
        return done

    @jax.jit
    def load() -> jax.Array:
        done = jnp.zeros((), jnp.int32)
        for piece in pieces:
            k, v = host_kv_load(pool, layers[piece], layer_slots[piece])
            done = done + token_after(k) + token_after(v)
        return done

    def store_synced() -> None:
        np.asarray(store(k_rows, v_rows))
        synchronize()

    def load_synced() -> None:
        synchronize()
        np.asarray(load())

    checked_layers = (0, num_layers - 1)
    cell = {"calls": len(pieces), "store_s": timed_fetch(store_synced, lambda: store(k_rows, v_rows), iters),
            "store_synced_s": seconds_per_call(store_synced, iters)["step_s"]}
    for layer in checked_layers:
        pool.k_cache[layer][...], pool.v_cache[layer][...] = 0, 0
    cell["store_repeated_s"] = seconds_per_call(lambda: store(k_rows, v_rows), iters)["step_s"]
    synchronize()
    cell["stored_rows_match"] = all(stored_rows_match(pool, layer, slots, k_host[layer], v_host[layer])
                                    for layer in checked_layers)
    cell["load_s"] = timed_fetch(load_synced, load, iters)
    return cell


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--dtype", default="bfloat16", choices=SUPPORTED_DTYPES)
    parser.add_argument("--context", type=positive_int, default=1024)
    parser.add_argument("--block-size", type=positive_int, default=16)
    parser.add_argument("--requests", type=positive_int, nargs="+", default=[1, 4])
    parser.add_argument("--call-mb", type=positive_float, nargs="+", default=[16, 256],
                        help="staging per store or load call (MiB): K and V rows, their indices, alignment")
    parser.add_argument("--iters", type=positive_int, default=10)
    parser.add_argument("--output-json", type=output_file)
    args = parser.parse_args(argv)

    config = get_config(args.model).with_dtype(args.dtype)
    shape = (config.num_layers, config.num_kv_heads, config.head_dim)
    blocks = max(args.requests) * -(-args.context // args.block_size)
    pool = allocate_host_kv_pool(config, blocks, args.block_size)
    results: dict[str, Any] = {"machine": machine_info(), "model": args.model, "context": args.context,
                               "host_pool_pinned": bool(pool.pinned), "threads": num_threads(), "rows": []}
    rng = np.random.default_rng(0)
    for num_requests in args.requests:
        slots = swap_slots(rng, blocks, num_requests * args.context, args.block_size)
        k_host, v_host = (rng.standard_normal((shape[0], slots.size, *shape[1:])).astype(pool.dtype) for _ in "kv")
        moved_bytes = 2 * k_host.nbytes

        def append_all() -> None:
            for layer in range(shape[0]):
                append_kv(pool.k_cache[layer], pool.v_cache[layer], k_host[layer], v_host[layer], slots)

        row: dict[str, Any] = {"requests": num_requests, "moved_bytes": moved_bytes,
                               "append_kv_s": seconds_per_call(append_all, args.iters)["step_s"], "calls": []}
        for call_mb in args.call_mb:
            cell = {"call_mb": call_mb, **time_call_size(pool, k_host, v_host, slots, int(call_mb * (1 << 20)),
                                                         args.iters)}
            for key in ("store_s", "store_synced_s", "store_repeated_s", "load_s"):
                cell[key[:-len("_s")] + "_gb_per_s"] = moved_bytes / cell[key] / 1e9
            row["calls"].append(cell)
        row["append_kv_gb_per_s"] = moved_bytes / row["append_kv_s"] / 1e9
        print(row, flush=True)
        results["rows"].append(row)
        write_json(args.output_json, results)
    return results


def stored_rows_match(pool: HostKvPool, layer: int, slots: np.ndarray, k_rows: np.ndarray,
                      v_rows: np.ndarray) -> bool:
    """Whether the pool's `layer` holds k_rows / v_rows [m, kv_heads, head_dim] at `slots`."""
    blocks, offsets = slots // pool.block_size, slots % pool.block_size
    return bool(np.array_equal(pool.k_cache[layer][blocks, :, offsets], k_rows)
                and np.array_equal(pool.v_cache[layer][blocks, :, offsets], v_rows))


def timed_fetch(settle: Callable[[], None], call: Callable[[], jax.Array], iters: int) -> float:
    """Mean seconds of `call` until its result is fetched, each started after `settle` (untimed) left the
    handoff idle."""
    settle()
    total = 0.0
    for _ in range(iters):
        synchronize()
        start = time.perf_counter()
        np.asarray(call())
        total += time.perf_counter() - start
    return total / iters


if __name__ == "__main__":
    main()
