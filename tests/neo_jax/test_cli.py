"""The generate command: prompts from arguments and a file, completions and tokens/s printed."""

from __future__ import annotations

import jax
import pytest

from neo_jax.cli import DEFAULT_PROMPTS, build_parser, generate_main, read_prompts

SMALL = ["--max-model-len", "128", "--max-num-seqs", "8", "--max-num-batched-tokens", "64", "--max-tokens", "4"]


def test_prompts_come_from_arguments_then_the_file_else_the_defaults(tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("first\n\nsecond\n")
    args = build_parser().parse_args(["zero", "--prompts-file", str(prompts_file)])
    assert read_prompts(args) == ["zero", "first", "second"]
    assert read_prompts(build_parser().parse_args([])) == list(DEFAULT_PROMPTS)


def test_generate_main_prints_every_prompt_and_the_rate(capsys, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("from a file\n")
    generate_main(["an argument", "--prompts-file", str(prompts_file), *SMALL])
    out = capsys.readouterr().out
    assert "--- 'an argument'" in out and "--- 'from a file'" in out
    assert "2 prompts, 8 tokens in" in out and "tokens/s" in out


def test_options_the_engine_refuses_exit_with_their_name(capsys):
    with pytest.raises(SystemExit) as exited:
        generate_main(["--tensor-parallel-size", str(jax.device_count() + 1), *SMALL])
    assert exited.value.code == 2
    assert f"tensor_parallel_size: {jax.device_count() + 1} exceeds" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate_main(["--max-model-len", "0", *SMALL[2:]])
    assert "max_model_len: must be a positive integer" in capsys.readouterr().err


@pytest.mark.parametrize("lines", ["", "\n  \n"], ids=["empty", "blank lines"])
def test_a_prompts_file_without_prompts_is_an_argument_error(capsys, tmp_path, lines):
    path = tmp_path / "prompts.txt"
    path.write_text(lines)
    with pytest.raises(SystemExit) as exited:
        generate_main(["--prompts-file", str(path), *SMALL])
    assert exited.value.code == 2
    assert f"argument --prompts-file: {path} holds no prompt" in capsys.readouterr().err


def test_a_missing_prompts_file_is_an_argument_error(capsys, tmp_path):
    path = tmp_path / "missing.txt"
    with pytest.raises(SystemExit) as exited:
        generate_main(["--prompts-file", str(path), *SMALL])
    assert exited.value.code == 2
    assert f"argument --prompts-file: cannot read {path}" in capsys.readouterr().err
