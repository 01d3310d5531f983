"""Tiny random HF Llama checkpoints written with save_pretrained, for comparisons with transformers."""

from __future__ import annotations

import pathlib
from typing import Any, Callable

import pytest
import torch
import transformers

TINY_HF_CONFIG: dict[str, Any] = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)


def write_tiny_llama(directory: pathlib.Path, dtype: torch.dtype = torch.float32, max_shard_size: str | None = None,
                     seed: int = 0, **overrides: Any) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**TINY_HF_CONFIG, **overrides})
    model = transformers.LlamaForCausalLM(config).eval()
    # Random norms too, so that a swapped norm weight would show up in the logits.
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.endswith("norm.weight"):
                tensor.uniform_(0.5, 1.5)
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return model


@pytest.fixture
def tiny_llama(tmp_path: pathlib.Path) -> Callable[..., tuple[pathlib.Path, transformers.LlamaForCausalLM]]:
    def make(**kwargs: Any) -> tuple[pathlib.Path, transformers.LlamaForCausalLM]:
        return tmp_path, write_tiny_llama(tmp_path, **kwargs)

    return make
