"""scripts/simulate_schedule.py replays a workload through the scheduler alone: its step counts must be the
engine's own for the same workload and cost table (benchmark_throughput.py on the tiny preset, CPU backend)."""

from __future__ import annotations

import json

import pytest

from neo_jax.cost_model import CostModel, MachineId
from neo_jax.cost_tables import Table1D, Table2D

MS = 1e-3
WORKLOAD = ["--model", "tiny", "--max-model-len", "64", "--max-num-seqs", "6", "--max-num-batched-tokens", "32",
            "--block-size", "4", "--num-prompts", "8", "--input-len", "24", "--output-len", "6", "--range-ratio",
            "0.3", "--policy", "neo"]


@pytest.fixture
def cost_table(tmp_path) -> str:
    """Slow linear layers and fast CPU attention, so that neo pipelines some steps of the tiny workload."""
    model = CostModel(
        model="tiny", machine=MachineId("test", 1, "test"), dtype="float32", block_size=4, num_layers=2,
        linear=Table1D((1, 1000), (1 * MS, 2 * MS)), prefill_attention=Table1D((0, 1000), (0.0, 1 * MS)),
        gpu_decode_attention=Table1D((0, 1000), (0.0, 0.2 * MS)),
        cpu_decode_attention=Table2D((1, 100), (0, 1000), ((0.0, 0.01 * MS), (0.0, 0.01 * MS))),
        handoff=Table1D((1,), (0.0,)))
    return str(model.save(tmp_path / "cost.json"))


def test_simulation_schedules_the_engines_steps(load_script, cost_table, tmp_path):
    # 8 requests of ~24 + 6 tokens; a GPU pool of 7 blocks of 4 tokens (4 KiB each) holds about one of them
    pools = ["--gpu-kv-cache-gb", "0.00003", "--cpu-kv-cache-gb", "0.001", "--cost-table", cost_table]
    simulated = load_script("simulate_schedule").main(WORKLOAD + pools)
    output = tmp_path / "throughput.json"
    load_script("benchmark_throughput").main(WORKLOAD + pools + ["--bandwidth-probe-mb", "16", "--warmup", "compile",
                                                                  "--output-json", str(output)])
    engine_counters = json.loads(output.read_text())["bandwidth_bound"]["counters"]
    assert simulated["counters"] == engine_counters
    assert simulated["steps_by_kind"].get("pipelined", 0) > 0 and simulated["steps"] == engine_counters["num_steps"]


def test_a_request_rate_spaces_the_arrivals_on_the_predicted_clock(load_script, cost_table):
    """At 0.01 requests/s each request (a few ms of predicted steps) is alone in the engine: one prefill step and a
    decode per further token. Sent at once, the 8 requests outgrow the GPU pool and swap; one by one, never."""
    pools = ["--gpu-kv-cache-gb", "0.0001", "--cpu-kv-cache-gb", "0.001", "--cost-table", cost_table]
    at_once = load_script("simulate_schedule").main(WORKLOAD + pools + ["--max-num-seqs", "8"])
    spaced = load_script("simulate_schedule").main(WORKLOAD + pools + ["--max-num-seqs", "8", "--request-rate", "0.01"])
    assert at_once["request_rate"] is None and spaced["request_rate"] == 0.01
    assert at_once["steps"] < at_once["output_tokens"] == spaced["output_tokens"]
    assert at_once["counters"]["num_swap_out"] > 0
    assert spaced["steps_by_kind"] == {"gpu": spaced["output_tokens"]}
    assert spaced["counters"]["num_preemptions"] == spaced["counters"]["num_swap_out"] == 0


def test_a_policy_without_a_cost_table_is_refused(load_script):
    with pytest.raises(SystemExit):
        load_script("simulate_schedule").main(WORKLOAD)


def test_results_go_to_output_json_with_the_setting(load_script, cost_table, tmp_path):
    pools = ["--gpu-kv-cache-gb", "0.0001", "--cpu-kv-cache-gb", "0.001", "--cost-table", cost_table]
    output = tmp_path / "new" / "simulated.json"
    simulated = load_script("simulate_schedule").main(WORKLOAD + pools + ["--scenario", "tiny pools",
                                                                          "--output-json", str(output)])
    written = json.loads(output.read_text())
    assert written["counters"] == simulated["counters"] and written["steps"] == simulated["steps"] > 0
    assert written["scenario"] == "tiny pools" and written["policy"] == "neo"
    assert written["args"]["cost_table"] == cost_table


def test_output_tokens_are_those_the_requests_produce_under_max_model_len(load_script, cost_table):
    """8 prompts of 24 tokens asking for 6: max_model_len 27 stops each after 3, as the engine does."""
    pools = ["--gpu-kv-cache-gb", "0.0001", "--cpu-kv-cache-gb", "0.001", "--cost-table", cost_table]
    simulated = load_script("simulate_schedule").main(WORKLOAD + pools + ["--range-ratio", "0",
                                                                          "--max-model-len", "27"])
    assert simulated["output_tokens"] == 8 * 3
    assert simulated["predicted_output_tokens_per_s"] == pytest.approx(24 / simulated["predicted_seconds"])


def test_a_prompt_the_engine_rejects_is_an_error(load_script, cost_table, capsys):
    """Prompts of 24 +- 30% tokens (29 the longest drawn) with max_model_len 28: the engine would reject it."""
    with pytest.raises(SystemExit) as exit_info:
        load_script("simulate_schedule").main(WORKLOAD + ["--cost-table", cost_table, "--max-model-len", "28"])
    assert exit_info.value.code == 2
    assert "argument --input-len: a prompt of 29 tokens is longer than max_model_len=28" in capsys.readouterr().err


def test_the_tensor_parallel_size_splits_each_block_over_the_devices(load_script, cost_table):
    """Each device holds 1/N of a block's KV heads: the same GPU budget holds N times the blocks."""
    pools = ["--gpu-kv-cache-gb", "0.0001", "--cpu-kv-cache-gb", "0.001", "--cost-table", cost_table]
    one = load_script("simulate_schedule").main(WORKLOAD + pools)
    two = load_script("simulate_schedule").main(WORKLOAD + pools + ["--tensor-parallel-size", "2"])
    assert two["num_gpu_blocks"] >= 2 * one["num_gpu_blocks"] and two["num_cpu_blocks"] == one["num_cpu_blocks"]
