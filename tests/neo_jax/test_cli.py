"""The generate command: prompts from arguments and a file, completions and tokens/s printed."""

from __future__ import annotations

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
