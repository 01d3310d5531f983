"""Measures the cost model's tables (neo_jax.cost_model) for one model on this machine and saves them.

    python scripts/profile.py --model llama-3-8b --dtype bfloat16            # on the GPU machine
    python scripts/profile.py --model tiny --quick --output /tmp/table.json  # a smoke run on a laptop

Only ONE decoder layer's random parameters are built. Every GPU timing runs its kernel `--repeats-in-program`
times inside one jitted program (a `fori_loop` whose carry feeds the next call, as the engine's scan over
layers does), so the per-call time excludes Python dispatch. The CPU attention table times the NumPy entry
of the CPU op on a host KV cache in the model's dtype. The handoff table is the extra time per layer of a
jitted loop of decoder layers some of whose rows attend on the CPU through `cpu_attention_start` /
`cpu_attention_wait` (one token of context per request) over the same loop without them, less the CPU op's own
time for those requests (the CPU attention table charges that). The table is saved
where `load_cost_model` looks (NEO_JAX_COST_TABLES or ~/.cache/neo_jax/cost_tables, or --cost-table-dir) and,
with --output, there too.

With --tensor-parallel-size N the table is that of N devices ("<gpu> xN", as a tensor-parallel engine looks it
up): the linear layers run sharded over the N devices (their all-reduces included), and the GPU attention and
handoff are timed on one device with one shard's heads, since the shards run side by side. The CPU attention
reads every head either way.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from tqdm import tqdm

from neo_jax.attention import prefill_attention
from neo_jax.batch import StepBatch
from neo_jax.cost_model import DEFAULT_COST_TABLE_DIR, CostModel, MachineId, cost_table_path, gpu_side_name
from neo_jax.cost_tables import Table1D, Table2D
from neo_jax.cpu_ops import paged_decode_attention as cpu_paged_decode_attention
from neo_jax.cpu_ops.handoff import HostKvPool, cpu_attention_start, cpu_attention_wait
from neo_jax.kernels.paged_attention import paged_decode_attention
from neo_jax.model_runner import STEP_COMPILER_OPTIONS
from neo_jax.models.config import SUPPORTED_DTYPES, ModelConfig, get_config
from neo_jax.models.llama import init_layer_params, post_attention, pre_attention
from neo_jax.sharded_host_attention import computed_after
from neo_jax.sharding import LAYER_SPECS, check_tensor_parallel_size, make_mesh, named_shardings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_common, however this file is loaded
from bench_common import option_error, output_file, positive_int  # noqa: E402

NUMPY_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    """Median wall time of `run()` (which must block until its work is done) after one untimed call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def seconds_per_iteration(body: Callable[..., jax.Array], carry: jax.Array, operands: tuple, iterations: int,
                          repeats: int) -> float:
    """Time of one `body(carry, *operands) -> carry` call, from a jitted loop of `iterations` calls. The operands
    (weights, caches) are arguments, not constants folded into the program."""
    loop = jax.jit(lambda c, ops: jax.lax.fori_loop(0, iterations, lambda _, x: body(x, *ops), c),
                   compiler_options=STEP_COMPILER_OPTIONS)  # launched as the engine's steps are
    return median_seconds(lambda: loop(carry, operands).block_until_ready(), repeats) / iterations


def one_layer_params(config: ModelConfig, tensor_parallel_size: int = 1) -> dict:
    """One decoder layer's random params, split over `tensor_parallel_size` devices as the engine splits them."""
    params = jax.jit(init_layer_params, static_argnums=0)(config, jax.random.key(0))
    if tensor_parallel_size == 1:
        return params
    return jax.device_put(params, named_shardings(make_mesh(tensor_parallel_size), LAYER_SPECS))


def one_shard(config: ModelConfig, tensor_parallel_size: int) -> ModelConfig:
    """The config whose attention is one shard's: its q and kv heads."""
    check_tensor_parallel_size(config, tensor_parallel_size)
    return dataclasses.replace(config, num_heads=config.num_heads // tensor_parallel_size,
                               num_kv_heads=config.num_kv_heads // tensor_parallel_size)


def measure_linear(config: ModelConfig, params: dict, num_tokens: int, iterations: int, repeats: int) -> float:
    """Norms, projections and MLP of one layer over `num_tokens` tokens (q stands in for attention's output)."""
    positions = jnp.arange(num_tokens, dtype=jnp.int32)

    def layer(hidden: jax.Array, layer_params: dict) -> jax.Array:
        q, _, _ = pre_attention(layer_params, config, hidden, positions)
        return post_attention(layer_params, config, hidden, q)

    hidden = jax.random.normal(jax.random.key(1), (num_tokens, config.hidden_size), config.dtype)
    return seconds_per_iteration(layer, hidden, (params,), iterations, repeats)


def measure_prefill_attention(config: ModelConfig, num_tokens: int, block_size: int, iterations: int,
                              repeats: int) -> float:
    """The engine's prefill attention (context gather + causal attention) of one whole prompt."""
    num_blocks = -(-num_tokens // block_size)
    cache_shape = (num_blocks, config.num_kv_heads, block_size, config.head_dim)
    k_blocks = jax.random.normal(jax.random.key(2), cache_shape, config.dtype)
    v_blocks = jax.random.normal(jax.random.key(3), cache_shape, config.dtype)
    tokens = jnp.arange(num_tokens, dtype=jnp.int32)
    zeros = jnp.zeros((num_tokens,), jnp.int32)
    batch = StepBatch(token_ids=zeros, positions=tokens, slot_mapping=tokens,
                      decode_block_tables=jnp.zeros((0, 1), jnp.int32), decode_context_lens=jnp.zeros((0,), jnp.int32),
                      prefill_request_ids=zeros, context_slots=tokens, context_request_ids=zeros,
                      context_positions=tokens, sample_indices=jnp.zeros((1,), jnp.int32))
    body = lambda q, k, v, b: prefill_attention(q, k, v, b, jnp.int32(0))
    q = jax.random.normal(jax.random.key(4), (num_tokens, config.num_heads, config.head_dim), config.dtype)
    return seconds_per_iteration(body, q, (k_blocks, v_blocks, batch), iterations, repeats)


def measure_gpu_decode_attention(config: ModelConfig, num_requests: int, context_len: int, block_size: int,
                                 iterations: int, repeats: int) -> float:
    """Paged decode attention of `num_requests` requests of `context_len` tokens each, distinct blocks."""
    blocks_per_request = -(-context_len // block_size)
    cache_shape = (num_requests * blocks_per_request, config.num_kv_heads, block_size, config.head_dim)
    k_cache = jax.random.normal(jax.random.key(5), cache_shape, config.dtype)
    v_cache = jax.random.normal(jax.random.key(6), cache_shape, config.dtype)
    tables = jnp.arange(num_requests * blocks_per_request, dtype=jnp.int32).reshape(num_requests, -1)
    lens = jnp.full((num_requests,), context_len, jnp.int32)
    q = jax.random.normal(jax.random.key(7), (num_requests, config.num_heads, config.head_dim), config.dtype)
    return seconds_per_iteration(paged_decode_attention, q, (k_cache, v_cache, tables, lens), iterations, repeats)


def measure_cpu_decode_attention(config: ModelConfig, k_cache: np.ndarray, v_cache: np.ndarray,
                                 num_requests: int, total_context: int, repeats: int) -> float:
    """The CPU op over `total_context` tokens split evenly among `num_requests` requests."""
    block_size = k_cache.shape[2]
    context_len = max(1, total_context // num_requests)
    blocks_per_request = -(-context_len // block_size)
    tables = np.arange(num_requests * blocks_per_request, dtype=np.int32).reshape(num_requests, -1)
    lens = np.full((num_requests,), context_len, np.int32)
    q = np.full((num_requests, config.num_heads, config.head_dim), 0.01, k_cache.dtype)
    out = np.empty_like(q)
    return median_seconds(lambda: cpu_paged_decode_attention(q, k_cache, v_cache, tables, lens, out=out), repeats)


def measure_handoff(config: ModelConfig, layer_params: dict, pool: HostKvPool, num_requests: int, iterations: int,
                    repeats: int, gpu_rows: int = 16) -> float:
    """Extra seconds per layer when `num_requests` of a layer's rows (one token of context each) attend on the CPU
    through `cpu_attention_start` / `cpu_attention_wait` around the layer's GPU work, as in the step, over the same
    layer without them, less the CPU op's own time for those requests (the CPU attention table charges that).

    The layer (`layer_params`, of `config`: one shard's heads) runs `gpu_rows` + `num_requests` tokens. Timed
    bare (no layer around the calls), the round trip beyond the CPU op was 64 us on the H200, a third of what it
    added to a step there (~195 us per layer), where the GPU drains to each start and the CPU's workers idle
    between layers."""
    block_size = pool.block_size
    slots = jnp.arange(num_requests, dtype=jnp.int32) * block_size
    tables = jnp.arange(num_requests, dtype=jnp.int32)[:, None]
    lens = jnp.ones((num_requests,), jnp.int32)
    positions = jnp.zeros((gpu_rows + num_requests,), jnp.int32)

    def layer(hidden: jax.Array, params: dict, handoff: bool) -> jax.Array:
        q, k, v = pre_attention(params, config, hidden, positions)
        if handoff:
            pending = cpu_attention_start(pool, q[gpu_rows:], k[gpu_rows:].astype(pool.dtype),
                                          v[gpu_rows:].astype(pool.dtype), 0, slots, tables, lens)
            (q,) = computed_after(pending.token[None], None, q)  # the GPU work follows the start
            q = jnp.concatenate([q[:gpu_rows], cpu_attention_wait(pending, q)])
        return post_attention(params, config, hidden, q)

    hidden = jax.random.normal(jax.random.key(9), (gpu_rows + num_requests, config.hidden_size), config.dtype)
    with_s = seconds_per_iteration(lambda h, p: layer(h, p, True), hidden, (layer_params,), iterations, repeats)
    without_s = seconds_per_iteration(lambda h, p: layer(h, p, False), hidden, (layer_params,), iterations, repeats)
    cpu_s = measure_cpu_decode_attention(config, pool.k_cache[0], pool.v_cache[0], num_requests, num_requests,
                                         repeats)  # the same requests: one token each, blocks 0..n-1
    return max(0.0, with_s - without_s - cpu_s)


def grids(quick: bool, context_len: int) -> dict[str, list[int]]:
    """The measured points of each table; --quick keeps a few small ones."""
    if quick:
        return {"linear": [1, 16], "prefill": [16], "decode_requests": [1], "cpu_requests": [1, 4],
                "cpu_context": [64, 256], "handoff": [1]}
    requests = [1, 4, 16, 64, 256]
    return {"linear": [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096],
            "prefill": [64, 256, 512, 1024, 2048, 4096], "decode_requests": requests, "cpu_requests": requests,
            "cpu_context": [context_len * n for n in requests] + [context_len * 512], "handoff": [1, 16, 64, 256]}


def profile(config: ModelConfig, model: str, block_size: int, context_len: int, quick: bool,
            tensor_parallel_size: int = 1) -> CostModel:
    points = grids(quick, context_len)
    iterations, repeats = (2, 2) if quick else (8, 5)
    gpu_name = gpu_side_name(jax.devices()[0].device_kind, tensor_parallel_size)
    shard = one_shard(config, tensor_parallel_size)
    steps = (len(points["linear"]) + len(points["prefill"]) + len(points["decode_requests"])
             + len(points["cpu_requests"]) * len(points["cpu_context"]) + len(points["handoff"]))
    bar = tqdm(total=steps, desc=f"profile {model}", unit="point")

    def measured(name: str, values: list[int], measure: Callable[[int], float]) -> list[float]:
        results = []
        for value in values:
            bar.set_postfix_str(f"{name} {value}")
            results.append(measure(value))
            bar.update()
        return results

    params = one_layer_params(config, tensor_parallel_size)
    linear = measured("linear", points["linear"],
                      lambda n: measure_linear(config, params, n, iterations, repeats))
    del params
    prefill = measured("prefill", points["prefill"],
                       lambda n: measure_prefill_attention(shard, n, block_size, iterations, repeats))
    decode = measured("gpu decode", points["decode_requests"], lambda n: measure_gpu_decode_attention(
        shard, n, context_len, block_size, iterations, repeats))
    cells = [(n, c) for n in points["cpu_requests"] for c in points["cpu_context"]]
    max_blocks = max(n * -(-max(1, c // n) // block_size) for n, c in cells)
    cache_shape = (max_blocks, config.num_kv_heads, block_size, config.head_dim)
    k_cache = np.full(cache_shape, 0.01, NUMPY_DTYPES[config.dtype])
    v_cache = k_cache.copy()
    cpu = []
    for n in points["cpu_requests"]:
        cpu.append(measured(f"cpu {n} requests", points["cpu_context"], lambda c: measure_cpu_decode_attention(
            config, k_cache, v_cache, n, c, repeats)))
    del k_cache, v_cache
    pool = HostKvPool(1, max(points["handoff"]), shard.num_kv_heads, block_size, config.head_dim,
                      NUMPY_DTYPES[config.dtype])
    shard_params = jax.jit(init_layer_params, static_argnums=0)(shard, jax.random.key(8))  # one device's layer
    handoff = measured("handoff", points["handoff"],
                       lambda n: measure_handoff(shard, shard_params, pool, n, iterations, repeats))
    pool.close()
    bar.close()
    return CostModel(
        model=model, machine=MachineId.current(gpu_name), dtype=config.dtype, block_size=block_size,
        num_layers=config.num_layers,
        linear=Table1D(points["linear"], linear, name="linear"),
        prefill_attention=Table1D(points["prefill"], prefill, name="prefill_attention"),
        gpu_decode_attention=Table1D([n * context_len for n in points["decode_requests"]], decode,
                                     name="gpu_decode_attention"),
        cpu_decode_attention=Table2D(points["cpu_requests"], points["cpu_context"], cpu, name="cpu_decode_attention"),
        handoff=Table1D(points["handoff"], handoff, name="handoff"))


def main(argv: list[str] | None = None) -> CostModel:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="preset name or HF checkpoint directory (as the engine gets it)")
    parser.add_argument("--dtype", default=None, choices=SUPPORTED_DTYPES, help="default: the model's")
    parser.add_argument("--block-size", type=positive_int, default=16)
    parser.add_argument("--context-len", type=positive_int, default=1024,
                        help="per-request context of the decode-attention points")
    parser.add_argument("--quick", action="store_true", help="a few small points (CPU smoke runs)")
    parser.add_argument("--cost-table-dir", default=str(DEFAULT_COST_TABLE_DIR))
    parser.add_argument("--output", type=output_file, default=None, help="also save the table here")
    parser.add_argument("--tensor-parallel-size", type=positive_int, default=1,
                        help="devices the engine will split over")
    args = parser.parse_args(argv)
    try:
        config = get_config(args.model)
    except ValueError as error:
        option_error(parser, error)
    config = config.with_dtype(args.dtype) if args.dtype else config
    try:
        cost_model = profile(config, args.model, args.block_size, args.context_len, args.quick,
                             args.tensor_parallel_size)
    except ValueError as error:  # a tensor-parallel size the model or the machine cannot take
        option_error(parser, error)
    path = cost_model.save(cost_table_path(args.cost_table_dir, args.model, config.dtype, args.block_size,
                                           cost_model.machine))
    print(f"saved {cost_model.describe()} to {path}")
    if args.output:
        print(f"and to {cost_model.save(args.output)}")
    return cost_model


if __name__ == "__main__":
    main()
