"""Tensor parallelism on JAX's CPU backend with 4 host devices: LLM.generate with tensor_parallel_size 2 and 4
equals tensor_parallel_size 1, under the GPU-only and the offload policies (the sharded pipelined step, with
host prefills, batch-0 CPU shares and swaps), the cache and weights are split over heads, bad sizes raise,
the sharded host-pool calls (store, load, CPU attention start/wait) equal the single-device calls, and programs
compiled ahead (LLMEngine.compile_ahead) serve a sharded run without another compile.

The host device count must be set before JAX initializes, and pytest's process has JAX running already, so the
sharded checks run once in a subprocess (this file run as a script) that prints their results as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from neo_jax.config import EngineConfig
from neo_jax.models.config import PRESETS, ModelConfig
from neo_jax.sharding import check_tensor_parallel_size

NUM_DEVICES = 4
# The tiny preset with heads (and kv heads) divisible by 4.
TP_MODEL = "tiny-tp"
TP_CONFIG = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=8,
                        num_kv_heads=4, head_dim=16, max_position_embeddings=256, dtype="float32")
# One prefill step for all the prompts, then decode steps of 4 rows: two step programs per engine (compiling
# dominates the test's time).
ENGINE_OPTIONS = dict(max_model_len=64, block_size=8, num_gpu_blocks=48, max_num_seqs=4, max_num_batched_tokens=64)
PROMPT_LENGTHS = (5, 17, 23, 9)


# The offload policies' pools: the GPU pool holds two of the four requests, the rest prefill to the host pool.
OFFLOAD_OPTIONS = dict(ENGINE_OPTIONS, num_gpu_blocks=8, num_cpu_blocks=24)


def generate_greedy(tensor_parallel_size: int, policy: str = "gpu-only", cost_table: str | None = None,
                    step_logits: list | None = None) -> dict:
    """Greedy outputs and facts about the engine; appends each step's logits by request id to `step_logits`."""
    import numpy as np

    from neo_jax import LLM, SamplingParams
    from neo_jax.model_runner import num_step_compilations

    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 500, size=n).tolist() for n in PROMPT_LENGTHS]
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    options = ENGINE_OPTIONS if policy == "gpu-only" else dict(OFFLOAD_OPTIONS, cost_table=cost_table)
    llm = LLM(TP_MODEL, tensor_parallel_size=tensor_parallel_size, policy=policy, **options)
    if step_logits is not None:
        runner, launch = llm.engine.runner, llm.engine.runner.launch

        def launch_and_record(schedule, eos_token_ids):
            launched = launch(schedule, eos_token_ids)
            step_logits.append(launched.logits_by_request())
            return launched

        runner.launch = launch_and_record
    outputs = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    compiled = num_step_compilations()
    again = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    runner = llm.engine.runner
    return {"outputs": outputs, "repeat_equal": again == outputs, "recompiled": num_step_compilations() - compiled,
            "scheduler_stats": vars(llm.engine.scheduler.stats),
            "cache_devices": len(runner.kv_cache.k.sharding.device_set),
            "cache_shard_shape": list(runner.kv_cache.k.addressable_shards[0].data.shape),
            "wqkv_shard_shape": list(runner.params["layers"][0]["wqkv"].addressable_shards[0].data.shape),
            "w_down_shard_shape": list(runner.params["layers"][0]["w_down"].addressable_shards[0].data.shape)}


def error_of(function) -> str:
    try:
        function()
    except ValueError as error:
        return str(error)
    return "no error"


def host_attention_matches(tensor_parallel_size: int) -> dict:
    """The sharded store / load / attention on a shard-major pool against the same calls on a plain pool."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding

    from neo_jax.cpu_ops.handoff import (
        HostKvPool, cpu_attention_start, cpu_attention_wait, host_kv_store, synchronize)
    from neo_jax.kv_cache import allocate_host_kv_pool
    from neo_jax.sharded_host_attention import (
        pool_by_layer, sharded_cpu_attention_start, sharded_cpu_attention_wait,
        sharded_host_kv_load, sharded_host_kv_store)
    from neo_jax.sharding import HEADS_SPEC, make_mesh

    c, layer, num_blocks, block_size = TP_CONFIG, 1, 12, 8
    mesh = make_mesh(tensor_parallel_size)
    heads = NamedSharding(mesh, HEADS_SPEC)
    sharded_pool = allocate_host_kv_pool(c, num_blocks, block_size, tensor_parallel_size)
    plain_pool = HostKvPool(c.num_layers, num_blocks, c.num_kv_heads, block_size, c.head_dim, np.float32)
    rng = np.random.default_rng(tensor_parallel_size)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    # Three requests: blocks (1, 2), (3,), (4, 5, 6); contexts of 12, 5 and 20 tokens, the last one new.
    tables = np.array([[1, 2, 0], [3, 0, 0], [4, 5, 6]], np.int32)
    lens = np.array([12, 5, 20], np.int32)
    context_slots = np.concatenate([tables[r, p // block_size] * block_size + p % block_size
                                    for r, n in enumerate(lens) for p in [np.arange(n - 1)]])
    k_context, v_context = normal(len(context_slots), c.num_kv_heads, c.head_dim), normal(
        len(context_slots), c.num_kv_heads, c.head_dim)
    new_slots = tables[np.arange(3), (lens - 1) // block_size] * block_size + (lens - 1) % block_size
    q, k_new, v_new = normal(3, c.num_heads, c.head_dim), normal(3, c.num_kv_heads, c.head_dim), normal(
        3, c.num_kv_heads, c.head_dim)

    @jax.jit
    def sharded(q, k_new, v_new, k_context, v_context):
        stored = sharded_host_kv_store(sharded_pool, mesh, k_context, v_context, layer, context_slots)
        k_loaded, v_loaded = sharded_host_kv_load(sharded_pool, mesh, layer, context_slots, stored)
        pending = sharded_cpu_attention_start(sharded_pool, mesh, q, k_new, v_new, layer, new_slots, tables, lens,
                                              dep=stored)
        return (sharded_cpu_attention_wait(pending, jnp.tanh(k_context), mesh, dep_spec=HEADS_SPEC),
                k_loaded, v_loaded)

    @jax.jit
    def plain(q, k_new, v_new, k_context, v_context):
        stored = host_kv_store(plain_pool, k_context, v_context, layer, context_slots)
        pending = cpu_attention_start(plain_pool, q, k_new, v_new, layer, new_slots, tables, lens, dep=stored)
        return cpu_attention_wait(pending, k_context)

    inputs = [jax.device_put(x, heads) for x in (q, k_new, v_new, k_context, v_context)]
    out, k_loaded, v_loaded = sharded(*inputs)
    expected = plain(q, k_new, v_new, k_context, v_context)
    jax.block_until_ready((out, expected))
    synchronize()  # on GPUs the CPU may still be writing the pools
    return {"attention_max_error": float(np.abs(np.asarray(out) - np.asarray(expected)).max()),
            "attention_output_sharded": len(out.sharding.device_set) == tensor_parallel_size,
            "loaded_equal": bool(np.array_equal(k_loaded, k_context) and np.array_equal(v_loaded, v_context)),
            "pools_equal": bool(np.array_equal(pool_by_layer(sharded_pool.k_cache, tensor_parallel_size),
                                               plain_pool.k_cache)
                                and np.array_equal(pool_by_layer(sharded_pool.v_cache, tensor_parallel_size),
                                                   plain_pool.v_cache))}


def sharded_params_equal(tensor_parallel_size: int) -> bool:
    """init_sharded_params and shard_params(init_params) give init_params's values."""
    import jax
    import numpy as np

    from neo_jax.models import llama
    from neo_jax.sharding import init_sharded_params, make_mesh, shard_params

    mesh, key = make_mesh(tensor_parallel_size), jax.random.key(3)
    single = llama.init_params(TP_CONFIG, key)
    candidates = (init_sharded_params(TP_CONFIG, key, mesh), shard_params(single, TP_CONFIG, mesh))
    return all(len(leaf.sharding.device_set) == tensor_parallel_size and np.array_equal(leaf, expected)
               for params in candidates for leaf, expected in zip(jax.tree.leaves(params), jax.tree.leaves(single)))


def profile_over_shards(tensor_parallel_size: int) -> dict:
    """scripts/profile.py --quick over `tensor_parallel_size` devices, and whether a tensor-parallel engine of that
    size finds the table it wrote (by model, dtype, block size and "<device> xN")."""
    import importlib.util
    import pathlib
    import tempfile
    import warnings

    import jax

    from neo_jax.cost_model import MachineId, gpu_side_name, load_cost_model

    path = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "profile.py"
    spec = importlib.util.spec_from_file_location("script_profile", path)  # not the standard library's profile
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with tempfile.TemporaryDirectory() as directory:
        table = script.main(["--model", TP_MODEL, "--quick", "--block-size", "8", "--context-len", "32",
                             "--tensor-parallel-size", str(tensor_parallel_size), "--cost-table-dir", directory])
        machine = MachineId.current(gpu_side_name(jax.devices()[0].device_kind, tensor_parallel_size))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            found = load_cost_model(TP_CONFIG, model=TP_MODEL, machine=machine, block_size=8, directory=directory)
    return {"gpu_name": table.machine.gpu_name, "found": found == table,
            "all_timed": all(t > 0 for t in table.linear.seconds + table.gpu_decode_attention.seconds)}


def max_logit_error(expected: list[dict], actual: list[dict]) -> float:
    """The largest difference between two runs' logits, step by step and request by request (inf when the steps
    or their requests differ)."""
    import numpy as np

    if [step.keys() for step in expected] != [step.keys() for step in actual]:
        return float("inf")
    return max(float(np.abs(step[request] - other[request]).max())
               for step, other in zip(expected, actual) for request in step)


def compile_ahead_then_run(tensor_parallel_size: int, cost_table: str) -> dict:
    """LLMEngine.compile_ahead on a sharded cpu-all engine (sizes no other check uses), then the same workload."""
    import numpy as np

    from neo_jax import SamplingParams
    from neo_jax.engine import LLMEngine
    from neo_jax.model_runner import num_step_compilations, num_xla_compilations

    engine = LLMEngine(EngineConfig(TP_MODEL, tensor_parallel_size=tensor_parallel_size, policy="cpu-all",
                                    cost_table=cost_table, **dict(OFFLOAD_OPTIONS, max_num_seqs=3)))
    rng = np.random.default_rng(1)
    requests = [(rng.integers(3, 500, size=n).tolist(), SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
                for n in PROMPT_LENGTHS]
    programs = engine.compile_ahead(requests, max_workers=2)
    steps, xla = num_step_compilations(), num_xla_compilations()
    for prompt, params in requests:
        engine.add_request(prompt, params)
    while engine.has_unfinished_requests():
        engine.step()
    return {"programs": programs, "step_compilations": num_step_compilations() - steps,
            "xla_compilations": num_xla_compilations() - xla,
            "pipelined_steps": engine.scheduler.stats.num_pipelined_steps}


def run_sharded_checks() -> dict:
    import pathlib
    import tempfile

    from test_pipeline import cost_table  # this file runs as a script, from its own directory

    from neo_jax import LLM

    PRESETS[TP_MODEL] = TP_CONFIG
    results = {f"generate_tp{n}": generate_greedy(n) for n in (1, 2, 4)}
    with tempfile.TemporaryDirectory() as directory:
        # A CPU that attends 100x faster than the GPU's linear layers: "neo" hands decodes to both batches.
        fast_cpu = cost_table(pathlib.Path(directory), cpu_ms_per_1k_tokens=0.01)
        for policy, sizes in (("cpu-all", (2, 4)), ("neo", (2,))):
            # The schedule does not depend on the device count, so every step's logits can be compared.
            single_logits = []
            generate_greedy(1, policy, fast_cpu, single_logits)
            for n in sizes:
                sharded_logits = []
                results[f"{policy}_tp{n}"] = generate_greedy(n, policy, fast_cpu, sharded_logits)
                results[f"{policy}_tp{n}"]["max_logit_error"] = max_logit_error(single_logits, sharded_logits)
        results["compile_ahead_tp2"] = compile_ahead_then_run(2, fast_cpu)
    results.update({f"params_tp{n}": sharded_params_equal(n) for n in (2, 4)})
    results.update({f"host_tp{n}": host_attention_matches(n) for n in (2, 4)})
    results["profile_tp2"] = profile_over_shards(2)
    results["error_tp3"] = error_of(lambda: LLM(TP_MODEL, tensor_parallel_size=3, **ENGINE_OPTIONS))
    results["error_tp8"] = error_of(lambda: LLM(TP_MODEL, tensor_parallel_size=8, **ENGINE_OPTIONS))
    return results


@pytest.fixture(scope="module")
def sharded_results() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={NUM_DEVICES}")
    process = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    if process.returncode != 0:
        pytest.fail(f"sharded checks failed:\n{process.stderr[-4000:]}")
    return json.loads(process.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("tensor_parallel_size", [2, 4])
def test_greedy_outputs_equal_single_device(sharded_results, tensor_parallel_size):
    single = sharded_results["generate_tp1"]
    sharded = sharded_results[f"generate_tp{tensor_parallel_size}"]
    assert [len(tokens) for tokens in single["outputs"]] == [10] * len(PROMPT_LENGTHS)
    assert sharded["outputs"] == single["outputs"]
    assert sharded["repeat_equal"] and sharded["recompiled"] == 0


@pytest.mark.parametrize("run, expected_events", [
    ("cpu-all_tp2", ("num_pipelined_steps",)),
    ("cpu-all_tp4", ("num_pipelined_steps",)),
    ("neo_tp2", ("num_pipelined_steps", "num_swap_out")),
])
def test_offload_policies_under_tensor_parallelism_equal_single_device(sharded_results, run, expected_events):
    result = sharded_results[run]
    assert result["outputs"] == sharded_results["generate_tp1"]["outputs"]
    assert result["max_logit_error"] < 1e-5  # against the same policy on one device, every step
    assert result["repeat_equal"]
    for event in expected_events:  # the sharded pipelined step did run, with the placements this case is for
        assert result["scheduler_stats"][event] > 0, (event, result["scheduler_stats"])


def test_compile_ahead_under_tensor_parallelism_leaves_nothing_to_compile(sharded_results):
    result = sharded_results["compile_ahead_tp2"]
    assert result["programs"] > 1 and result["pipelined_steps"] > 0
    assert result["step_compilations"] == result["xla_compilations"] == 0


@pytest.mark.parametrize("tensor_parallel_size", [1, 2, 4])
def test_cache_and_weights_split_over_heads(sharded_results, tensor_parallel_size):
    result = sharded_results[f"generate_tp{tensor_parallel_size}"]
    c = TP_CONFIG
    assert result["cache_devices"] == tensor_parallel_size
    assert result["cache_shard_shape"] == [c.num_layers, 48, c.num_kv_heads // tensor_parallel_size, 8, c.head_dim]
    assert result["wqkv_shard_shape"] == [c.hidden_size,
                                          (c.num_heads + 2 * c.num_kv_heads) * c.head_dim // tensor_parallel_size]
    assert result["w_down_shard_shape"] == [c.intermediate_size // tensor_parallel_size, c.hidden_size]


def test_profile_over_shards_writes_the_table_a_tensor_parallel_engine_finds(sharded_results):
    result = sharded_results["profile_tp2"]
    assert result["gpu_name"].endswith(" x2") and result["found"] and result["all_timed"]


@pytest.mark.parametrize("tensor_parallel_size", [2, 4])
def test_sharded_params_equal_single_device_params(sharded_results, tensor_parallel_size):
    assert sharded_results[f"params_tp{tensor_parallel_size}"]


@pytest.mark.parametrize("tensor_parallel_size", [2, 4])
def test_sharded_host_pool_calls_equal_single_device_calls(sharded_results, tensor_parallel_size):
    result = sharded_results[f"host_tp{tensor_parallel_size}"]
    assert result["attention_max_error"] < 1e-5
    assert result["attention_output_sharded"] and result["loaded_equal"] and result["pools_equal"]


def test_bad_tensor_parallel_sizes_raise(sharded_results):
    assert "tensor_parallel_size: 3 does not divide the model's num_kv_heads (4)" in sharded_results["error_tp3"]
    assert "tensor_parallel_size: 8 exceeds the 4 devices" in sharded_results["error_tp8"]
    with pytest.raises(ValueError, match="tensor_parallel_size: must be a positive integer"):
        EngineConfig(model="tiny", tensor_parallel_size=0)
    with pytest.raises(ValueError, match="tensor_parallel_size: 4 does not divide the model's num_kv_heads"):
        check_tensor_parallel_size(PRESETS["tiny"], 4)


if __name__ == "__main__":
    print(json.dumps(run_sharded_checks()))
