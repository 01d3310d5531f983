"""Time the pipelined step against the GPU-only step: the per-layer handoff overhead and the CPU-GPU overlap.

Batch-0 holds `--gpu-batch` GPU-resident decodes at `--context`; batch-1 holds C host-resident decodes at the
same context, for each C of `--cpu-batches`. Per C, three figures from the same run:
  pipeline_s   the pipelined step (batch-0 on the GPU, batch-1's attention on the CPU, overlapped);
  gpu_side_s   the GPU-only step over batch-0 plus C more decode rows of one context token each (the linear
               work of batch-1 without its attention);
  cpu_side_s   layers x the CPU op's time for the C requests alone, on the host pool's own memory;
  idle_cpu_s   the pipelined step with batch-1's contexts cut to one token (same program): the GPU side of the
               pipelined step as built, with batch-1's own linear layers (a second read of the weights) and the
               handoffs, and almost no CPU work. overlap_ratio_pipelined = pipeline_s / max(idle_cpu_s, cpu_side_s),
               sides_within_20pct_pipelined compares those two.
For C >= 2 the same C requests also run split as NEO's scheduler splits them, half in batch-0's CPU share (its
attention overlapping batch-1's linear layers) and half in batch-1: split_pipeline_s, split_idle_cpu_s (both
halves cut to one token) and overlap_ratio_split = split_pipeline_s / max(split_idle_cpu_s, cpu_side_s).
handoff_us_per_layer = (the step with one host-resident decode in batch-0's CPU share - the GPU-only step of
batch-0) / layers: the start/wait cost plus whatever of that request's attention the GPU's own attention does not
hide; handoff_one_token_us_per_layer is the same with the request's context cut to one token (the start/wait
mechanism alone). batch1_overhead_us_per_layer is the first with the request in batch-1, which also pays
batch-1's own linear layers (a second read of the weights). overlap_ratio =
pipeline_s / max(gpu_side_s, cpu_side_s). Per length L of `--host-prefill-lens`, a step that prefills one
L-token prompt into the GPU pool and the same step with its KV going to the host pool (each layer's rows
stored there): host_prefill_overhead_us_per_layer is their difference / layers. Per count S of `--swap-requests`,
batch-0's step with S more requests of `--context` tokens swapped out (GPU pool -> host pool) before its layers, and
with S swapped in: swap_{out,in}_overhead_ms is the difference to the GPU-only step and swap_{out,in}_gb_per_s the
K/V bytes moved over that difference (what the engine's swap steps pay per request). The swap rows run right after
the GPU-only step, before the pipeline rows (3-5 programs each to compile), so that a run cut short keeps them.
JSON goes to stdout and --output-json after every measurement.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any, Callable

import jax
import numpy as np

from benchmark_step import GREEDY, make_chunks, profile_step
from bench_common import machine_info, output_file, positive_int, write_json
from neo_jax.batch import ScheduledChunk
from neo_jax.block_manager import BlockPool, blocks_for
from neo_jax.config import EngineConfig
from neo_jax.cpu_ops import paged_decode_attention
from neo_jax.engine import load_model
from neo_jax.kv_cache import allocate_host_kv_pool, kv_bytes_per_block
from neo_jax.model_runner import ModelRunner
from neo_jax.models.config import SUPPORTED_DTYPES
from neo_jax.pipeline_batch import KvMove, PipelineSchedule
from neo_jax.sequence import Request


def seconds_per_call(run: Callable[[], Any], iters: int) -> dict[str, float]:
    """First call (compiles) and the mean of `iters` calls, each fetching its result as the engine does."""
    start = time.perf_counter()
    np.asarray(run())
    first_call_s = time.perf_counter() - start
    np.asarray(run())
    start = time.perf_counter()
    for _ in range(iters):
        np.asarray(run())
    return {"step_s": (time.perf_counter() - start) / iters, "first_call_s": first_call_s}


def one_token_contexts(chunks: list[ScheduledChunk]) -> list[ScheduledChunk]:
    """Decodes of requests that hold only their first token, each reading the block table of its twin in `chunks`
    (same table width, so the same step program; the step overwrites the twin's first slot)."""
    twins = []
    for chunk in chunks:
        request = Request(chunk.request.request_id, chunk.request.prompt_token_ids[:1], GREEDY, seed=0)
        request.block_table = chunk.request.block_table
        twins.append(ScheduledChunk(request, 1))
    return twins


def swap_moves(gpu_pool: BlockPool, host_pool: BlockPool, num_requests: int, context: int, vocab_size: int,
               rng: np.random.Generator) -> tuple[list[KvMove], list[KvMove]]:
    """Swap-outs and swap-ins of `num_requests` requests of `context` tokens, between blocks taken from both pools
    (the GPU blocks stay taken until freed through each move's request)."""
    gpu_requests = [chunk.request for chunk in make_chunks(gpu_pool, num_requests, context, 1, vocab_size, rng)]
    host_tables = [chunk.request.block_table for chunk in make_chunks(host_pool, num_requests, context, 1,
                                                                     vocab_size, rng)]
    outs = [KvMove(request, request.block_table, table, context) for request, table in zip(gpu_requests, host_tables)]
    ins = [KvMove(request, table, request.block_table, context) for request, table in zip(gpu_requests, host_tables)]
    return outs, ins


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--dtype", default="bfloat16", choices=SUPPORTED_DTYPES)
    parser.add_argument("--gpu-batch", type=positive_int, default=64)
    parser.add_argument("--cpu-batches", type=positive_int, nargs="+", default=[1, 4, 8, 16, 64, 128, 256])
    parser.add_argument("--context", type=positive_int, default=1024)
    parser.add_argument("--block-size", type=positive_int, default=16)
    parser.add_argument("--iters", type=positive_int, default=10)
    parser.add_argument("--host-prefill-lens", type=positive_int, nargs="*", default=[1024, 2048])
    parser.add_argument("--swap-requests", type=positive_int, nargs="*", default=[1, 4])
    parser.add_argument("--profile", action="store_true", help="trace the one-request steps (device time per kernel)")
    parser.add_argument("--trace-dir", help="with --profile: keep the traces in DIR/batch1, DIR/share, "
                        "DIR/share_one_token, DIR/gpu_only and DIR/host_prefill")
    parser.add_argument("--output-json", type=output_file)
    args = parser.parse_args(argv)
    trace_dir = lambda name: args.trace_dir and os.path.join(args.trace_dir, name)

    model_config, params = load_model(args.model, args.dtype, seed=0)
    max_cpu = max(args.cpu_batches)
    blocks_per_request = blocks_for(args.context, args.block_size)
    max_prefill = max(args.host_prefill_lens, default=0)
    max_model_len = max(args.context, max_prefill)
    config = EngineConfig(model=args.model, dtype=args.dtype, block_size=args.block_size, policy="cpu-all",
                          max_num_seqs=args.gpu_batch + max_cpu, max_model_len=max_model_len,
                          max_num_batched_tokens=max(EngineConfig.max_num_batched_tokens, max_prefill))
    prefill_blocks = blocks_for(max_prefill, args.block_size)
    swap_blocks = max(args.swap_requests, default=0) * blocks_per_request
    num_gpu_blocks = (args.gpu_batch + max_cpu) * blocks_per_request + prefill_blocks + swap_blocks + 1
    host_pool = allocate_host_kv_pool(model_config, max_cpu * blocks_per_request + prefill_blocks + swap_blocks + 1,
                                      args.block_size)
    runner = ModelRunner(model_config, params, config, num_gpu_blocks, max_model_len, host_pool)
    eos, rng, layers = model_config.eos_token_ids, np.random.default_rng(0), model_config.num_layers
    vocab = model_config.vocab_size

    def packed_step(schedule: PipelineSchedule | list[ScheduledChunk]) -> Callable[[], jax.Array]:
        """The step of `schedule` (pipelined when it uses the host pool), packed once, as a call."""
        step = runner.pack(schedule, eos)
        return lambda: runner.run_packed(step)

    gpu_pool = BlockPool("gpu", num_gpu_blocks, args.block_size)
    batch0 = make_chunks(gpu_pool, args.gpu_batch, args.context, 1, vocab, rng)
    results: dict[str, Any] = {"machine": machine_info(), "model": args.model, "dtype": args.dtype,
                               "context": args.context, "gpu_batch": args.gpu_batch, "layers": layers,
                               "host_pool_pinned": bool(host_pool.pinned)}
    results["gpu_only"] = seconds_per_call(packed_step(batch0), args.iters)
    results["swap"] = []
    for num_requests in args.swap_requests:
        outs, ins = swap_moves(gpu_pool, BlockPool("cpu", host_pool.num_blocks, args.block_size), num_requests,
                               args.context, vocab, rng)
        moved_bytes = num_requests * args.context * kv_bytes_per_block(model_config, 1)  # K and V rows
        row = {"swap_requests": num_requests, "moved_bytes": moved_bytes}
        for direction, moves in (("out", outs), ("in", ins)):
            schedule = PipelineSchedule(batch0, **{f"swap_{direction}": moves})
            step_s = seconds_per_call(packed_step(schedule), args.iters)["step_s"]
            overhead_s = step_s - results["gpu_only"]["step_s"]
            row.update({f"swap_{direction}_s": step_s, f"swap_{direction}_overhead_ms": overhead_s * 1e3,
                        f"swap_{direction}_gb_per_s": moved_bytes / overhead_s / 1e9 if overhead_s > 0 else None})
        for move in outs:
            gpu_pool.free(move.request)
        results["swap"].append(row)
        print(row, flush=True)
        write_json(args.output_json, results)
    results["pipeline"] = []
    for num_cpu in args.cpu_batches:
        host_block_pool = BlockPool("cpu", host_pool.num_blocks, args.block_size)
        batch1 = make_chunks(host_block_pool, num_cpu, args.context, 1, vocab, rng)
        run_batch1 = packed_step(PipelineSchedule(batch0, batch1_cpu_chunks=batch1))
        pipeline = seconds_per_call(run_batch1, args.iters)
        extra_rows = make_chunks(BlockPool("gpu", num_gpu_blocks, args.block_size), num_cpu, 1, 1, vocab, rng)
        gpu_side = seconds_per_call(packed_step(batch0 + extra_rows), args.iters)
        q = rng.standard_normal((num_cpu, model_config.num_heads, model_config.head_dim)).astype(
            host_pool.dtype)
        tables = np.asarray([chunk.request.block_table for chunk in batch1], np.int32)
        lens = np.full(num_cpu, args.context, np.int32)
        attend = lambda: [paged_decode_attention(q, host_pool.k_cache[layer], host_pool.v_cache[layer], tables, lens)
                          for layer in range(layers)]
        cpu_side = seconds_per_call(lambda: attend()[-1], max(2, args.iters // 2))
        idle_batch1 = one_token_contexts(batch1)
        idle_cpu = seconds_per_call(packed_step(PipelineSchedule(batch0, batch1_cpu_chunks=idle_batch1)),
                                    args.iters)
        row = {"cpu_batch": num_cpu, "pipeline_s": pipeline["step_s"], "pipeline_first_call_s": pipeline["first_call_s"],
               "gpu_side_s": gpu_side["step_s"], "cpu_side_s": cpu_side["step_s"], "idle_cpu_s": idle_cpu["step_s"]}
        comparisons = [("", "pipeline_s", "gpu_side_s"), ("_pipelined", "pipeline_s", "idle_cpu_s")]
        if num_cpu >= 2:
            share, rest = batch1[:num_cpu // 2], batch1[num_cpu // 2:]
            split = PipelineSchedule(batch0, batch0_cpu_chunks=share, batch1_cpu_chunks=rest)
            idle_split = PipelineSchedule(batch0, batch0_cpu_chunks=one_token_contexts(share),
                                          batch1_cpu_chunks=one_token_contexts(rest))
            row["split_pipeline_s"] = seconds_per_call(packed_step(split), args.iters)["step_s"]
            row["split_idle_cpu_s"] = seconds_per_call(packed_step(idle_split), args.iters)["step_s"]
            comparisons.append(("_split", "split_pipeline_s", "split_idle_cpu_s"))
        for suffix, step_key, gpu_side_key in comparisons:
            sides = (row[gpu_side_key], row["cpu_side_s"])
            row["overlap_ratio" + suffix] = row[step_key] / max(sides)
            row["sides_within_20pct" + suffix] = abs(sides[0] - sides[1]) <= 0.2 * max(sides)
        if num_cpu == 1:
            run_share = packed_step(PipelineSchedule(batch0, batch0_cpu_chunks=batch1))
            row["share_pipeline_s"] = seconds_per_call(run_share, args.iters)["step_s"]
            share_one_token = PipelineSchedule(batch0, batch0_cpu_chunks=one_token_contexts(batch1))
            run_share_one_token = packed_step(share_one_token)
            row["share_one_token_pipeline_s"] = seconds_per_call(run_share_one_token, args.iters)["step_s"]
            for key, step_key in (("handoff_us_per_layer", "share_pipeline_s"),
                                  ("handoff_one_token_us_per_layer", "share_one_token_pipeline_s")):
                results[key] = (row[step_key] - results["gpu_only"]["step_s"]) / layers * 1e6
            results["batch1_overhead_us_per_layer"] = (row["pipeline_s"] - results["gpu_only"]["step_s"]) / layers * 1e6
            if args.profile:
                row["profile_batch1"] = profile_step(run_batch1, trace_dir=trace_dir("batch1"))
                row["profile_share"] = profile_step(run_share, trace_dir=trace_dir("share"))
                row["profile_share_one_token"] = profile_step(run_share_one_token,
                                                              trace_dir=trace_dir("share_one_token"))
                row["profile_gpu_only"] = profile_step(packed_step(batch0), trace_dir=trace_dir("gpu_only"))
        results["pipeline"].append(row)
        print(row, flush=True)
        write_json(args.output_json, results)
    results["host_prefill"] = []
    for length in args.host_prefill_lens:
        gpu_prefill = make_chunks(BlockPool("gpu", num_gpu_blocks, args.block_size), 1, length, length, vocab, rng)
        on_gpu = seconds_per_call(packed_step(gpu_prefill), args.iters)
        host_prefill = make_chunks(BlockPool("cpu", host_pool.num_blocks, args.block_size), 1, length, length,
                                   vocab, rng)
        run_host = packed_step(
            PipelineSchedule(host_prefill, host_prefill_ids=frozenset({host_prefill[0].request.request_id})))
        on_host = seconds_per_call(run_host, args.iters)
        row = {"prefill_len": length, "gpu_pool_s": on_gpu["step_s"], "host_pool_s": on_host["step_s"],
               "host_pool_first_call_s": on_host["first_call_s"],
               "host_prefill_overhead_us_per_layer": (on_host["step_s"] - on_gpu["step_s"]) / layers * 1e6}
        if args.profile and length == max_prefill:
            row["profile_host_prefill"] = profile_step(run_host, trace_dir=trace_dir("host_prefill"))
        results["host_prefill"].append(row)
        print({k: v for k, v in row.items() if not k.startswith("profile")}, flush=True)
        write_json(args.output_json, results)
    return results


if __name__ == "__main__":
    main()
