"""Text <-> token ids: an HF `tokenizer.json` through the `tokenizers` library, or a byte-level fallback.

The fallback serves presets with random weights, so that string prompts work in the demo: a prompt becomes
[bos] + [BYTE_OFFSET + b for b in its UTF-8 bytes]; decoding keeps the ids in the byte range and drops the
others (bos, eos, ids the random model samples outside it).
"""

from __future__ import annotations

import os
from typing import Protocol

from neo_jax.models.config import ModelConfig

BYTE_OFFSET = 3


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...


class HFTokenizer:
    """A `tokenizer.json` file; encoding adds the special tokens its post-processor defines (e.g. BOS)."""

    def __init__(self, path: str | os.PathLike) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        self._tokenizer = RustTokenizer.from_file(os.fspath(path))

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=True)


class ByteTokenizer:
    """UTF-8 bytes shifted by BYTE_OFFSET, after an optional BOS id."""

    def __init__(self, vocab_size: int, bos_token_id: int | None) -> None:
        if vocab_size < BYTE_OFFSET + 256:
            raise ValueError(f"vocab_size: {vocab_size} is too small for the byte-level tokenizer "
                             f"(needs {BYTE_OFFSET + 256})")
        self.bos_token_id = bos_token_id

    def encode(self, text: str) -> list[int]:
        bos = [] if self.bos_token_id is None else [self.bos_token_id]
        return bos + [BYTE_OFFSET + b for b in text.encode("utf-8")]

    def decode(self, token_ids: list[int]) -> str:
        data = bytes(t - BYTE_OFFSET for t in token_ids if BYTE_OFFSET <= t < BYTE_OFFSET + 256)
        return data.decode("utf-8", errors="replace")


def load_tokenizer(model: str | os.PathLike, config: ModelConfig) -> Tokenizer | None:
    """The checkpoint directory's tokenizer.json, the byte-level fallback for a preset, else None."""
    if os.path.isdir(model):
        file = os.path.join(model, "tokenizer.json")
        return HFTokenizer(file) if os.path.exists(file) else None
    return ByteTokenizer(config.vocab_size, config.bos_token_id)
