"""Our Flax Llama against transformers' LlamaForCausalLM on tiny random checkpoints."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from neo_jax.models import PRESETS, llama
from neo_jax.models.loading import load_hf_checkpoint

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

CASES = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    "gqa_ratio_4_head_dim": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=32),
    "llama3_rope": dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0),
    "tied": dict(tie_word_embeddings=True),
    "sharded": dict(max_shard_size="100KB"),
}


def hf_logits(model: torch.nn.Module, token_ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(token_ids)).logits.float().numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_matches_transformers(tiny_llama, case: str) -> None:
    path, model = tiny_llama(**CASES[case])
    config, params = load_hf_checkpoint(path)
    token_ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 150))
    logits = np.asarray(llama.forward(params, config, jnp.asarray(token_ids)))
    np.testing.assert_allclose(logits, hf_logits(model, token_ids), atol=1e-4, rtol=0)


def test_sharded_checkpoint_really_is_sharded(tiny_llama) -> None:
    path, _ = tiny_llama(max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("*.safetensors"))) > 1


def test_bf16_checkpoint_loads_into_fp32(tiny_llama) -> None:
    path, model = tiny_llama(dtype=torch.bfloat16)
    config, params = load_hf_checkpoint(path, dtype="float32")
    assert config.dtype == "float32" and params["embed"].dtype == jnp.float32
    token_ids = np.random.default_rng(1).integers(0, config.vocab_size, (1, 64))
    logits = np.asarray(llama.forward(params, config, jnp.asarray(token_ids)))
    np.testing.assert_allclose(logits, hf_logits(model.float(), token_ids), atol=1e-4, rtol=0)


def test_layer_split_equals_full_forward(tiny_llama) -> None:
    path, _ = tiny_llama(num_key_value_heads=2)
    config, params = load_hf_checkpoint(path)
    seq = 40
    token_ids = jnp.asarray(np.random.default_rng(2).integers(0, config.vocab_size, (1, seq)))
    positions = jnp.arange(seq, dtype=jnp.int32)
    pre_attention = jax.jit(llama.pre_attention, static_argnums=1)
    post_attention = jax.jit(llama.post_attention, static_argnums=1)
    hidden = llama.embed_tokens(params, config, token_ids[0])
    for i in range(config.num_layers):
        layer = params["layers"][i]
        q, k, v = pre_attention(layer, config, hidden, positions)
        assert q.shape == (seq, config.num_heads, config.head_dim) and k.shape == v.shape == (
            seq, config.num_kv_heads, config.head_dim)
        attn = llama.causal_attention(q[None], k[None], v[None])[0]
        hidden = post_attention(layer, config, hidden, attn)
    split = llama.final_logits(params, config, hidden)
    np.testing.assert_allclose(np.asarray(split), np.asarray(llama.forward(params, config, token_ids)[0]),
                               atol=1e-5, rtol=0)


def test_layer_functions_reject_unflattened_tokens() -> None:
    config = PRESETS["tiny"]
    layer = llama.init_params(config, jax.random.key(0))["layers"][0]
    hidden = jnp.zeros((2, 3, config.hidden_size), jnp.float32)
    with pytest.raises(ValueError, match=r"hidden: expected 2 dims .* got shape \(2, 3, 128\)"):
        llama.pre_attention(layer, config, hidden, jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"attn_out: expected 3 dims"):
        llama.post_attention(layer, config, hidden[0], jnp.zeros((3, config.num_heads * config.head_dim)))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_forward_tracks_float32(tiny_llama, dtype: str) -> None:
    path, _ = tiny_llama()
    config32, params32 = load_hf_checkpoint(path, dtype="float32")
    config, params = load_hf_checkpoint(path, dtype=dtype)
    assert all(leaf.dtype == jnp.dtype(dtype) for leaf in jax.tree.leaves(params))
    token_ids = jnp.asarray(np.random.default_rng(3).integers(0, config.vocab_size, (2, 32)))
    reference = np.asarray(llama.forward(params32, config32, token_ids))
    logits = llama.forward(params, config, token_ids)
    assert logits.dtype == jnp.float32
    relative_error = np.abs(np.asarray(logits) - reference).max() / np.abs(reference).max()
    assert relative_error < 0.05


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_init_params_shapes_and_dtype(dtype: str) -> None:
    config = dataclasses.replace(PRESETS["tiny"], dtype=dtype, tie_word_embeddings=dtype == "float32")
    params = llama.init_params(config, jax.random.key(0))
    expected = jax.eval_shape(lambda: llama.init_params(config, jax.random.key(1)))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == jax.tree.map(lambda a: (a.shape, a.dtype), expected)
    assert len(params["layers"]) == config.num_layers
    assert params["layers"][0]["wqkv"].shape == (config.hidden_size,
                                                 (config.num_heads + 2 * config.num_kv_heads) * config.head_dim)
    assert ("lm_head" in params) == (not config.tie_word_embeddings)
    assert all(leaf.dtype == jnp.dtype(dtype) for leaf in jax.tree.leaves(params))
    assert 0.015 < float(jnp.std(params["layers"][0]["w_up"].astype(jnp.float32))) < 0.025
    assert not np.array_equal(np.asarray(params["layers"][0]["wqkv"]), np.asarray(params["layers"][1]["wqkv"]))
    logits = llama.forward(params, config, jnp.zeros((1, 8), jnp.int32))
    assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())


def test_init_programs_of_an_8b_model_need_little_scratch_memory() -> None:
    config = PRESETS["llama-3-8b"]
    layer, embedding = (jax.jit(init, static_argnums=0).lower(config, jax.random.key(0)).compile().memory_analysis()
                        for init in (llama.init_layer_params, llama.init_embedding_params))
    total = config.num_layers * layer.output_size_in_bytes + embedding.output_size_in_bytes
    assert abs(total - 2 * config.num_params) < 1e6
    assert layer.temp_size_in_bytes < 1e9 and embedding.temp_size_in_bytes < 1e9
