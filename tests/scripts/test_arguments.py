"""The scripts' command lines: a bad value is an argparse error (status 2) naming its argument, given before any
model loads; explicit options win over --quick's defaults; --help prints the docstrings' examples as written."""

from __future__ import annotations

import sys

import pytest

BAD_ARGUMENTS = [
    ("benchmark_throughput", ["--input-len", "0"], "argument --input-len: must be a positive integer, got '0'"),
    ("benchmark_throughput", ["--output-len", "-3"], "argument --output-len: must be a positive integer, got '-3'"),
    ("benchmark_serving", ["--input-len", "0"], "argument --input-len: must be a positive integer"),
    ("simulate_schedule", ["--output-len", "0"], "argument --output-len: must be a positive integer"),
    ("benchmark_throughput", ["--block-size", "0"], "argument --block-size: must be a positive integer, got '0'"),
    ("benchmark_throughput", ["--num-prompts", "0"], "argument --num-prompts: must be a positive integer"),
    ("benchmark_throughput", ["--range-ratio", "1"], "argument --range-ratio: must be in [0, 1), got '1'"),
    ("benchmark_serving", ["--range-ratio", "-0.1"], "argument --range-ratio: must be in [0, 1), got '-0.1'"),
    ("benchmark_throughput", ["--compile-workers", "0"], "argument --compile-workers: must be a positive integer"),
    ("benchmark_serving", ["--compile-workers", "0"], "argument --compile-workers: must be a positive integer"),
    ("benchmark_serving", ["--warmup-replays", "0"], "argument --warmup-replays: must be a positive integer"),
    ("benchmark_throughput", ["--gpu-memory-utilization", "1.5"], "argument --gpu-memory-utilization: must be in"),
    ("benchmark_throughput", ["--seed", "-1"], "argument --seed: must be in [0, 2**32), got '-1'"),
    ("benchmark_throughput", ["--policy", "fast"], "argument --policy: invalid choice: 'fast'"),
    ("benchmark_throughput", ["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    ("simulate_schedule", ["--policy", "fast"], "argument --policy: invalid choice: 'fast'"),
    ("profile", ["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    ("benchmark_swap", ["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    ("benchmark_serving", ["--request-rate", "nan"], "argument --request-rate: must be a positive number or inf, "
                                                     "got 'nan'"),
    ("benchmark_serving", ["--request-rate", "4", "0"], "argument --request-rate: must be a positive number or inf"),
    ("benchmark_serving", ["--request-rate", "-1"], "argument --request-rate: must be a positive number or inf"),
    ("benchmark_serving", ["--warmup-step-ms", "5", "nan"], "argument --warmup-step-ms: must be a positive finite"),
    ("simulate_schedule", ["--request-rate", "nan"], "argument --request-rate: must be a positive number or inf"),
    ("benchmark_throughput", ["--max-model-len", "64", "--input-len", "60", "--range-ratio", "0.1"],
     "argument --input-len: a prompt of 66 tokens is longer than max_model_len=64, which the engine rejects"),
    ("benchmark_serving", ["--input-len", "4096"], "longer than max_model_len=2048, which the engine rejects"),
    ("benchmark_throughput", ["--max-model-len", "100000"], "argument --max-model-len: 100000 exceeds"),
    ("benchmark_throughput", ["--max-num-batched-tokens", "8"], "argument --max-num-batched-tokens: must be >= 16"),
    ("benchmark_throughput", ["--model", "no-such-model"], "argument --model: 'no-such-model' is neither a preset"),
    ("benchmark_throughput", ["--cost-table", "no-such-table.json"],
     "argument --cost-table: 'no-such-table.json' does not exist"),
    ("bench_cpu_attention", ["--threads", "0"], "argument --threads: must be a positive integer, got '0'"),
    ("bench_cpu_attention", ["--isa", "bogus"], "argument --isa: invalid choice: 'bogus'"),
    ("bench_cpu_attention", ["--requests", "4", "0"], "argument --requests: must be a positive integer, got '0'"),
    ("bench_cpu_attention", ["--quick", "--max-kv-gb", "1e-9"], "--max-kv-gb leaves no (requests, context) cell"),
    ("profile", ["--tensor-parallel-size", "0"], "argument --tensor-parallel-size: must be a positive integer"),
    ("profile", ["--context-len", "0"], "argument --context-len: must be a positive integer"),
    ("plot_benchmarks", ["no-such-results.json"], "argument inputs: 'no-such-results.json' does not exist"),
    ("bench_scheduler", ["--steps", "0"], "argument --steps: must be a positive integer"),
    ("benchmark_pipeline", ["--cpu-batches", "1", "0"], "argument --cpu-batches: must be a positive integer"),
    ("benchmark_step", ["--iters", "0"], "argument --iters: must be a positive integer"),
    ("benchmark_step", ["--batch-sizes", "1", "--profile-batch", "4"],
     "--profile-batch: 4 is not one of --batch-sizes [1]"),
    ("benchmark_swap", ["--call-mb", "0"], "argument --call-mb: must be a positive finite number, got '0'"),
    ("bench_gpu_attention", ["--scan-layers", "0"], "argument --scan-layers: must be a positive integer"),
    ("bench_layer_loop", ["--batch-sizes", "0"], "argument --batch-sizes: must be a positive integer"),
]
SCRIPTS_WITH_A_PARSER = sorted({script for script, _, _ in BAD_ARGUMENTS})


@pytest.fixture
def no_engine(load_script, monkeypatch):
    """Makes loading a model fail the test: argument errors must come first."""
    load_script("benchmark_throughput")

    def refuse(*args, **kwargs):
        raise AssertionError("an engine was built before the arguments were checked")

    monkeypatch.setattr(sys.modules["bench_common"], "LLMEngine", refuse)


def exit_message(main, argv: list[str], capsys) -> str:
    """The message of an argparse error that `main(argv)` exits with."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(("script", "argv", "message"), BAD_ARGUMENTS, ids=lambda value: str(value)[:40])
def test_a_bad_value_is_an_error_naming_its_argument(load_script, no_engine, capsys, tmp_path, monkeypatch,
                                                     script, argv, message):
    monkeypatch.chdir(tmp_path)  # relative paths in the table name missing files
    cost_table = ["--policy", "neo", "--cost-table", __file__] if script == "simulate_schedule" else []
    assert message in exit_message(load_script(script).main, cost_table + argv, capsys)


def test_simulate_schedule_has_no_options_it_would_ignore(load_script, capsys):
    for option in ("--no-async-scheduling", "--bandwidth-probe-mb"):
        assert "unrecognized arguments" in exit_message(load_script("simulate_schedule").main, [option], capsys)


def test_output_json_directories_are_made_before_the_run(load_script, no_engine, tmp_path):
    output = tmp_path / "new" / "dir" / "throughput.json"
    with pytest.raises(AssertionError, match="an engine was built"):
        load_script("benchmark_throughput").main(["--output-json", str(output)])
    assert output.parent.is_dir()


@pytest.mark.parametrize("make_bad_path", [lambda root: root, lambda root: root / "a_file" / "out.json"],
                         ids=["a directory", "under a file"])
def test_an_output_json_that_cannot_be_written_is_refused(load_script, no_engine, capsys, tmp_path, make_bad_path):
    (tmp_path / "a_file").write_text("")
    argv = ["--output-json", str(make_bad_path(tmp_path))]
    assert "argument --output-json: " in exit_message(load_script("benchmark_serving").main, argv, capsys)


def test_quick_only_changes_the_defaults(load_script):
    parse_args = load_script("bench_cpu_attention").parse_args
    quick = parse_args(["--quick"])
    assert (quick.requests, quick.contexts, quick.num_q_heads) == ([1, 4, 16], [128, 1024], 8)
    explicit = parse_args(["--quick", "--requests", "2", "--contexts", "256", "--num-q-heads", "16"])
    assert (explicit.requests, explicit.contexts, explicit.num_q_heads) == ([2], [256], 16)
    assert explicit.num_kv_heads == 2 and explicit.max_kv_gb == 0.5  # the quick defaults of the others


@pytest.mark.parametrize("script", SCRIPTS_WITH_A_PARSER)
def test_help_prints_the_docstring_as_written(load_script, capsys, script):
    module = load_script(script)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    help_lines = capsys.readouterr().out.splitlines()
    missing = [line for line in module.__doc__.splitlines() if line.strip() and line not in help_lines]
    assert not missing
