"""Flax Llama models, their configs and weight loading.

The configs import eagerly and without JAX (the cost model and scheduler read them); the model and loading
names resolve on first use.
"""

import importlib

from neo_jax.models.config import PRESETS, ModelConfig, RopeScaling, get_config

_LAZY_EXPORTS = {
    "llama": "neo_jax.models.llama",
    "loading": "neo_jax.models.loading",
    "Params": "neo_jax.models.llama",
    "init_params": "neo_jax.models.llama",
    "embed_tokens": "neo_jax.models.llama",
    "pre_attention": "neo_jax.models.llama",
    "post_attention": "neo_jax.models.llama",
    "final_logits": "neo_jax.models.llama",
    "forward": "neo_jax.models.llama",
    "layer_params": "neo_jax.models.llama",
    "CheckpointError": "neo_jax.models.loading",
    "load_hf_checkpoint": "neo_jax.models.loading",
    "save_params": "neo_jax.models.loading",
    "restore_params": "neo_jax.models.loading",
}
__all__ = ["PRESETS", "ModelConfig", "RopeScaling", "get_config", *_LAZY_EXPORTS]


def __getattr__(name: str) -> object:
    if name not in _LAZY_EXPORTS:
        raise AttributeError(f"module 'neo_jax.models' has no attribute {name!r}")
    module = importlib.import_module(_LAZY_EXPORTS[name])
    return module if module.__name__ == f"{__name__}.{name}" else getattr(module, name)
