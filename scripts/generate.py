"""Generate completions from the command line: `python scripts/generate.py [prompts] [--model ...]`."""

from neo_jax.cli import generate_main

if __name__ == "__main__":
    generate_main()
