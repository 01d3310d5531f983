"""Every inconsistent argument is rejected, naming it, before the op touches any memory."""

from __future__ import annotations

import jax
import ml_dtypes
import numpy as np
import pytest

from attention_reference import make_batch
from neo_jax import cpu_ops

BF16 = ml_dtypes.bfloat16


def decode_args():
    batch = make_batch(np.random.default_rng(0), [20, 40], 2, 4, 64, 16, BF16, BF16)
    return {
        "q": batch.q,
        "k_cache": batch.k_cache,
        "v_cache": batch.v_cache,
        "block_tables": batch.block_tables,
        "context_lens": batch.context_lens,
        "out": np.full(batch.q.shape, np.nan, BF16),
    }


def read_only(array):
    array = array.copy()
    array.flags.writeable = False
    return array


def block_id(value):
    def edit(args):
        args["block_tables"][1, 2] = value  # the last block request 1 (40 tokens) uses

    return edit


DECODE_CASES = {
    "q list": (lambda a: a.update(q=a["q"].tolist()), TypeError, "q must be a numpy.ndarray"),
    "q rank": (lambda a: a.update(q=a["q"][0]), ValueError, "q must be 3-d"),
    "q int32": (lambda a: a.update(q=a["q"].astype(np.int32)), ValueError, "q must be float32"),
    "q float64": (lambda a: a.update(q=a["q"].astype(np.float64)), ValueError, "q has unsupported dtype float64"),
    "q strided": (lambda a: a.update(q=a["q"][:, ::2]), ValueError, "q must be C-contiguous"),
    "q head_dim": (lambda a: a.update(q=a["q"][:, :, :32].copy()), ValueError, "q shape .* axis 2"),
    "q heads": (lambda a: a.update(q=a["q"][:, :7].copy()), ValueError, "q has 7 heads"),
    "k_cache rank": (lambda a: a.update(k_cache=a["k_cache"][0]), ValueError, "k_cache must be 4-d"),
    "k_cache empty": (lambda a: a.update(k_cache=a["k_cache"][:, :, :0].copy(), v_cache=a["v_cache"][:, :, :0].copy()),
                      ValueError, "k_cache shape .* empty axis 2"),
    "v_cache dtype": (lambda a: a.update(v_cache=a["v_cache"].astype(np.float16)), ValueError, "v_cache dtype float16"),
    "v_cache shape": (lambda a: a.update(v_cache=a["v_cache"][:-1].copy()), ValueError, "v_cache shape"),
    "block_tables int64": (lambda a: a.update(block_tables=a["block_tables"].astype(np.int64)), ValueError,
                           "block_tables has unsupported dtype int64"),
    "block_tables rows": (lambda a: a.update(block_tables=a["block_tables"][:1].copy()), ValueError,
                          "block_tables shape .* axis 0"),
    "context_lens rows": (lambda a: a.update(context_lens=a["context_lens"][:1].copy()), ValueError,
                          "context_lens shape .* axis 0"),
    "context_lens int64": (lambda a: a.update(context_lens=a["context_lens"].astype(np.int64)), ValueError,
                           "context_lens has unsupported dtype int64"),
    "context_lens negative": (lambda a: a["context_lens"].__setitem__(0, -1), ValueError, r"context_lens\[0\] = -1"),
    "context_lens too long": (lambda a: a["context_lens"].__setitem__(1, 10**6), ValueError,
                              r"context_lens\[1\] = 1000000 is outside"),
    "block id negative": (block_id(-1), ValueError, r"block_tables\[1, 2\] = -1 is outside"),
    "block id past the cache": (block_id(10**6), ValueError, r"block_tables\[1, 2\] = 1000000 is outside"),
    "out dtype": (lambda a: a.update(out=a["out"].astype(np.float32)), ValueError, "out dtype float32"),
    "out shape": (lambda a: a.update(out=a["out"][:1].copy()), ValueError, "out shape"),
    "out read-only": (lambda a: a.update(out=read_only(a["out"])), ValueError, "out must be writable"),
}


@pytest.mark.parametrize("case", DECODE_CASES, ids=list(DECODE_CASES))
def test_decode_rejects(case):
    edit, error, message = DECODE_CASES[case]
    args = decode_args()
    poisoned_out = args["out"]
    edit(args)
    with pytest.raises(error, match=message):
        cpu_ops.paged_decode_attention(**args)
    assert np.isnan(poisoned_out.astype(np.float32)).all()


@pytest.mark.parametrize("scale", [float("nan"), float("inf")])
def test_decode_rejects_non_finite_scale(scale):
    with pytest.raises(ValueError, match="scale must be finite"):
        cpu_ops.paged_decode_attention(**decode_args(), scale=scale)


def test_decode_rejects_unknown_or_unavailable_isa():
    with pytest.raises(ValueError, match="isa must be one of"):
        cpu_ops.paged_decode_attention(**decode_args(), isa="sse9")
    missing = [isa for isa in ("avx2", "avx512", "avx512_bf16") if isa not in cpu_ops.available_isas()]
    for isa in missing:
        with pytest.raises(ValueError, match=f"isa '{isa}' is not available"):
            cpu_ops.paged_decode_attention(**decode_args(), isa=isa)


def append_args():
    rng = np.random.default_rng(1)
    shape = (6, 2, 16, 64)
    return {
        "k_cache": rng.standard_normal(shape).astype(BF16),
        "v_cache": rng.standard_normal(shape).astype(BF16),
        "k_new": rng.standard_normal((3, 2, 64)).astype(BF16),
        "v_new": rng.standard_normal((3, 2, 64)).astype(BF16),
        "slot_mapping": np.array([0, 17, 95], np.int32),
    }


def slot(value):
    return lambda a: a["slot_mapping"].__setitem__(2, value)


APPEND_CASES = {
    "k_cache read-only": (lambda a: a.update(k_cache=read_only(a["k_cache"])), "k_cache must be writable"),
    "v_cache shape": (lambda a: a.update(v_cache=a["v_cache"][:-1].copy()), "v_cache shape"),
    "k_new dtype": (lambda a: a.update(k_new=a["k_new"].astype(np.float32)), "k_new dtype float32 does not match"),
    "k_new heads": (lambda a: a.update(k_new=a["k_new"][:, :1].copy()), "k_new shape .* axis 1"),
    "k_new head_dim": (lambda a: a.update(k_new=a["k_new"][:, :, :8].copy()), "k_new shape .* axis 2"),
    "v_new shape": (lambda a: a.update(v_new=a["v_new"][:2].copy()), "v_new shape"),
    "slot_mapping int64": (lambda a: a.update(slot_mapping=a["slot_mapping"].astype(np.int64)),
                           "slot_mapping has unsupported dtype int64"),
    "slot_mapping length": (lambda a: a.update(slot_mapping=a["slot_mapping"][:2].copy()),
                            "slot_mapping shape .* axis 0"),
    "slot past the cache": (slot(96), r"slot_mapping\[2\] = 96 is outside"),
    "slot below -1": (slot(-2), r"slot_mapping\[2\] = -2 is outside"),
    "slot repeated": (slot(17), "slot_mapping holds slot 17 more than once"),
}


@pytest.mark.parametrize("case", APPEND_CASES, ids=list(APPEND_CASES))
def test_append_rejects_and_leaves_the_cache_alone(case):
    edit, message = APPEND_CASES[case]
    args = append_args()
    k_cache, v_cache = args["k_cache"], args["v_cache"]
    k_before, v_before = k_cache.copy(), v_cache.copy()
    edit(args)
    with pytest.raises(ValueError, match=message):
        cpu_ops.append_kv(**args)
    np.testing.assert_array_equal(k_cache, k_before)
    np.testing.assert_array_equal(v_cache, v_before)


FFI_ERRORS = (ValueError, jax.errors.JaxRuntimeError)


def test_ffi_decode_reports_the_argument():
    args = decode_args()
    del args["out"]
    args["block_tables"][0, 1] = 99
    with pytest.raises(FFI_ERRORS, match=r"block_tables\[0, 1\] = 99 is outside"):
        jax.block_until_ready(jax.jit(cpu_ops.jax_paged_decode_attention)(**args))
    args = decode_args()
    del args["out"]
    with pytest.raises(FFI_ERRORS, match="q shape .* axis 2 must be k_cache's head_dim"):
        jax.jit(cpu_ops.jax_paged_decode_attention)(args["q"][:, :, :32].copy(), *list(args.values())[1:])


def test_ffi_append_reports_the_argument():
    args = append_args()
    args["slot_mapping"][1] = 0
    with pytest.raises(FFI_ERRORS, match="slot_mapping holds slot 0 more than once"):
        jax.block_until_ready(jax.jit(cpu_ops.jax_append_kv)(**args))
