"""What the benchmark scripts share: engine options on the command line, the machine and commit, JSON out."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from typing import Any

import jax

from neo_jax.config import EngineConfig
from neo_jax.engine import LLMEngine


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny", help="preset name or HF checkpoint directory")
    parser.add_argument("--dtype", default=None, help="bfloat16 | float16 | float32 (default: the model's)")
    parser.add_argument("--policy", default="gpu-only")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--gpu-kv-cache-gb", type=float, default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs the weights and KV cache split over")
    parser.add_argument("--output-json", default=None, help="write the results here")


def engine_from_args(args: argparse.Namespace, **overrides: Any) -> LLMEngine:
    options = dict(model=args.model, dtype=args.dtype, policy=args.policy, max_model_len=args.max_model_len,
                   gpu_kv_cache_gb=args.gpu_kv_cache_gb, gpu_memory_utilization=args.gpu_memory_utilization,
                   max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                   block_size=args.block_size, seed=args.seed, tensor_parallel_size=args.tensor_parallel_size)
    options.update(overrides)
    return LLMEngine(EngineConfig(**options))


def machine_info() -> dict[str, Any]:
    """The accelerator, the host CPU and the commit, for the JSON of every benchmark."""
    cpu_model = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu_model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                             cpu_model)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    device = jax.devices()[0]
    return {"device": f"{device.platform}:{device.device_kind}", "num_devices": jax.device_count(),
            "cpu": cpu_model, "cpu_count": os.cpu_count(), "jax": jax.__version__, "commit": commit,
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}


def write_json(path: str | None, results: dict[str, Any]) -> None:
    print(json.dumps(results, indent=2))
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
