"""The throughput and serving benchmarks on the tiny preset (CPU backend), their bandwidth bound, and the plots
made from their JSON."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from neo_jax import model_runner
from neo_jax.config import EngineConfig
from neo_jax.engine import LLMEngine

# Small enough that both benchmarks compile the same few step shapes.
ENGINE_ARGS = ["--model", "tiny", "--max-model-len", "64", "--max-num-seqs", "2", "--max-num-batched-tokens", "16",
               "--num-prompts", "2", "--input-len", "16", "--output-len", "3", "--bandwidth-probe-mb", "16"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def results(load_script, tmp_path_factory: pytest.TempPathFactory) -> dict:
    directory = tmp_path_factory.mktemp("bench")
    load_script("benchmark_throughput").main(
        ENGINE_ARGS + ["--output-json", str(directory / "throughput.json")])
    load_script("benchmark_serving").main(  # into a directory that the script makes
        ENGINE_ARGS + ["--request-rate", "100", "inf", "--output-json", str(directory / "new" / "serving.json")])
    texts = {"throughput": (directory / "throughput.json").read_text(),
             "serving": (directory / "new" / "serving.json").read_text()}
    return {name: json.loads(text, parse_constant=refuse_non_standard_json) for name, text in texts.items()}


def refuse_non_standard_json(constant: str) -> None:
    raise AssertionError(f"{constant} is not standard JSON")


def check_bound(bound: dict, num_steps: int) -> None:
    counters = bound["counters"]
    assert counters["num_steps"] == num_steps > 0
    assert counters["gpu_kv_tokens_read"] > 0 and counters["cpu_kv_tokens_read"] == 0
    assert bound["host_read_gb_per_s"] > 0 and bound["cpu_read_fraction"] == 0.0
    host_mb_per_step = bound["host_read_gb_per_s"] * 1e3 * bound["mean_step_ms"] / 1e3
    assert bound["bound"] == pytest.approx(1 + host_mb_per_step / bound["gpu_kv_mb_per_step"])
    assert 0 < bound["median_step_ms"] <= bound["max_step_ms"]
    phases = bound["median_phase_ms"]
    assert list(phases) == ["schedule_ms", "pack_ms", "launch_ms", "device_wait_ms", "book_ms"]
    assert all(ms >= 0 for ms in phases.values()) and 0 < phases["launch_ms"] <= bound["max_step_ms"]
    assert bound["mean_step_ms"] <= bound["max_step_ms"]
    assert bound["step_compilations"] == 0  # the untimed replay compiled every shape of the timed run
    assert bound["xla_compilations"] == 0     # nor did anything else compile in the timed run
    kinds = bound["seconds_by_step_kind"]
    assert set(kinds) == {"gpu"} and kinds["gpu"]["steps"] == num_steps  # gpu-only: no swaps, no batch-1
    assert sum(kind["seconds"] for kind in kinds.values()) == pytest.approx(bound["mean_step_ms"] * num_steps / 1e3)
    slowest = bound["slowest_steps"]
    assert slowest[0]["ms"] == pytest.approx(bound["max_step_ms"])
    assert [step["ms"] for step in slowest] == sorted((step["ms"] for step in slowest), reverse=True)
    assert all(step["num_steps"] == 1 for step in slowest)  # each entry's counters changed by one step only


def test_throughput_counts_only_the_timed_pass(results, capsys):
    result = results["throughput"]
    assert result["scenario"] == "tiny, GPU KV auto" and result["policy"] == "gpu-only"
    # 2 prompts of 16 tokens, 16 tokens a step: at least one step per prompt, then decodes of 2 more tokens.
    num_steps = result["bandwidth_bound"]["counters"]["num_steps"]
    assert 4 <= num_steps <= 6
    check_bound(result["bandwidth_bound"], num_steps)
    assert result["output_tokens"] == 6 and result["input_tokens"] == 32
    assert result["output_tokens_per_s"] == pytest.approx(6 / result["elapsed_s"])
    assert result["total_tokens_per_s"] == pytest.approx(38 / result["elapsed_s"])


def test_throughput_counts_the_tokens_produced_where_max_model_len_cuts_requests(load_script, tmp_path):
    """2 prompts of 60 tokens asking for 10 each: max_model_len 64 stops them after 4."""
    output = tmp_path / "throughput.json"
    load_script("benchmark_throughput").main(ENGINE_ARGS + ["--input-len", "60", "--output-len", "10",
                                                            "--output-json", str(output)])
    result = json.loads(output.read_text())
    assert result["output_tokens"] == 8
    assert result["output_tokens_per_s"] == pytest.approx(8 / result["elapsed_s"])
    assert result["total_tokens_per_s"] == pytest.approx((120 + 8) / result["elapsed_s"])


def test_throughput_after_compiling_ahead_compiles_nothing(load_script, tmp_path, capsys):
    """`--warmup compile` runs nothing untimed, yet the timed pass finds every step program compiled."""
    output = tmp_path / "throughput.json"
    load_script("benchmark_throughput").main(ENGINE_ARGS + ["--policy", "cpu-all", "--warmup", "compile",
                                                            "--output-json", str(output)])
    bound = json.loads(output.read_text())["bandwidth_bound"]
    assert bound["step_compilations"] == bound["xla_compilations"] == 0
    assert bound["counters"]["num_pipelined_steps"] > 0
    summary = capsys.readouterr().out.splitlines()[-1]
    assert summary.startswith("cpu-all: ") and f"median step {bound['median_step_ms']:.2f} ms (schedule " in summary
    assert f"launch {bound['median_phase_ms']['launch_ms']:.2f}" in summary


def test_serving_reports_each_rate_with_its_bound(results):
    runs = results["serving"]["runs"]
    assert [run["request_rate"] for run in runs] == [100, "inf"]  # as vLLM writes it
    assert results["serving"]["args"]["request_rate"] == [100, "inf"]
    for run in runs:
        assert run["completed"] == 2 and run["p99_tpot_ms"] > 0
        assert 1 <= run["warmup_replays"] <= 3
        check_bound(run["bandwidth_bound"], run["bandwidth_bound"]["counters"]["num_steps"])


@pytest.mark.parametrize("pause_for_compiles", [True, False])
def test_a_warm_up_replay_stops_its_clock_while_a_step_compiles(load_script, monkeypatch, pause_for_compiles):
    """The first step of a request that arrives at 0 stands for one that compiles for 0.5 s: a warm-up replay does
    not count that time (its arrivals then mix as in a run without compiles), a timed run does."""
    serving = load_script("benchmark_serving")
    engine = LLMEngine(EngineConfig(model="tiny", max_model_len=64, max_num_seqs=2, max_num_batched_tokens=16))
    prompts, output_lens, arrivals = [[5] * 16], [3], np.zeros(1)
    serving.serve(engine, prompts, output_lens, arrivals)  # compiles the real programs
    step, calls = engine.step, []

    def compiling_step():
        if not calls:
            time.sleep(0.5)
            monkeypatch.setattr(model_runner, "_num_traces", model_runner.num_step_compilations() + 1)
        calls.append(1)
        return step()

    monkeypatch.setattr(engine, "step", compiling_step)
    (trace,), _, _ = serving.serve(engine, prompts, output_lens, arrivals, pause_for_compiles=pause_for_compiles)
    first_token_s = trace.token_times[0] - trace.arrival
    assert (first_token_s < 0.5) if pause_for_compiles else (first_token_s >= 0.5)


def test_serving_compiles_its_dry_runs_ahead(load_script, tmp_path):
    output = tmp_path / "serving.json"
    load_script("benchmark_serving").main(ENGINE_ARGS + ["--request-rate", "50", "--warmup", "compile",
                                                         "--warmup-step-ms", "1", "20", "--output-json", str(output)])
    (run,) = json.loads(output.read_text())["runs"]
    assert run["compiled_ahead"] >= 2 and run["completed"] == 2  # a prefill and a decode program at least
    assert 1 <= run["warmup_replays"] <= 3 and run["bandwidth_bound"]["step_compilations"] == 0


def test_plots_from_the_benchmark_json(results, load_script, tmp_path):
    pytest.importorskip("matplotlib", reason="the bench extra of pyproject.toml")
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name, result in results.items():
        (inputs / f"gpu-only_{name}.json").write_text(json.dumps(result))
        faster = json.loads(json.dumps(dict(result, policy="neo",
                                            output_tokens_per_s=result.get("output_tokens_per_s", 0) * 1.3)))
        if name == "serving":  # its first rate's timed run compiled: marked on the latency plot
            faster["runs"][0]["bandwidth_bound"]["step_compilations"] = 2
        (inputs / f"neo_{name}.json").write_text(json.dumps(faster))
    (inputs / "notes.json").write_text(json.dumps({"not": "a benchmark"}))
    plot_benchmarks = load_script("plot_benchmarks")
    written = plot_benchmarks.main([str(inputs), "--output-dir", str(tmp_path / "plots")])
    assert sorted(p.name for p in written) == ["latency.png", "throughput.png"]
    for path in written:
        assert path.read_bytes().startswith(PNG_MAGIC)
    serving = results["serving"]["runs"][0]
    assert not plot_benchmarks.timed_run_compiled(serving)
    assert plot_benchmarks.timed_run_compiled(json.loads((inputs / "neo_serving.json").read_text())["runs"][0])
    throughput = results["throughput"]
    assert plot_benchmarks.plotted_bound(throughput) == throughput["bandwidth_bound"]["bound"]
    assert plot_benchmarks.plotted_bound(dict(throughput, policy="cpu-all")) is None


def test_latency_curves_leave_out_infinite_rates_old_and_new(load_script):
    """Serving files wrote an infinite rate as `Infinity` before, as "inf" now; both read back."""
    pytest.importorskip("matplotlib", reason="the bench extra of pyproject.toml")
    old = json.loads('{"request_rate": Infinity, "p99_ttft_ms": 1.0}')
    runs = [old, {"request_rate": "inf", "p99_ttft_ms": 2.0}, {"request_rate": 4, "p99_ttft_ms": 3.0}]
    result = {"benchmark": "serving", "scenario": "s", "policy": "neo", "runs": runs}
    assert load_script("plot_benchmarks").latency_curves([result]) == {"s": {"neo": [(4.0, runs[2])]}}


def test_plot_rejects_results_without_scenario(load_script, tmp_path):
    pytest.importorskip("matplotlib", reason="the bench extra of pyproject.toml")
    (tmp_path / "old.json").write_text(json.dumps({"benchmark": "throughput", "output_tokens_per_s": 1.0}))
    with pytest.raises(ValueError, match="old.json: a throughput result without 'scenario'"):
        load_script("plot_benchmarks").main([str(tmp_path)])
