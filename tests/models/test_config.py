"""Presets, HF config.json parsing (transformers 4 and 5 layouts) and their errors."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import subprocess
import sys

import pytest
import transformers

from neo_jax.models import PRESETS, ModelConfig, RopeScaling, get_config

# Meta-Llama-3.1-8B's config.json as transformers 4 wrote it: rope_theta beside rope_scaling, torch_dtype.
LLAMA_31_8B_V4_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256,
}


def write_config(directory: pathlib.Path, fields: dict) -> pathlib.Path:
    (directory / "config.json").write_text(json.dumps(fields))
    return directory


def test_transformers_4_config_gives_the_preset(tmp_path: pathlib.Path) -> None:
    assert ModelConfig.from_hf(write_config(tmp_path, LLAMA_31_8B_V4_CONFIG)) == PRESETS["llama-3.1-8b"]


@pytest.mark.parametrize("preset", ["llama-2-7b", "llama-3-8b", "llama-3.1-70b", "llama-34b"])
def test_transformers_5_config_gives_the_preset(tmp_path: pathlib.Path, preset: str) -> None:
    config = PRESETS[preset]
    rope_scaling = None
    if config.rope_scaling is not None:
        rope_scaling = {"rope_type": "llama3", **dataclasses.asdict(config.rope_scaling)}
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta,
        rope_scaling=rope_scaling, max_position_embeddings=config.max_position_embeddings,
        bos_token_id=config.bos_token_id, eos_token_id=list(config.eos_token_ids), dtype=config.dtype)
    hf_config.save_pretrained(tmp_path)
    assert get_config(tmp_path) == config


def test_head_dim_and_defaults(tmp_path: pathlib.Path) -> None:
    config = ModelConfig.from_hf(write_config(tmp_path, {
        "vocab_size": 10, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 4, "head_dim": 8, "eos_token_id": 3, "torch_dtype": "float16"}))
    assert (config.head_dim, config.num_kv_heads, config.eos_token_ids, config.dtype) == (8, 4, (3,), "float16")
    assert config.rope_scaling is None and hash(config) == hash(dataclasses.replace(config))


@pytest.mark.parametrize("fields, message", [
    ({"hidden_size": None}, "hidden_size: missing from config.json"),
    ({"model_type": "mistral"}, "model_type: 'mistral' is not supported"),
    ({"torch_dtype": "float64"}, "torch_dtype: 'float64' is not one of"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling.low_freq_factor: missing"),
    ({"num_key_value_heads": 5}, "num_kv_heads: 5 does not divide num_heads 32"),
])
def test_bad_config_fields_are_named(tmp_path: pathlib.Path, fields: dict, message: str) -> None:
    hf = {**LLAMA_31_8B_V4_CONFIG, **fields}
    hf = {k: v for k, v in hf.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf(write_config(tmp_path, hf))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="dtype: 'int8' is not one of"):
        PRESETS["tiny"].with_dtype("int8")
    with pytest.raises(ValueError, match="num_layers: must be positive"):
        dataclasses.replace(PRESETS["tiny"], num_layers=0)
    assert PRESETS["tiny"].with_dtype("bfloat16").dtype == "bfloat16"


def test_get_config_resolves_presets_and_rejects_unknown_names(tmp_path: pathlib.Path) -> None:
    assert get_config("llama-3-8b") is PRESETS["llama-3-8b"]
    with pytest.raises(ValueError, match="neither a preset"):
        get_config("no-such-model")
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        get_config(tmp_path)


def test_presets_have_the_published_sizes() -> None:
    assert abs(PRESETS["llama-3-8b"].num_params / 1e9 - 8.03) < 0.01
    assert abs(PRESETS["llama-2-7b"].num_params / 1e9 - 6.74) < 0.01
    assert abs(PRESETS["llama-3.1-70b"].num_params / 1e9 - 70.55) < 0.01
    assert abs(PRESETS["llama-34b"].num_params / 1e9 - 33.74) < 0.01
    assert PRESETS["llama-3.1-8b"].rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)


def test_config_import_does_not_import_jax() -> None:
    code = "import sys, neo_jax.models.config, neo_jax.models; assert 'jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
