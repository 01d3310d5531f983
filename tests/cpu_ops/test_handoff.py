"""The host KV pool and the handoff custom calls on JAX's CPU backend: the CPU-platform handlers
compute in place, so a jitted scan over layers must give exactly what the NumPy op gives."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from neo_jax.cpu_ops import paged_decode_attention
from neo_jax.cpu_ops import handoff

NUM_LAYERS, NUM_BLOCKS, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM = 3, 24, 2, 16, 64
NUM_Q_HEADS, MAX_BLOCKS = 8, 4


def make_pool(dtype, rng) -> handoff.HostKvPool:
    pool = handoff.HostKvPool(NUM_LAYERS, NUM_BLOCKS, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM, dtype)
    pool.k_cache[...] = rng.standard_normal(pool.k_cache.shape).astype(dtype)
    pool.v_cache[...] = rng.standard_normal(pool.v_cache.shape).astype(dtype)
    return pool


def decode_batch(rng, context_lens):
    """Block tables over shuffled blocks and the slot of each request's newest token (-1 for
    padding requests, whose context length is 0)."""
    context_lens = np.asarray(context_lens, np.int32)
    blocks = rng.permutation(NUM_BLOCKS)[: len(context_lens) * MAX_BLOCKS].astype(np.int32)
    block_tables = blocks.reshape(len(context_lens), MAX_BLOCKS)
    last = np.maximum(context_lens - 1, 0)
    slots = block_tables[np.arange(len(context_lens)), last // BLOCK_SIZE] * BLOCK_SIZE + last % BLOCK_SIZE
    slots = np.where(context_lens > 0, slots, -1).astype(np.int32)
    return block_tables, context_lens, slots


@pytest.mark.parametrize("kv_dtype,q_dtype", [(ml_dtypes.bfloat16, ml_dtypes.bfloat16),
                                              (np.float32, np.float32),
                                              (ml_dtypes.bfloat16, np.float32)])  # packed side by side
def test_scan_over_layers_matches_numpy_op(kv_dtype, q_dtype):
    rng = np.random.default_rng(0)
    pool = make_pool(kv_dtype, rng)
    block_tables, context_lens, slots = decode_batch(rng, [1, 17, 64, 0, 40])
    n = len(context_lens)
    q = rng.standard_normal((NUM_LAYERS, n, NUM_Q_HEADS, HEAD_DIM)).astype(q_dtype)
    k_new = rng.standard_normal((NUM_LAYERS, n, NUM_KV_HEADS, HEAD_DIM)).astype(kv_dtype)
    v_new = rng.standard_normal((NUM_LAYERS, n, NUM_KV_HEADS, HEAD_DIM)).astype(kv_dtype)
    weight = jnp.asarray(rng.standard_normal((32, 32)), jnp.float32) / 8

    @jax.jit
    def step(x, q, k_new, v_new):
        def layer_step(x, inputs):
            layer, q, k, v = inputs
            pending = handoff.cpu_attention_start(pool, q, k, v, layer, slots, block_tables, context_lens)
            x = jnp.tanh((x + pending.token.astype(x.dtype) * 0) @ weight)
            return x, handoff.cpu_attention_wait(pending, x)

        return jax.lax.scan(layer_step, x, (jnp.arange(NUM_LAYERS), q, k_new, v_new))

    _, out = step(jnp.ones((4, 32)), q, k_new, v_new)
    out = np.asarray(out)
    assert out.dtype == np.dtype(q_dtype)
    used = slots >= 0
    for layer in range(NUM_LAYERS):
        k_layer = pool.k_cache[layer].transpose(0, 2, 1, 3).reshape(-1, NUM_KV_HEADS, HEAD_DIM)
        np.testing.assert_array_equal(k_layer[slots[used]], k_new[layer][used])
        expected = paged_decode_attention(q[layer], pool.k_cache[layer], pool.v_cache[layer],
                                          block_tables, context_lens)
        np.testing.assert_array_equal(out[layer], expected)
    assert not out[:, context_lens == 0].any()


def test_store_then_load_round_trip_with_padding():
    rng = np.random.default_rng(1)
    pool = handoff.HostKvPool(2, 8, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM, np.float16)
    store_slots = np.array([5, 100, -1, 33], np.int32)
    k_rows = rng.standard_normal((4, NUM_KV_HEADS, HEAD_DIM)).astype(np.float16)
    v_rows = rng.standard_normal((4, NUM_KV_HEADS, HEAD_DIM)).astype(np.float16)
    load_slots = np.array([33, -1, 5, 100, 7], np.int32)

    @jax.jit
    def store_and_load(k_rows, v_rows):
        token = handoff.host_kv_store(pool, k_rows, v_rows, 1, store_slots)
        return handoff.host_kv_load(pool, 1, load_slots, dep=token)

    k_loaded, v_loaded = (np.asarray(rows) for rows in store_and_load(k_rows, v_rows))
    source = {5: 0, 100: 1, 33: 3}
    for row, slot in enumerate(load_slots):
        if slot in source:
            np.testing.assert_array_equal(k_loaded[row], k_rows[source[slot]])
            np.testing.assert_array_equal(v_loaded[row], v_rows[source[slot]])
        else:
            assert not k_loaded[row].any() and not v_loaded[row].any()
    assert not pool.k_cache[0].any(), "layer 0 was not named"
    written = pool.k_cache[1].transpose(0, 2, 1, 3).reshape(-1, NUM_KV_HEADS, HEAD_DIM)
    assert np.count_nonzero(written.any(axis=(1, 2))) == 3


def test_store_and_load_with_a_layer_per_row_move_many_layers_in_one_call():
    rng = np.random.default_rng(2)
    pool = handoff.HostKvPool(NUM_LAYERS, 8, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM, np.float32)
    layers = np.array([2, 2, 0, 1, 1, 2, 0], np.int32)  # runs of one layer, in any order
    slots = np.array([3, 40, 3, -1, 127, 64, 9], np.int32)
    k_rows, v_rows = (rng.standard_normal((len(slots), NUM_KV_HEADS, HEAD_DIM)).astype(np.float32) for _ in "kv")

    @jax.jit
    def store_and_load(k_rows, v_rows):
        token = handoff.host_kv_store(pool, k_rows, v_rows, layers, slots)
        return handoff.host_kv_load(pool, layers[::-1].copy(), slots[::-1].copy(), dep=token)

    k_loaded, v_loaded = (np.asarray(rows) for rows in store_and_load(k_rows, v_rows))
    expected_k, expected_v = np.zeros_like(k_rows), np.zeros_like(v_rows)
    for row, (layer, slot) in enumerate(zip(layers, slots)):
        if slot >= 0:
            block, offset = divmod(slot, BLOCK_SIZE)
            np.testing.assert_array_equal(pool.k_cache[layer, block, :, offset], k_rows[row])
            expected_k[row], expected_v[row] = k_rows[row], v_rows[row]
    np.testing.assert_array_equal(k_loaded, expected_k[::-1])
    np.testing.assert_array_equal(v_loaded, expected_v[::-1])
    assert np.count_nonzero(pool.k_cache.any(axis=(2, 4))) == 6, "only the named (layer, slot) rows are written"


@pytest.mark.parametrize("layers,slots,match", [
    ([0, 3], [0, 1], r"host_kv_store: layer\[1\] = 3 is outside \[0, 3\)"),
    ([0, 1], [0, 8 * BLOCK_SIZE], r"slot_mapping.*\(indices from row 1, the first of layer 1\)"),
])
def test_store_with_a_bad_row_writes_nothing(layers, slots, match):
    pool = handoff.HostKvPool(NUM_LAYERS, 8, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM, np.float32)
    rows = jnp.ones((2, NUM_KV_HEADS, HEAD_DIM), jnp.float32)
    with pytest.raises(Exception, match=match):
        jax.block_until_ready(jax.jit(lambda: handoff.host_kv_store(
            pool, rows, rows, np.array(layers, np.int32), np.array(slots, np.int32)))())
    assert not pool.k_cache.any(), "a rejected store must not write its good rows either"


def test_layer_must_be_a_scalar_or_one_per_row():
    pool = handoff.HostKvPool(NUM_LAYERS, 8, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM, np.float32)
    with pytest.raises(ValueError, match=r"host_kv_load: layer must be an integer array of shape \[\] or \[2\]"):
        handoff.host_kv_load(pool, jnp.zeros((3,), jnp.int32), jnp.zeros((2,), jnp.int32))


def test_pool_views_and_memory():
    pool = handoff.HostKvPool(2, 4, 3, 8, 16, jnp.bfloat16)
    assert pool.k_cache.shape == pool.v_cache.shape == (2, 4, 3, 8, 16)
    assert pool.k_cache.dtype == ml_dtypes.bfloat16
    assert not pool.k_cache.any() and not pool.v_cache.any()
    assert pool.num_slots == 32
    assert pool.pinned == handoff.cuda_handoff_available()
    assert pool.k_cache.ctypes.data % 64 == 0
    pool.v_cache[1, 2, 0, 5] = 1.5
    k_rows, v_rows = jax.jit(lambda: handoff.host_kv_load(pool, 1, jnp.array([2 * 8 + 5], jnp.int32)))()
    assert float(v_rows[0, 0, 0]) == 1.5 and not np.asarray(k_rows).any()


@pytest.mark.parametrize("args,error,match", [
    ((0, 4, 2, 16, 64, np.float32), ValueError, "num_layers must be positive, got 0"),
    ((1, 4, 2, -16, 64, np.float32), ValueError, "block_size must be positive"),
    ((1, 4, 2, 16, 64, np.int32), ValueError, "dtype must be float32, float16 or bfloat16"),
    ((2**20, 2**30, 2**10, 2**10, 2**10, np.float32), MemoryError, "overflows 64 bits"),
])
def test_pool_rejects_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        handoff.HostKvPool(*args)


def start_args(n=2, **changes):
    args = dict(q=jnp.zeros((n, NUM_Q_HEADS, HEAD_DIM), jnp.float32),
                k_new=jnp.zeros((n, NUM_KV_HEADS, HEAD_DIM), jnp.float32),
                v_new=jnp.zeros((n, NUM_KV_HEADS, HEAD_DIM), jnp.float32),
                layer=0, slot_mapping=jnp.arange(n, dtype=jnp.int32),
                block_tables=jnp.zeros((n, MAX_BLOCKS), jnp.int32),
                context_lens=jnp.ones((n,), jnp.int32))
    args.update(changes)
    return args


@pytest.mark.parametrize("changes,match", [
    (dict(q=jnp.zeros((2, NUM_Q_HEADS, 32))), "q must be"),
    (dict(q=jnp.zeros((2, 3, HEAD_DIM))), "q has 3 heads"),
    (dict(k_new=jnp.zeros((2, NUM_KV_HEADS, HEAD_DIM), jnp.float16)), "k_new must be float32"),
    (dict(v_new=jnp.zeros((3, NUM_KV_HEADS, HEAD_DIM))), "v_new must be float32"),
    (dict(slot_mapping=jnp.zeros((3,), jnp.int32)), "slot_mapping has 3 rows"),
    (dict(block_tables=jnp.zeros((2,), jnp.int32)), "block_tables must be an integer array of rank 2"),
    (dict(context_lens=jnp.ones((2,), jnp.float32)), "context_lens must be an integer array"),
])
def test_start_rejects_bad_shapes(changes, match):
    pool = handoff.HostKvPool(1, NUM_BLOCKS, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM, np.float32)
    with pytest.raises(ValueError, match=match):
        handoff.cpu_attention_start(pool, **start_args(**changes))


def raw_start(pool, rows, requests, num_reqs=2, num_q_heads=NUM_Q_HEADS, q_dtype="float32"):
    """The start's custom call on packed operands, past cpu_attention_start's own checks."""
    call = jax.ffi.ffi_call("neo_cpu_attention_start", jax.ShapeDtypeStruct((), jnp.int32), has_side_effect=True)
    return call(rows, jnp.zeros((), jnp.int32), requests, jnp.zeros((), jnp.int32), pool_id=np.int64(pool.pool_id),
                num_reqs=np.int64(num_reqs), num_q_heads=np.int64(num_q_heads), q_dtype=q_dtype)


ROWS_BYTES = 2 * (NUM_Q_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM * 4  # two float32 requests
REQUESTS = jnp.zeros((2 * (2 + MAX_BLOCKS),), jnp.int32)


@pytest.mark.parametrize("rows,requests,attributes,match", [
    (jnp.zeros((ROWS_BYTES + 4,), jnp.uint8), REQUESTS, {},
     rf"rows must be uint8 \[{ROWS_BYTES}\] \(q, k_new and v_new of 2 requests, 8 q heads in float32, 2 kv heads "
     rf"in float32\), got \[{ROWS_BYTES + 4}\]"),
    (jnp.zeros((ROWS_BYTES // 4,), jnp.float32), REQUESTS, {}, "rows must be uint8"),
    (jnp.zeros((ROWS_BYTES,), jnp.uint8), REQUESTS[:-1], {},
     r"requests must be int32 \[num_reqs \* \(2 \+ max_blocks\)\] .* for num_reqs = 2, got \[11\]"),
    (jnp.zeros((ROWS_BYTES,), jnp.uint8), REQUESTS, dict(num_q_heads=3), "q has 3 heads"),
    (jnp.zeros((ROWS_BYTES,), jnp.uint8), REQUESTS, dict(q_dtype="int8"), "q_dtype must be"),
    (jnp.zeros((ROWS_BYTES,), jnp.uint8), REQUESTS, dict(num_reqs=-1), "num_reqs must be >= 0"),
])
def test_handlers_check_the_packed_operands_themselves(rows, requests, attributes, match):
    pool = handoff.HostKvPool(1, NUM_BLOCKS, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM, np.float32)
    with pytest.raises(Exception, match=match):
        jax.block_until_ready(raw_start(pool, rows, requests, **attributes))
    assert not pool.k_cache.any()


@pytest.mark.parametrize("changes,match", [
    (dict(layer=1), r"layer 1 is outside \[0, 1\)"),
    (dict(block_tables=jnp.full((2, MAX_BLOCKS), NUM_BLOCKS, jnp.int32)), "block_tables"),
    (dict(slot_mapping=jnp.array([0, NUM_BLOCKS * BLOCK_SIZE], jnp.int32)), "slot_mapping"),
    (dict(context_lens=jnp.array([1, MAX_BLOCKS * BLOCK_SIZE + 1], jnp.int32)), "context_lens"),
])
def test_start_rejects_bad_contents(changes, match):
    pool = handoff.HostKvPool(1, NUM_BLOCKS, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM, np.float32)
    with pytest.raises(Exception, match=match):
        jax.block_until_ready(jax.jit(lambda: handoff.cpu_attention_wait(
            handoff.cpu_attention_start(pool, **start_args(**changes)), jnp.zeros(())))())
    assert not pool.k_cache.any(), "a rejected call must not append"


def test_closed_pool_is_refused_at_trace_and_run_time():
    pool = handoff.HostKvPool(1, NUM_BLOCKS, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM, np.float32)
    rows = jnp.zeros((1, NUM_KV_HEADS, HEAD_DIM), jnp.float32)
    store = jax.jit(lambda rows: handoff.host_kv_store(pool, rows, rows, 0, jnp.zeros((1,), jnp.int32)))
    jax.block_until_ready(store(rows))
    pool.close()
    with pytest.raises(Exception, match=f"pool_id {pool.pool_id} is not a live HostKvPool"):
        jax.block_until_ready(store(rows))
    with pytest.raises(ValueError, match="the HostKvPool was closed"):
        handoff.host_kv_load(pool, 0, jnp.zeros((1,), jnp.int32))


def test_wait_needs_a_started_call():
    pool = handoff.HostKvPool(1, NUM_BLOCKS, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM, np.float32)
    args = start_args()
    pending = handoff.PendingAttention(jnp.array(-5, jnp.int32), args["q"].shape, args["q"].dtype, pool.pool_id)
    with pytest.raises(Exception, match="names no pending cpu_attention_start"):
        jax.block_until_ready(jax.jit(handoff.cpu_attention_wait)(pending, jnp.zeros(())))


def test_interpreter_exits_cleanly_after_handoff_calls():
    script = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from neo_jax.cpu_ops import handoff
        pool = handoff.HostKvPool(1, 4, 1, 16, 64, np.float32)
        rows = jnp.ones((1, 1, 64), jnp.float32)
        p = handoff.cpu_attention_start(pool, jnp.ones((1, 1, 64)), rows, rows, 0,
                                        jnp.zeros(1, jnp.int32), jnp.zeros((1, 1), jnp.int32),
                                        jnp.ones(1, jnp.int32))
        print(float(handoff.cpu_attention_wait(p, rows).sum()))
        handoff.synchronize()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "64.0"
