"""neo-jax: LLM inference in JAX with NEO's CPU offloading of decode attention."""

import importlib

__version__ = "0.1.0"

# Resolved on first use, so that importing a light submodule (e.g. the cost model) does not import JAX.
_EXPORTS = {
    "LLM": "neo_jax.llm",
    "SamplingParams": "neo_jax.sampling_params",
    "RequestOutput": "neo_jax.outputs",
    "CompletionOutput": "neo_jax.outputs",
    "EngineConfig": "neo_jax.config",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'neo_jax' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
