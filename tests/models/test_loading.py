"""Checkpoint loading errors name what is wrong; orbax round trips bit-exactly."""

from __future__ import annotations

import json
import pathlib
import re

import jax
import numpy as np
import pytest
import safetensors.numpy

from neo_jax.models import PRESETS, ModelConfig, llama
from neo_jax.models.loading import CheckpointError, load_hf_checkpoint, restore_params, save_params


def rewrite_tensors(path: pathlib.Path, edit) -> None:
    file = path / "model.safetensors"
    tensors = dict(safetensors.numpy.load_file(file))
    edit(tensors)
    safetensors.numpy.save_file(tensors, file)


def edit_config(path: pathlib.Path, **fields) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(fields)
    (path / "config.json").write_text(json.dumps(config))


TENSOR_EDITS = {
    "missing": (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
                r"model\.layers\.1\.mlp\.up_proj\.weight: tensor missing"),
    "unexpected": (lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}),
                   r"model\.layers\.0\.extra\.weight: unexpected tensor"),
    "shape": (lambda t: t.update({"model.norm.weight": np.ones(63, np.float32)}),
              r"model\.norm\.weight: shape \(63,\) does not match the config's \(64,\)"),
    "transposed": (lambda t: t.update({"model.layers.0.mlp.up_proj.weight": np.ones((64, 96), np.float32)}),
                   r"model\.layers\.0\.mlp\.up_proj\.weight: shape \(64, 96\) does not match the config's \(96, 64\)"),
    "non_float": (lambda t: t.update({"model.norm.weight": np.ones(64, np.int32)}),
                  r"model\.norm\.weight: dtype int32 is not a float type"),
    "unsupported_dtype": (lambda t: t.update({"model.norm.weight": np.ones(64, np.int8)}),
                          r"model\.norm\.weight: dtype I8 is not supported"),
}


@pytest.mark.parametrize("case", sorted(TENSOR_EDITS))
def test_bad_tensor_is_named(tiny_llama, case: str) -> None:
    path, _ = tiny_llama()
    edit, message = TENSOR_EDITS[case]
    rewrite_tensors(path, edit)
    with pytest.raises(CheckpointError, match=message):
        load_hf_checkpoint(path)


def test_missing_shard_is_named(tiny_llama) -> None:
    path, _ = tiny_llama(max_shard_size="100KB")
    next(path.glob("model-0000*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match=r"model-0000\d-of-0000\d\.safetensors: shard .* missing"):
        load_hf_checkpoint(path)


def test_directory_without_weights(tmp_path: pathlib.Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 8, "hidden_size": 8,
                                                      "intermediate_size": 8, "num_hidden_layers": 1,
                                                      "num_attention_heads": 2}))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_hf_checkpoint(tmp_path)


@pytest.mark.parametrize("field, value, message", [
    ("model_type", "mistral", "model_type: 'mistral' is not supported"),
    ("hidden_act", "gelu", "hidden_act: 'gelu' is not supported"),
    ("attention_bias", True, "attention_bias: biases are not supported"),
    ("num_key_value_heads", 3, "num_kv_heads: 3 does not divide num_heads 4"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 2.0}, "rope_scaling.rope_type: 'yarn' is not supported"),
])
def test_unsupported_config_field_is_named(tiny_llama, field: str, value, message: str) -> None:
    path, _ = tiny_llama()
    edit_config(path, **{field: value})
    with pytest.raises(CheckpointError, match=r"config\.json: " + re.escape(message)):
        load_hf_checkpoint(path)


def test_truncated_file_is_named(tiny_llama) -> None:
    path, _ = tiny_llama()
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"\d+ bytes at \[\d+, \d+\) of .*model\.safetensors"):
        load_hf_checkpoint(path)


def test_orbax_round_trip_is_bit_exact(tmp_path: pathlib.Path) -> None:
    config = PRESETS["tiny"].with_dtype("bfloat16")
    params = llama.init_params(config, jax.random.key(3))
    save_params(tmp_path / "ckpt", params)
    restored = restore_params(tmp_path / "ckpt", config)
    for original, loaded in zip(jax.tree.leaves(params), jax.tree.leaves(restored), strict=True):
        assert original.dtype == loaded.dtype
        np.testing.assert_array_equal(np.asarray(original).view(np.uint16), np.asarray(loaded).view(np.uint16))


def test_orbax_restore_against_a_different_config_fails(tmp_path: pathlib.Path) -> None:
    config = PRESETS["tiny"]
    save_params(tmp_path / "ckpt", llama.init_params(config, jax.random.key(0)))
    other = ModelConfig(**{**config.__dict__, "hidden_size": 64})
    with pytest.raises(CheckpointError, match=r"does not match the config: \['embed'\] is float32\[512, 128\], "
                                              r"the config needs float32\[512, 64\] \(and \d+ more\)"):
        restore_params(tmp_path / "ckpt", other)
    fewer_layers = ModelConfig(**{**config.__dict__, "num_layers": config.num_layers - 1})
    last_layer = config.num_layers - 1
    with pytest.raises(CheckpointError, match=rf"\['layers'\]\[{last_layer}\]\['input_norm'\] is not a param"):
        restore_params(tmp_path / "ckpt", fewer_layers)
