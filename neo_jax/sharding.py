"""Tensor parallelism: a one-axis `tp` mesh, the partition specs of the Llama params and the GPU KV cache, and
the placement of both.

Megatron's split, expressed as shardings and left to XLA's SPMD partitioner: wqkv and w_gate/w_up are split
over their output columns (whole groups of heads, whole MLP columns), wo and w_down over their input rows, so
each layer needs one all-reduce after the attention output projection and one after the MLP, both inserted by
XLA. The embedding table and the LM head are split over the vocabulary when it divides evenly (else
replicated), norms are replicated. The KV cache [L, N, Hkv, bs, Dh] is split over its kv heads, so shard s owns q heads
[s * Hq/tp, (s + 1) * Hq/tp) and exactly the kv heads they read.

Custom calls (the paged decode kernel, the CPU handoff) cannot be partitioned by XLA; `shard_over_heads` runs a
function per shard on its heads with `jax.shard_map`, without communication.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from neo_jax.models import llama
from neo_jax.models.config import ModelConfig

TP_AXIS = "tp"

# Specs of one layer's params: heads and MLP columns over tp.
LAYER_SPECS = {
    "input_norm": P(None),
    "wqkv": P(None, TP_AXIS),  # grouped by kv head (models/llama.py), so whole groups land on a shard
    "wo": P(TP_AXIS, None),
    "post_norm": P(None),
    "w_gate": P(None, TP_AXIS),
    "w_up": P(None, TP_AXIS),
    "w_down": P(TP_AXIS, None),
}
KV_CACHE_SPEC = P(None, None, TP_AXIS, None, None)  # [L, N, Hkv, bs, Dh]
KV_BLOCKS_SPEC = P(None, TP_AXIS, None, None)  # the cache viewed as [L * N, Hkv, bs, Dh]
HEADS_SPEC = P(None, TP_AXIS, None)  # q/k/v/attention output [T, H, Dh]


def check_tensor_parallel_size(model_config: ModelConfig, tensor_parallel_size: int) -> None:
    """Raises ValueError naming the model dimension that `tensor_parallel_size` does not divide."""
    for field in ("num_kv_heads", "num_heads", "intermediate_size"):
        size = getattr(model_config, field)
        if size % tensor_parallel_size:
            raise ValueError(f"tensor_parallel_size: {tensor_parallel_size} does not divide the model's "
                             f"{field} ({size}); each shard must own whole heads and MLP columns")


def make_mesh(tensor_parallel_size: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with one axis `tp` over the first `tensor_parallel_size` devices (default: jax.devices())."""
    devices = list(jax.devices() if devices is None else devices)
    if tensor_parallel_size > len(devices):
        raise ValueError(f"tensor_parallel_size: {tensor_parallel_size} exceeds the {len(devices)} devices available "
                         f"({devices[0].platform if devices else 'none'})")
    return Mesh(np.array(devices[:tensor_parallel_size]), (TP_AXIS,))


def param_specs(model_config: ModelConfig, tensor_parallel_size: int) -> dict:
    """PartitionSpecs of a params pytree of `model_config` (see models/llama.py for the layout)."""
    vocab_axis = TP_AXIS if model_config.vocab_size % tensor_parallel_size == 0 else None
    specs = {"embed": P(vocab_axis, None), "layers": [dict(LAYER_SPECS) for _ in range(model_config.num_layers)],
             "final_norm": P(None)}
    if not model_config.tie_word_embeddings:
        specs["lm_head"] = P(None, vocab_axis)
    return specs


def named_shardings(mesh: Mesh, specs):
    """`specs` (a pytree of PartitionSpecs) as NamedShardings over `mesh`."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P))


def shard_params(params: llama.Params, model_config: ModelConfig, mesh: Mesh) -> llama.Params:
    """The params placed over the mesh (each device receives only its shard)."""
    check_tensor_parallel_size(model_config, mesh.shape[TP_AXIS])
    specs = param_specs(model_config, mesh.shape[TP_AXIS])
    if jax.tree.structure(params) != jax.tree.structure(specs, is_leaf=lambda x: isinstance(x, P)):
        raise ValueError(f"params: keys {sorted(params)} do not match the Llama layout {sorted(specs)}")
    return jax.device_put(params, named_shardings(mesh, specs))


def init_sharded_params(model_config: ModelConfig, key: jax.Array, mesh: Mesh) -> llama.Params:
    """llama.init_params's values, made over the mesh: each device makes and keeps only its shards."""
    check_tensor_parallel_size(model_config, mesh.shape[TP_AXIS])
    return llama.init_params(model_config, key, named_shardings(mesh, param_specs(model_config, mesh.shape[TP_AXIS])))


def kv_cache_sharding(mesh: Mesh) -> NamedSharding:
    """Where the GPU KV cache [L, N, Hkv, bs, Dh] lives: split over kv heads."""
    return NamedSharding(mesh, KV_CACHE_SPEC)


def shard_over_heads(function: Callable, mesh: Mesh | None, in_specs: tuple, out_specs) -> Callable:
    """`function` run per shard on its heads (shard_map over tp); `function` itself when mesh is None.

    Specs use HEADS_SPEC for head-split arrays, KV_CACHE_SPEC-like specs for caches and P() for replicated
    inputs (the step's batch description). The per-shard function sees local head counts.
    """
    if mesh is None:
        return function
    return jax.shard_map(function, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
