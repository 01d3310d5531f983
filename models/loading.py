"""Weights in and out: HF checkpoints (config.json + safetensors) and orbax checkpoints of our params.

safetensors is parsed here directly (an 8-byte header length, a JSON header, then raw little-endian data) so
that bf16 tensors arrive as ml_dtypes.bfloat16 NumPy arrays without torch; safetensors' own NumPy and JAX
loaders reject bf16. HF stores linear weights as [out, in]; they are transposed once, at load.
"""

from __future__ import annotations

import json
import math
import os
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from neo_jax.models.config import ModelConfig
from neo_jax.models.llama import Params, fuse_qkv

_SAFETENSORS_DTYPES = {
    "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F64": np.float64, "I64": np.int64, "I32": np.int32,
}

# Our name for a layer's tensor -> (HF name inside model.layers.{i}., transpose [out, in] -> [in, out]);
# wq, wk and wv become the layer's one wqkv (llama.fuse_qkv).
_LAYER_TENSORS = {
    "input_norm": ("input_layernorm.weight", False),
    "wq": ("self_attn.q_proj.weight", True),
    "wk": ("self_attn.k_proj.weight", True),
    "wv": ("self_attn.v_proj.weight", True),
    "wo": ("self_attn.o_proj.weight", True),
    "post_norm": ("post_attention_layernorm.weight", False),
    "w_gate": ("mlp.gate_proj.weight", True),
    "w_up": ("mlp.up_proj.weight", True),
    "w_down": ("mlp.down_proj.weight", True),
}


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: names the tensor or field at fault."""


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file as NumPy arrays (memory-mapped, bf16 as ml_dtypes.bfloat16)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{name}: dtype {info['dtype']} is not supported")
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
        begin, end = info["data_offsets"]
        expected_bytes = math.prod(info["shape"]) * dtype.itemsize
        if end - begin != expected_bytes or end > data.size:
            raise CheckpointError(f"{name}: {end - begin} bytes at [{begin}, {end}) of {os.fspath(path)} "
                                  f"(data section {data.size} bytes) do not hold shape {info['shape']} {info['dtype']}")
        tensors[name] = data[begin:end].view(dtype).reshape(info["shape"])
    return tensors


def _checkpoint_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        missing = [s for s in shards if not os.path.exists(os.path.join(path, s))]
        if missing:
            raise CheckpointError(f"{missing[0]}: shard named in model.safetensors.index.json is missing")
        return [os.path.join(path, s) for s in shards]
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def load_hf_checkpoint(path: str | os.PathLike, dtype: str | None = None) -> tuple[ModelConfig, Params]:
    """Config and params of an HF Llama directory, cast to `dtype` (default: the checkpoint's)."""
    path = os.fspath(path)
    try:
        config = ModelConfig.from_hf(path)
    except ValueError as error:
        raise CheckpointError(f"{os.path.join(path, 'config.json')}: {error}") from error
    if dtype is not None:
        config = config.with_dtype(dtype)
    tensors: dict[str, np.ndarray] = {}
    for file in _checkpoint_files(path):
        tensors.update(read_safetensors(file))
    return config, params_from_hf_tensors(config, tensors)


def _expected_tensors(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], bool]]:
    """HF tensor name -> (our shape, transpose from HF's [out, in])."""
    v, d, i = config.vocab_size, config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    layer_shapes = {"input_norm": (d,), "post_norm": (d,), "wq": (d, q), "wk": (d, kv), "wv": (d, kv),
                    "wo": (q, d), "w_gate": (d, i), "w_up": (d, i), "w_down": (i, d)}
    expected = {"model.embed_tokens.weight": ((v, d), False), "model.norm.weight": ((d,), False)}
    if not config.tie_word_embeddings:
        expected["lm_head.weight"] = ((d, v), True)
    for layer in range(config.num_layers):
        for ours, (hf, transpose) in _LAYER_TENSORS.items():
            expected[f"model.layers.{layer}.{hf}"] = (layer_shapes[ours], transpose)
    return expected


def _ignorable(name: str, config: ModelConfig) -> bool:
    """Tensors some checkpoints carry that we recompute (RoPE frequencies) or share (a tied head)."""
    return name.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and name == "lm_head.weight")


def _check_tensors(config: ModelConfig, tensors: dict[str, np.ndarray]) -> None:
    expected = _expected_tensors(config)
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise CheckpointError(f"{missing[0]}: tensor missing from the checkpoint ({len(missing)} in all)")
    unexpected = sorted(name for name in tensors if name not in expected and not _ignorable(name, config))
    if unexpected:
        raise CheckpointError(f"{unexpected[0]}: unexpected tensor for this config ({len(unexpected)} in all)")
    for name, (shape, transpose) in expected.items():
        array = tensors[name]
        if not (np.issubdtype(array.dtype, np.floating) or array.dtype == ml_dtypes.bfloat16):
            raise CheckpointError(f"{name}: dtype {array.dtype} is not a float type")
        hf_shape = shape[::-1] if transpose else shape
        if array.shape != hf_shape:
            raise CheckpointError(f"{name}: shape {array.shape} does not match the config's {hf_shape}")


def params_from_hf_tensors(config: ModelConfig, tensors: dict[str, np.ndarray]) -> Params:
    """Maps HF tensor names onto our params after checking every name, shape and dtype.

    Each tensor goes to the default device as soon as it is converted, so the host holds one at a time
    besides the memory-mapped files.
    """
    _check_tensors(config, tensors)
    dtype = jnp.dtype(config.dtype)

    def take(name: str, transpose: bool = False) -> np.ndarray:
        array = tensors[name].T if transpose else tensors[name]
        return array.astype(dtype, copy=False)

    def layer(index: int) -> Params:
        arrays = {ours: take(f"model.layers.{index}.{hf}", transpose)
                  for ours, (hf, transpose) in _LAYER_TENSORS.items()}
        arrays["wqkv"] = fuse_qkv(config, arrays.pop("wq"), arrays.pop("wk"), arrays.pop("wv"))
        return {name: jnp.asarray(array) for name, array in arrays.items()}

    params: Params = {
        "embed": jnp.asarray(take("model.embed_tokens.weight")),
        "layers": [layer(i) for i in range(config.num_layers)],
        "final_norm": jnp.asarray(take("model.norm.weight")),
    }
    if not config.tie_word_embeddings:
        params["lm_head"] = jnp.asarray(take("lm_head.weight", transpose=True))
    return params


def save_params(path: str | os.PathLike, params: Params) -> None:
    """Writes params with orbax (an absolute directory that must not exist yet)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.abspath(path), params)


def restore_params(path: str | os.PathLike, config: ModelConfig) -> Params:
    """Reads params saved by `save_params`, checked against the shapes and dtype `config` implies."""
    import orbax.checkpoint as ocp

    from neo_jax.models.llama import init_params

    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    directory = os.path.abspath(path)
    with ocp.StandardCheckpointer() as checkpointer:
        # Checked from the metadata before orbax reads a byte: a restore that fails inside orbax also leaves its
        # background event loop with callbacks it can no longer run.
        _check_saved_params(path, checkpointer.metadata(directory), abstract)
        try:
            return checkpointer.restore(directory, abstract)
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"{path}: orbax checkpoint does not match the config: {error}") from error


def _check_saved_params(path: str | os.PathLike, metadata, abstract: Params) -> None:
    """Raises CheckpointError naming the params missing, unexpected, or saved with another shape or dtype."""
    saved = {jax.tree_util.keystr(key): leaf for key, leaf in
             jax.tree_util.tree_leaves_with_path(getattr(metadata, "item_metadata", metadata))}
    expected = {jax.tree_util.keystr(key): leaf for key, leaf in jax.tree_util.tree_leaves_with_path(abstract)}
    problems = [f"{name} is missing" for name in sorted(expected.keys() - saved.keys())]
    problems += [f"{name} is not a param of this model" for name in sorted(saved.keys() - expected.keys())]
    for name, want in expected.items():
        got = saved.get(name)
        if got is not None and (tuple(got.shape), np.dtype(got.dtype)) != (want.shape, want.dtype):
            problems.append(f"{name} is {np.dtype(got.dtype)}{list(got.shape)}, the config needs "
                            f"{want.dtype}{list(want.shape)}")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"{path}: orbax checkpoint does not match the config: {problems[0]}{more}")

