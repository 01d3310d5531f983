"""pack_host_inputs / HostLayout.unpack: a step's arrays survive the trip through one int32 buffer bit for bit."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from neo_jax.host_inputs import pack_host_inputs


def test_arrays_of_every_width_4_dtype_come_back_exactly():
    rng = np.random.default_rng(0)
    tree = {"ids": rng.integers(-5, 5, (3, 4)).astype(np.int32), "empty": np.zeros((0, 2), np.int32),
            "probs": np.array([0.1, -0.0, np.inf, np.nan], np.float32), "seeds": np.array([2**32 - 1, 7], np.uint32),
            "scalar": np.array(3, np.int32)}
    packed, layout = pack_host_inputs(tree)
    assert packed.dtype == np.int32 and packed.shape == (12 + 4 + 2 + 1,)
    unpacked = jax.jit(layout.unpack)(packed)
    assert jax.tree.structure(unpacked) == jax.tree.structure(tree)
    for name, array in tree.items():
        assert unpacked[name].dtype == array.dtype and unpacked[name].shape == array.shape
        assert np.asarray(unpacked[name]).tobytes() == array.tobytes()


def test_equal_layouts_hash_alike_so_steps_reuse_their_program():
    make = lambda value: {"a": np.full(3, value, np.int32), "b": np.full((2, 2), value, np.float32)}
    (_, first), (_, second) = pack_host_inputs(make(1)), pack_host_inputs(make(2))
    assert first == second and hash(first) == hash(second)
    assert pack_host_inputs({"a": np.zeros(4, np.int32)})[1] != pack_host_inputs({"a": np.zeros(5, np.int32)})[1]


def test_other_widths_are_refused():
    with pytest.raises(ValueError, match="4-byte dtype, got int64"):
        pack_host_inputs([np.zeros(2, np.int64)])
