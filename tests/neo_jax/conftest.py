"""Shared engine fixtures: a tiny random HF Llama checkpoint whose config equals the "tiny" preset's.

Engines in these tests share model config and engine sizes where they can, so that the jitted step
programs compiled by one test serve the next ones (compiling dominates the run time on the CPU).
"""

from __future__ import annotations

import pathlib

import pytest
import torch
import transformers

from neo_jax.models.config import PRESETS
from tiny_engine import ENGINE_OPTIONS

TINY = PRESETS["tiny"]


@pytest.fixture(scope="session")
def hf_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, transformers.LlamaForCausalLM]:
    """A float32 LlamaForCausalLM with the tiny preset's shapes, saved with save_pretrained."""
    directory = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=TINY.vocab_size, hidden_size=TINY.hidden_size, intermediate_size=TINY.intermediate_size,
        num_hidden_layers=TINY.num_layers, num_attention_heads=TINY.num_heads, num_key_value_heads=TINY.num_kv_heads,
        max_position_embeddings=TINY.max_position_embeddings, rms_norm_eps=TINY.rms_norm_eps,
        rope_theta=TINY.rope_theta, bos_token_id=TINY.bos_token_id, eos_token_id=TINY.eos_token_ids[0],
        initializer_range=0.1, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(directory)
    return directory, model


@pytest.fixture(scope="session")
def hf_llm(hf_llama):
    """An LLM serving the checkpoint with ENGINE_OPTIONS (shared: tests must leave it idle)."""
    from neo_jax import LLM

    return LLM(str(hf_llama[0]), **ENGINE_OPTIONS)
