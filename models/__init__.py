"""Flax Llama models, their configs and weight loading."""

from neo_jax.models.config import PRESETS, ModelConfig, RopeScaling, get_config

__all__ = ["PRESETS", "ModelConfig", "RopeScaling", "get_config"]
