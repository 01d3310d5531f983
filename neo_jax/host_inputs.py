"""A step's host-made inputs in one buffer, so that each step makes one host-to-device copy instead of ~20.

The scheduler packs a step into NumPy arrays (`StepBatch` or `PipelineBatch`, and `SamplingBatch`); passed to
the jitted step as they are, PJRT copies each to the device on its own: in an H200 trace each copy took 50-100 us
of host time in the 0.3-1.2 ms the GPU idled between two steps. `pack_host_inputs` lays them end to end in one
int32 array (every field is 4 bytes wide: int32, uint32, float32); the step calls `HostLayout.unpack`, whose
static slices and bitcasts XLA folds into the ops that read them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class HostLayout:
    """Where each array of a pytree lies in the packed buffer: a static argument of the jitted step."""

    treedef: Any                                         # the pytree's structure
    fields: tuple[tuple[tuple[int, ...], str], ...]      # (shape, dtype) of each leaf, in flattening order

    def unpack(self, packed: jax.Array) -> Any:
        """The pytree back from packed int32[N]."""
        leaves, offset = [], 0
        for shape, dtype in self.fields:
            size = math.prod(shape)
            part = packed[offset:offset + size]
            if np.dtype(dtype) != np.int32:
                part = jax.lax.bitcast_convert_type(part, jnp.dtype(dtype))
            leaves.append(jnp.reshape(part, shape))
            offset += size
        return jax.tree.unflatten(self.treedef, leaves)


def host_layout(tree: Any) -> HostLayout:
    """The layout `pack_host_inputs` gives the arrays of `tree` (equal for trees of equal shapes and dtypes)."""
    return _layout(*jax.tree.flatten(tree))


def _layout(leaves: list, treedef: Any) -> HostLayout:
    for leaf in leaves:
        if leaf.dtype.itemsize != 4:
            raise ValueError(f"pack_host_inputs: every array must have a 4-byte dtype, got {leaf.dtype}")
    return HostLayout(treedef, tuple((leaf.shape, np.dtype(leaf.dtype).str) for leaf in leaves))


def pack_host_inputs(tree: Any) -> tuple[np.ndarray, HostLayout]:
    """The NumPy arrays of `tree` end to end in one int32 array, and their layout."""
    leaves, treedef = jax.tree.flatten(tree)
    layout = _layout(leaves, treedef)
    arrays = [np.asarray(leaf).reshape(-1).view(np.int32) for leaf in leaves]
    return np.concatenate([np.zeros(0, np.int32)] + arrays), layout
