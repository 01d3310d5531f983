"""The paged decode attention reference against a float64 NumPy oracle on random inputs."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from neo_jax.kernels.paged_attention import (FFI_TARGET, CudaLaunch, _cuda, cuda_kernel_unsupported_reason,
                                             cuda_launch, paged_decode_attention, paged_decode_attention_cuda,
                                             paged_decode_attention_reference)


def numpy_attention(q, k_cache, v_cache, block_tables, context_lens, scale=None):
    batch, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    scale = 1 / np.sqrt(head_dim) if scale is None else scale
    out = np.zeros((batch, num_heads, head_dim))
    for b in range(batch):
        n = context_lens[b]
        if n == 0:
            continue
        slots = [(block_tables[b][i // block_size], i % block_size) for i in range(n)]
        for h in range(num_heads):
            kv = h // (num_heads // num_kv_heads)
            keys = np.stack([k_cache[blk, kv, off] for blk, off in slots]).astype(np.float64)
            values = np.stack([v_cache[blk, kv, off] for blk, off in slots]).astype(np.float64)
            scores = keys @ q[b, h].astype(np.float64) * scale
            weights = np.exp(scores - scores.max())
            out[b, h] = weights @ values / weights.sum()
    return out


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("dtype, atol", [(np.float32, 1e-5), (ml_dtypes.bfloat16, 2e-2)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_reference_matches_numpy(num_heads: int, num_kv_heads: int, dtype, atol: float, block_size: int) -> None:
    rng = np.random.default_rng(num_heads * 100 + block_size)
    batch, head_dim, num_blocks, max_blocks = 5, 64, 40, 8
    context_lens = np.array([1, 0, block_size, 3 * block_size + 5, max_blocks * block_size], np.int32)
    block_tables = np.stack([rng.permutation(num_blocks)[:max_blocks] for _ in range(batch)]).astype(np.int32)
    q = rng.standard_normal((batch, num_heads, head_dim)).astype(dtype)
    k_cache = rng.standard_normal((num_blocks, num_kv_heads, block_size, head_dim)).astype(dtype)
    v_cache = rng.standard_normal((num_blocks, num_kv_heads, block_size, head_dim)).astype(dtype)
    expected = numpy_attention(q, k_cache, v_cache, block_tables, context_lens)
    for attention in (paged_decode_attention_reference, paged_decode_attention):
        out = attention(jnp.asarray(q), jnp.asarray(k_cache), jnp.asarray(v_cache), jnp.asarray(block_tables),
                        jnp.asarray(context_lens))
        assert out.dtype == jnp.dtype(dtype) and out.shape == q.shape
        np.testing.assert_allclose(np.asarray(out, np.float64), expected, atol=atol)


def random_inputs(batch=3, num_heads=8, num_kv_heads=2, head_dim=64, block_size=16, num_blocks=12, max_blocks=4,
                  dtype=jnp.bfloat16):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((batch, num_heads, head_dim)), dtype)
    k_cache = jnp.asarray(rng.standard_normal((num_blocks, num_kv_heads, block_size, head_dim)), dtype)
    v_cache = jnp.asarray(rng.standard_normal((num_blocks, num_kv_heads, block_size, head_dim)), dtype)
    block_tables = jnp.asarray(rng.integers(0, num_blocks, (batch, max_blocks)), jnp.int32)
    context_lens = jnp.asarray(rng.integers(0, max_blocks * block_size + 1, batch), jnp.int32)
    return q, k_cache, v_cache, block_tables, context_lens


def test_scale_is_applied() -> None:
    inputs = random_inputs(dtype=jnp.float32)
    expected = numpy_attention(*(np.asarray(x) for x in inputs), scale=0.3)
    np.testing.assert_allclose(paged_decode_attention(*inputs, scale=0.3), expected, atol=1e-5)


@pytest.mark.parametrize("name, change, message", [
    ("q", lambda x: (x[0][0],) + x[1:], "q must be"),
    ("k_cache", lambda x: (x[0], x[1][0], x[2][0]) + x[3:], "k_cache must be"),
    ("v_cache", lambda x: x[:2] + (x[2][:, :1],) + x[3:], "v_cache shape"),
    ("head_dim", lambda x: (x[0][..., :32],) + x[1:], "head_dim"),
    ("heads", lambda x: (x[0][:, :3],) + x[1:], "not a multiple"),
    ("block_tables", lambda x: x[:3] + (x[3].astype(jnp.float32),) + x[4:], "block_tables must be int32"),
    ("context_lens", lambda x: x[:4] + (x[4][:2],), "context_lens must be int32"),
])
def test_bad_inputs_name_the_tensor(name: str, change, message: str) -> None:
    for attention in (paged_decode_attention, paged_decode_attention_reference):
        with pytest.raises(ValueError, match=message):
            attention(*change(random_inputs()))


def custom_call_targets(platform: str, *inputs) -> list[str]:
    lowered = jax.jit(paged_decode_attention).trace(*inputs).lower(lowering_platforms=(platform,))
    return re.findall(r"stablehlo.custom_call @(\w+)", lowered.as_text())


@pytest.mark.skipif(_cuda is None, reason="the CUDA extension was not built here")
def test_dispatcher_lowers_to_the_cuda_kernel_and_the_cpu_op() -> None:
    inputs = random_inputs()
    assert custom_call_targets("cuda", *inputs) == [FFI_TARGET]
    assert custom_call_targets("cpu", *inputs) == ["neo_paged_decode_attention"]


@pytest.mark.parametrize("head_dim, block_size, dtype, unsupported", [
    (64, 16, jnp.bfloat16, None), (128, 32, jnp.float16, None), (128, 16, jnp.float32, None),
    (96, 16, jnp.bfloat16, "head_dim 96"), (64, 8, jnp.bfloat16, "block_size 8"),
])
def test_unsupported_shapes_take_the_reference_on_cuda(head_dim: int, block_size: int, dtype,
                                                       unsupported: str | None) -> None:
    inputs = random_inputs(head_dim=head_dim, block_size=block_size, dtype=dtype)
    reason = cuda_kernel_unsupported_reason(inputs[0], inputs[1])
    if _cuda is None:
        assert "not built" in reason
    elif unsupported is None:
        assert reason is None and custom_call_targets("cuda", *inputs) == [FFI_TARGET]
    else:
        assert unsupported in reason and custom_call_targets("cuda", *inputs) == []
        with pytest.raises(ValueError, match=unsupported):
            paged_decode_attention_cuda(*inputs)


def test_mixed_dtypes_take_the_reference() -> None:
    q, k_cache, v_cache, block_tables, context_lens = random_inputs()
    reason = cuda_kernel_unsupported_reason(q.astype(jnp.float32), k_cache)
    assert "dtypes" in reason or "not built" in reason
    out = paged_decode_attention(q.astype(jnp.float32), k_cache, v_cache, block_tables, context_lens)
    assert out.dtype == jnp.float32


@pytest.mark.parametrize("batch, num_heads, block_size, max_blocks, partition_blocks, expected", [
    (1, 32, 16, 64, 0, CudaLaunch(group_tile=4, partition_blocks=4, num_splits=16)),  # split to fill the SMs
    (256, 32, 16, 64, 0, CudaLaunch(group_tile=4, partition_blocks=32, num_splits=2)),  # capped at 512 tokens
    (256, 32, 32, 64, 0, CudaLaunch(group_tile=4, partition_blocks=16, num_splits=4)),
    (4, 8, 16, 3, 0, CudaLaunch(group_tile=1, partition_blocks=3, num_splits=1)),  # fewer blocks than warps
    (2, 24, 16, 100, 7, CudaLaunch(group_tile=4, partition_blocks=7, num_splits=15)),  # group 3 in a tile of 4
    (2, 96, 16, 100, 64, CudaLaunch(group_tile=8, partition_blocks=32, num_splits=4)),  # group 12: two tiles
])
def test_cuda_launch(batch: int, num_heads: int, block_size: int, max_blocks: int, partition_blocks: int,
                     expected: CudaLaunch) -> None:
    launch = cuda_launch(batch, num_heads, 8, block_size, max_blocks, partition_blocks, num_multiprocessors=132)
    assert launch == expected
