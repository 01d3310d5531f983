"""Llama model configurations: built-in presets and HF `config.json` parsing."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SUPPORTED_DTYPES = ("bfloat16", "float16", "float32")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 style frequency scaling (`rope_scaling.rope_type == "llama3"`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static shape and numerics of a Llama model; hashable, so it can be a static jit argument."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    dtype: str = "bfloat16"
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)

    def __post_init__(self) -> None:
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of {SUPPORTED_DTYPES}")
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                      "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field}: must be positive, got {getattr(self, field)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads: {self.num_kv_heads} does not divide num_heads {self.num_heads}")

    def with_dtype(self, dtype: str) -> ModelConfig:
        return dataclasses.replace(self, dtype=dtype)

    @property
    def num_params(self) -> int:
        per_layer = (self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
                     + 3 * self.hidden_size * self.intermediate_size + 2 * self.hidden_size)
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embeddings + self.hidden_size

    @classmethod
    def from_hf(cls, path: str | os.PathLike) -> ModelConfig:
        """Reads `config.json` of an HF Llama checkpoint directory (or the file itself)."""
        file = os.path.join(path, "config.json") if os.path.isdir(path) else os.fspath(path)
        if not os.path.exists(file):
            raise FileNotFoundError(f"config.json not found at {file}")
        with open(file) as f:
            return cls.from_hf_dict(json.load(f))

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> ModelConfig:
        model_type = hf.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"model_type: {model_type!r} is not supported (only 'llama')")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act: {hf['hidden_act']!r} is not supported (only 'silu')")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ValueError(f"{flag}: biases are not supported")
        missing = [f for f in _REQUIRED_HF_FIELDS if f not in hf]
        if missing:
            raise ValueError(f"{missing[0]}: missing from config.json")
        num_heads = hf["num_attention_heads"]
        # transformers >= 5 writes `rope_parameters` (theta inside); older files `rope_theta` + `rope_scaling`.
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        eos = hf.get("eos_token_id", 2)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            rope_scaling=_parse_rope_scaling(rope or None),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            dtype=_parse_dtype(hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ()),
        )


_REQUIRED_HF_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _parse_dtype(name: str) -> str:
    if name not in SUPPORTED_DTYPES:
        raise ValueError(f"torch_dtype: {name!r} is not one of {SUPPORTED_DTYPES}")
    return name


def _parse_rope_scaling(raw: dict[str, Any] | None) -> RopeScaling | None:
    if raw is None:
        return None
    kind = raw.get("rope_type", raw.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise ValueError(f"rope_scaling.rope_type: {kind!r} is not supported (only 'llama3')")
    missing = [f for f in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
               if f not in raw]
    if missing:
        raise ValueError(f"rope_scaling.{missing[0]}: missing from the llama3 rope scaling")
    return RopeScaling(
        factor=float(raw["factor"]),
        low_freq_factor=float(raw["low_freq_factor"]),
        high_freq_factor=float(raw["high_freq_factor"]),
        original_max_position_embeddings=int(raw["original_max_position_embeddings"]),
    )


_LLAMA3_ROPE = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=8192)

PRESETS: dict[str, ModelConfig] = {
    # Small enough for CI and the demo; vocab covers the byte-level fallback tokenizer.
    "tiny": ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=32, max_position_embeddings=2048, dtype="float32",
                        bos_token_id=1, eos_token_ids=(2,)),
    "llama-2-7b": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                              num_heads=32, num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5,
                              max_position_embeddings=4096),
    "llama-3-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                              num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
                              rope_theta=500000.0, max_position_embeddings=8192, bos_token_id=128000,
                              eos_token_ids=(128001, 128009)),
    "llama-3.1-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                                num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
                                rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE, max_position_embeddings=131072,
                                bos_token_id=128000, eos_token_ids=(128001, 128008, 128009)),
    "llama-3.1-70b": ModelConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
                                 num_heads=64, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
                                 rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE, max_position_embeddings=131072,
                                 bos_token_id=128000, eos_token_ids=(128001, 128008, 128009)),
    # CodeLlama-34B's shape: 33.7B parameters, 67 GB in bf16, leaving an 80 GB GPU short of KV memory.
    "llama-34b": ModelConfig(vocab_size=32000, hidden_size=8192, intermediate_size=22016, num_layers=48,
                             num_heads=64, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=1000000.0,
                             max_position_embeddings=16384),
}


def get_config(name_or_path: str | os.PathLike) -> ModelConfig:
    """A preset by name, or the config of an HF checkpoint directory."""
    if str(name_or_path) in PRESETS:
        return PRESETS[str(name_or_path)]
    if os.path.isdir(name_or_path):
        return ModelConfig.from_hf(name_or_path)
    raise ValueError(f"model: {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a directory")
