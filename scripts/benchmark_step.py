"""Time the engine's jitted step: decode batches at a fixed context, and a long prefill, with a HBM roofline.

For each decode batch size the step is packed by the engine's own code (requests whose KV already holds
`--context` - 1 tokens, one new token each) and run repeatedly; the roofline of a step is the bytes it must
read (the weights, less the embedding table of which it gathers a few rows, plus the K/V of every context
token) over the copy bandwidth measured in the same run. Prefill: one `--prefill-len`-token prompt per step.
With --check, first compares the engine's greedy tokens with full-recompute greedy decoding (llama.forward) on
the tiny preset. JSON goes to stdout and --output-json; partial results are written after every measurement.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import glob
import os
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from bench_common import (
    machine_info, nonnegative_int, output_file, positive_float, positive_int, write_json,
)
from neo_jax.batch import ScheduledChunk, pack_step
from neo_jax.block_manager import BlockPool, blocks_for
from neo_jax.config import EngineConfig
from neo_jax.engine import LLMEngine, load_model
from neo_jax.kv_cache import kv_bytes_per_block
from neo_jax.model_runner import ModelRunner
from neo_jax.models import llama
from neo_jax.models.config import PRESETS, SUPPORTED_DTYPES
from neo_jax.sampler import pack_sampling
from neo_jax.sampling_params import SamplingParams
from neo_jax.sequence import Request

GREEDY = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)


def copy_bandwidth(num_bytes: int = 4 * 2**30, repeats: int = 10) -> float:
    """Bytes read + written per second by an elementwise op over a large bf16 array."""
    x = jnp.ones((num_bytes // 2,), jnp.bfloat16)
    add_one = jax.jit(lambda a: a + 1)
    add_one(x).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        x = add_one(x)
    x.block_until_ready()
    return 2 * num_bytes * repeats / (time.perf_counter() - start)


def make_chunks(pool: BlockPool, num_requests: int, context: int, num_tokens: int, vocab_size: int,
                rng: np.random.Generator) -> list[ScheduledChunk]:
    """Requests of `context` tokens whose last `num_tokens` are computed this step."""
    chunks = []
    for request_id in range(num_requests):
        request = Request(request_id, rng.integers(3, vocab_size, size=context).tolist(), GREEDY, seed=0)
        request.num_computed_tokens = context - num_tokens
        pool.grow(request, context)
        chunks.append(ScheduledChunk(request, num_tokens))
    return chunks


def time_step(runner: ModelRunner, chunks: list[ScheduledChunk], eos: tuple[int, ...], iters: int) -> dict[str, float]:
    """Mean seconds per step: fetching the tokens each time (as the engine does) and back to back."""
    start = time.perf_counter()
    batch, rows = pack_step(chunks, runner.block_size, runner.buckets)
    sampling = pack_sampling(rows, eos)
    pack_s = time.perf_counter() - start
    start = time.perf_counter()
    np.asarray(runner.run(batch, sampling))
    compile_s = time.perf_counter() - start
    np.asarray(runner.run(batch, sampling))
    start = time.perf_counter()
    for _ in range(iters):
        np.asarray(runner.run(batch, sampling))
    synced_s = (time.perf_counter() - start) / iters
    start = time.perf_counter()
    for _ in range(iters):
        tokens = runner.run(batch, sampling)
    tokens.block_until_ready()
    pipelined_s = (time.perf_counter() - start) / iters
    return {"step_s": synced_s, "step_back_to_back_s": pipelined_s, "pack_s": pack_s, "first_call_s": compile_s}


def step_timeline(intervals: list[tuple[int, int]], steps: int) -> dict[str, float]:
    """From the device events, (start, end) in ns, of `steps` calls of one step program: the median per step of
    the span from its first event's start to its last event's end, and of the time some event ran; the difference
    is device time left idle inside the step. Each call runs the same events, so their count splits the steps."""
    if not intervals or len(intervals) % steps:
        return {}
    ordered = sorted(intervals)
    per_step = len(ordered) // steps
    spans, busy = [], []
    for first in range(0, len(ordered), per_step):
        step = ordered[first:first + per_step]
        covered, reach = 0, step[0][0]
        for start, end in step:
            covered += max(0, end - max(start, reach))
            reach = max(reach, end)
        spans.append(reach - step[0][0])
        busy.append(covered)
    return {"device_span_us": float(np.median(spans)) / 1e3, "device_busy_us": float(np.median(busy)) / 1e3}


def profile_step(run: Callable[[], jax.Array], steps: int = 3, top: int = 30,
                 trace_dir: str | None = None) -> dict[str, Any]:
    """Device time per step from a jax.profiler trace of `steps` calls of `run` (one step each, compiled
    already): per timeline line (GPU streams, XLA ops) and the `top` kernels by time, to see where a step's
    time goes, the first device's `step_timeline`, and the `top` host events (where the device idles because
    the host enqueues its work too slowly). The trace is kept in `trace_dir` when given (for
    TensorBoard / XProf), else deleted."""
    with contextlib.ExitStack() as stack:
        directory = trace_dir or stack.enter_context(tempfile.TemporaryDirectory())
        with jax.profiler.trace(directory):
            for _ in range(steps):
                np.asarray(run())
        traces = glob.glob(f"{directory}/**/*.xplane.pb", recursive=True)
        data = jax.profiler.ProfileData.from_file(max(traces, key=os.path.getmtime))  # a kept dir may hold older ones
    devices = sorted((plane for plane in data.planes if plane.name.startswith("/device:")), key=lambda p: p.name)
    device_lines = [line for plane in devices for line in plane.lines]
    # Host threads' events without the Python tracer's ("$file:line name"): on a GPU, the time the thread that
    # runs XLA's thunks spends enqueueing each kernel, copy and custom call.
    host_lines = [line for plane in data.planes if plane.name.startswith("/host:") for line in plane.lines
                  if line.name != "python"]
    line_us = {line.name: sum(event.duration_ns for event in line.events) / 1e3 / steps for line in device_lines}
    first_device = [(event.start_ns, event.start_ns + event.duration_ns)
                    for plane in devices[:1] for line in plane.lines for event in line.events]
    return {"steps": steps, **step_timeline(first_device, steps), "us_per_step_by_line": line_us,
            "top_events": top_events(device_lines, steps, top),
            "top_host_events": top_events(host_lines, steps, top, skip_prefix="$")}


def top_events(lines: list[Any], steps: int, top: int, skip_prefix: str | None = None) -> list[dict[str, Any]]:
    """The `top` (line, event name) pairs of trace lines by time per step, with their calls per step."""
    event_us: dict[tuple[str, str], float] = collections.Counter()
    event_calls: dict[tuple[str, str], int] = collections.Counter()
    for line in lines:
        for event in line.events:
            if skip_prefix and event.name.startswith(skip_prefix):
                continue
            event_us[line.name, event.name] += event.duration_ns / 1e3 / steps
            event_calls[line.name, event.name] += 1
    return [{"line": line, "name": name[:200], "us_per_step": us, "calls_per_step": event_calls[line, name] / steps}
            for (line, name), us in event_us.most_common(top)]


def weight_bytes_read(params: llama.Params, config: Any) -> int:
    """All parameters but the embedding table (a step gathers only its tokens' rows), unless tied."""
    total = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(params))
    embed = params["embed"]
    return total if config.tie_word_embeddings else total - embed.size * embed.dtype.itemsize


def check_against_forward(num_tokens: int = 8) -> dict[str, Any]:
    """Engine greedy tokens (paged decode kernel, chunked prefill) vs the full causal forward, teacher-forced.

    One batched `llama.forward` over each prompt + the engine's tokens (right-padded, which causal attention
    ignores): every engine token must be the argmax after its prefix, which by induction equals full-recompute
    greedy decoding. The tiny preset with head_dim 64 (a size the CUDA decode kernel takes), float32, highest
    matmul precision.
    """
    model_config = dataclasses.replace(PRESETS["tiny"], hidden_size=256, head_dim=64)
    with jax.default_matmul_precision("highest"):
        engine = LLMEngine(EngineConfig(model="tiny", max_model_len=256, num_gpu_blocks=64, max_num_seqs=8,
                                        max_num_batched_tokens=32),
                           model=(model_config, llama.init_params(model_config, jax.random.key(0))))
        rng = np.random.default_rng(0)
        prompts = [rng.integers(3, 500, size=n).tolist() for n in (5, 40, 17, 3)]
        requests = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=num_tokens, ignore_eos=True))
                    for p in prompts]
        while engine.has_unfinished_requests():
            engine.step()
        sequences = [prompt + request.output_token_ids for prompt, request in zip(prompts, requests)]
        padded = np.zeros((len(sequences), max(map(len, sequences))), np.int32)
        for row, ids in enumerate(sequences):
            padded[row, :len(ids)] = ids
        greedy = np.asarray(jnp.argmax(llama.forward(engine.runner.params, engine.model_config, padded), -1))
    matches = [greedy[row, len(prompt) - 1:len(prompt) - 1 + num_tokens].tolist() == request.output_token_ids
               for row, (prompt, request) in enumerate(zip(prompts, requests))]
    return {"greedy_matches_forward": matches, "ok": all(matches)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--dtype", default="bfloat16", choices=SUPPORTED_DTYPES)
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[256, 1, 16, 64])
    parser.add_argument("--context", type=positive_int, default=1024)
    parser.add_argument("--prefill-len", type=nonnegative_int, default=2048, help="0 skips the prefill timing")
    parser.add_argument("--block-size", type=positive_int, default=16)
    parser.add_argument("--iters", type=positive_int, default=10)
    parser.add_argument("--copy-gb", type=positive_float, default=4.0, help="size of the bandwidth probe's array, GiB")
    parser.add_argument("--check", action="store_true", help="first check greedy tokens on the tiny preset")
    parser.add_argument("--profile-batch", type=nonnegative_int, default=0,
                        help="also trace the decode step at this batch size (one of --batch-sizes); 0: none")
    parser.add_argument("--trace-dir", help="keep the --profile-batch trace in this directory")
    parser.add_argument("--output-json", type=output_file)
    args = parser.parse_args(argv)
    if args.profile_batch and args.profile_batch not in args.batch_sizes:
        parser.error(f"--profile-batch: {args.profile_batch} is not one of --batch-sizes {args.batch_sizes}")

    results: dict[str, Any] = {"machine": machine_info(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
                               "model": args.model, "dtype": args.dtype, "context": args.context,
                               "block_size": args.block_size}
    if args.check:
        results["check"] = check_against_forward()
        write_json(args.output_json, results)
    results["copy_bandwidth_GBps"] = copy_bandwidth(int(args.copy_gb * 2**30)) / 1e9
    start = time.perf_counter()
    model_config, params = load_model(args.model, args.dtype, seed=0)
    jax.block_until_ready(params)
    results["random_init_s"] = time.perf_counter() - start  # on the device, compilation included (issue 2)
    max_batch = max(args.batch_sizes)
    max_model_len = max(args.context, args.prefill_len)
    config = EngineConfig(model=args.model, dtype=args.dtype, block_size=args.block_size, max_num_seqs=max_batch,
                          max_num_batched_tokens=max(args.prefill_len, 16), max_model_len=max_model_len)
    num_blocks = max_batch * blocks_for(args.context, args.block_size) + blocks_for(args.prefill_len,
                                                                                   args.block_size) + 1
    runner = ModelRunner(model_config, params, config, num_blocks, max_model_len)
    eos = model_config.eos_token_ids
    weights = weight_bytes_read(params, model_config)
    per_token_kv = kv_bytes_per_block(model_config, args.block_size) // args.block_size
    rng = np.random.default_rng(0)
    results["weights_read_GB"] = weights / 1e9
    results["decode"] = []
    for batch_size in args.batch_sizes:
        pool = BlockPool("gpu", num_blocks, args.block_size)
        timing = time_step(runner, make_chunks(pool, batch_size, args.context, 1, model_config.vocab_size, rng),
                           eos, args.iters)
        roofline_s = (weights + batch_size * args.context * per_token_kv) / (results["copy_bandwidth_GBps"] * 1e9)
        results["decode"].append({"batch_size": batch_size, **timing, "tokens_per_s": batch_size / timing["step_s"],
                                  "roofline_s": roofline_s, "fraction_of_roofline": roofline_s / timing["step_s"]})
        print(results["decode"][-1], flush=True)
        if batch_size == args.profile_batch:
            pool = BlockPool("gpu", num_blocks, args.block_size)
            chunks = make_chunks(pool, batch_size, args.context, 1, model_config.vocab_size, rng)
            batch, rows = pack_step(chunks, runner.block_size, runner.buckets)
            sampling = pack_sampling(rows, eos)
            np.asarray(runner.run(batch, sampling))
            results["decode"][-1]["profile"] = profile_step(lambda: runner.run(batch, sampling),
                                                            trace_dir=args.trace_dir)
        write_json(args.output_json, results)
    if args.prefill_len == 0:
        return
    pool = BlockPool("gpu", num_blocks, args.block_size)
    chunks = make_chunks(pool, 1, args.prefill_len, args.prefill_len, model_config.vocab_size, rng)
    timing = time_step(runner, chunks, eos, max(2, args.iters // 3))
    results["prefill"] = {"prompt_len": args.prefill_len, **timing, "tokens_per_s": args.prefill_len / timing["step_s"]}
    write_json(args.output_json, results)


if __name__ == "__main__":
    main()
