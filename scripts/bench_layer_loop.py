"""Time one decode step's linear layers with the layers as a `lax.scan` over stacked [L, ...] weights, the same
scan fully unrolled, and a Python loop over the per-layer weights the engine uses (see models/llama.py).

Attention is replaced by q (this measures the weights' traffic only). Writes JSON to --output-json.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from bench_common import machine_info, output_file, positive_int, write_json
from neo_jax.models import llama
from neo_jax.models.config import PRESETS


def timed(step: Callable, *args: Any, iters: int = 20) -> dict[str, float]:
    start = time.perf_counter()
    step(*args).block_until_ready()
    first_call_s = time.perf_counter() - start
    for _ in range(3):
        step(*args).block_until_ready()
    start = time.perf_counter()
    for _ in range(iters):
        out = step(*args)
    out.block_until_ready()
    return {"step_ms": (time.perf_counter() - start) / iters * 1e3, "first_call_s": first_call_s}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3-8b", choices=tuple(PRESETS))
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 256])
    parser.add_argument("--output-json", type=output_file)
    args = parser.parse_args(argv)
    config = PRESETS[args.model]
    layers = llama.init_params(config, jax.random.key(0))["layers"]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *layers)

    def layer(layer_params: llama.Params, hidden: jax.Array, positions: jax.Array) -> jax.Array:
        q, k, v = llama.pre_attention(layer_params, config, hidden, positions)
        return llama.post_attention(layer_params, config, hidden, q + (k.mean() + v.mean()).astype(q.dtype))

    def scanned(unroll: int | bool) -> Callable:
        def step(stacked, hidden, positions):
            return jax.lax.scan(lambda h, lp: (layer(lp, h, positions), None), hidden, stacked, unroll=unroll)[0]
        return jax.jit(step)

    @jax.jit
    def python_loop(layers, hidden, positions):
        for layer_params in layers:
            hidden = layer(layer_params, hidden, positions)
        return hidden

    results: dict[str, Any] = {"machine": machine_info(), "model": args.model,
                               "layer_weights_GB": sum(x.nbytes for x in jax.tree.leaves(layers)) / 1e9}
    for batch in args.batch_sizes:
        hidden = jnp.ones((batch, config.hidden_size), config.dtype)
        positions = jnp.zeros((batch,), jnp.int32)
        results[f"batch_{batch}"] = {"scan": timed(scanned(1), stacked, hidden, positions),
                                     "scan_unrolled": timed(scanned(True), stacked, hidden, positions),
                                     "python_loop": timed(python_loop, layers, hidden, positions)}
        print(batch, results[f"batch_{batch}"], flush=True)
        write_json(args.output_json, results)


if __name__ == "__main__":
    main()
