"""Generate completions from the command line: `python scripts/generate.py [prompts] [--model ...]`."""

from __future__ import annotations

import argparse

from neo_jax.cli import build_parser, generate_main


def check_prompts_file(parser: argparse.ArgumentParser, path: str) -> None:
    """A --prompts-file that cannot be read or holds no prompt is an argument error, not a run of the built-in
    prompts."""
    try:
        with open(path) as file:
            has_prompt = any(line.strip() for line in file)
    except OSError as error:
        parser.error(f"argument --prompts-file: cannot read {path}: {error.strerror}")
    if not has_prompt:
        parser.error(f"argument --prompts-file: {path} holds no prompt (every line is blank)")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.prompts_file is not None:
        check_prompts_file(parser, args.prompts_file)
    generate_main(argv)


if __name__ == "__main__":
    main()
