"""The host KV pool and the custom calls that run CPU decode attention inside a jitted step.

A `HostKvPool` holds the K and V caches of every layer in host memory (pinned when a GPU is
present). Jitted code reaches it through four custom calls, registered at import for the CPU
platform and, when libcuda loads, for CUDA:

- `cpu_attention_start` appends this step's K/V rows into the pool and starts paged decode
  attention on the CPU; `cpu_attention_wait` returns its output. On a GPU the CPU works while
  the GPU runs whatever XLA schedules between the two; on the CPU backend both compute at once.
- `host_kv_store` writes K/V rows (a prefill's, or blocks swapped out of the GPU cache) into the
  pool, `host_kv_load` reads rows back (swap-in).

To overlap, keep XLA from sinking the start down to the wait. XLA orders instructions by their operands
alone (an `optimization_barrier` did not hold a start back), so make the overlapped work read the token::

    pending = cpu_attention_start(pool, q1, k1, v1, layer, slots1, tables1, lens1)
    x0 = x0 + pending.token.astype(x0.dtype) * 0   # XLA cannot fold 0 x a float away
    y0 = gpu_layer(x0)                        # batch-0's work while the CPU runs batch-1's attention
    out1 = cpu_attention_wait(pending, y0)    # y0: computed before the wait

(`neo_jax.sharded_host_attention.computed_after` does this per tensor-parallel shard.)

The calls declare no side effect: an effect sends every call of the jitted function through JAX's Python
dispatch (no C++ fast path); in an H200 profile that was most of the 13 ms by which a pipelined step with one
CPU request outlasted the GPU-only step, whose GPU time it matched. So they are pure to XLA: a call
whose result nothing reads is removed, calls with identical operands may be merged, and a value computed the
same way every time (a loop-invariant token) may be folded to a constant. Pass each store's token on (a later
call's `dep`, or into an output) and wait for every start; two starts need different operands (in practice
they always differ in q or layer). A later write into blocks that a load read takes `token_after(rows)`.

The start packs its seven operands into three (q, k_new and v_new as bytes; slot_mapping, context_lens and
block_tables as one int32 array; the layer): on a GPU each operand costs the call a device copy, and a call
comes every layer.

Padding: slot -1 is skipped by appends and stores (a load gives a zero row for it); a request with
context length 0 gets a zero output row.
"""

from __future__ import annotations

import atexit
import dataclasses
import weakref

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from neo_jax.cpu_ops import _C

_POOL_DTYPES = {
    np.dtype(np.float32): "float32",
    np.dtype(np.float16): "float16",
    np.dtype(ml_dtypes.bfloat16): "bfloat16",
}

# A host_kv_store whose operands fit this many bytes is staged on the GPU: XLA's stream does not wait for the rows'
# copy to the host (larger stores make it wait). The rows, their indices and alignment count.
HANDOFF_DEVICE_STAGING_BYTES: int = _C.HANDOFF_DEVICE_STAGING_BYTES

_ATTENTION_START = "neo_cpu_attention_start"
_ATTENTION_WAIT = "neo_cpu_attention_wait"
_KV_STORE = "neo_host_kv_store"
_KV_LOAD = "neo_host_kv_load"

_HANDLERS = _C.handoff_handlers()
for _name, _platforms in _HANDLERS.items():
    for _platform, _capsule in _platforms.items():
        jax.ffi.register_ffi_target(_name, _capsule, platform=_platform)

# Let the CPU finish the calls a GPU has queued (or release the GPU from them) before JAX and the
# driver tear down; registered after JAX's own exit hooks, so it runs before them.
atexit.register(_C.handoff_shutdown, 5.0)


class HostKvPool:
    """K and V caches of `num_layers` layers in host memory, zeroed.

    `k_cache[layer]` and `v_cache[layer]` are NumPy views (no copy) of shape
    [num_blocks, num_kv_heads, block_size, head_dim], the layout the CPU kernel reads.
    """

    def __init__(self, num_layers: int, num_blocks: int, num_kv_heads: int, block_size: int,
                 head_dim: int, dtype) -> None:
        self.dtype = np.dtype(dtype)
        if self.dtype not in _POOL_DTYPES:
            raise ValueError(f"HostKvPool: dtype must be float32, float16 or bfloat16, got {self.dtype}")
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.num_kv_heads = num_kv_heads
        self.block_size = block_size
        self.head_dim = head_dim
        self.pool_id = _C.host_pool_create(num_layers, num_blocks, num_kv_heads, block_size, head_dim,
                                           _POOL_DTYPES[self.dtype])
        self._release = weakref.finalize(self, _C.host_pool_release, self.pool_id)
        self.pinned = _C.host_pool_pinned(self.pool_id)
        memory = _C.host_pool_memory(self.pool_id).view(self.dtype)
        memory = memory.reshape(2, num_layers, num_blocks, num_kv_heads, block_size, head_dim)
        self.k_cache = memory[0]  # [num_layers, num_blocks, num_kv_heads, block_size, head_dim]
        self.v_cache = memory[1]

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def closed(self) -> bool:
        return not self._release.alive

    def close(self) -> None:
        """Unregisters the pool: later calls naming it fail. The memory stays while views remain."""
        self._release()

    def _check_open(self, op: str) -> None:
        if self.closed:
            raise ValueError(f"{op}: the HostKvPool was closed")

    def _check_rows(self, op: str, name: str, rows: jax.Array, num_rows: int) -> None:
        expected = (num_rows, self.num_kv_heads, self.head_dim)
        if rows.shape != expected or rows.dtype != self.dtype:
            raise ValueError(f"{op}: {name} must be {self.dtype} {list(expected)}, "
                             f"got {rows.dtype} {list(rows.shape)}")


@dataclasses.dataclass(frozen=True)
class PendingAttention:
    """A started CPU attention: its token, and the shape and dtype of its output (q's)."""

    token: jax.Array  # int32 []: the call's number
    out_shape: tuple[int, ...]
    out_dtype: np.dtype
    pool_id: int


jax.tree_util.register_dataclass(PendingAttention, data_fields=["token"],
                                 meta_fields=["out_shape", "out_dtype", "pool_id"])


def _index_array(op: str, name: str, value, ndim: int) -> jax.Array:
    array = jnp.asarray(value)
    if not jnp.issubdtype(array.dtype, jnp.integer) or array.ndim != ndim:
        raise ValueError(f"{op}: {name} must be an integer array of rank {ndim}, "
                         f"got {array.dtype} {list(array.shape)}")
    return array.astype(jnp.int32)


def _layer_array(op: str, layer, num_rows: int) -> jax.Array:
    """`layer` as int32 [] (every row's) or [num_rows] (each row's own)."""
    array = jnp.asarray(layer)
    if not jnp.issubdtype(array.dtype, jnp.integer) or array.ndim > 1 or (array.ndim == 1
                                                                          and array.shape[0] != num_rows):
        raise ValueError(f"{op}: layer must be an integer array of shape [] or [{num_rows}] (one per row), "
                         f"got {array.dtype} {list(array.shape)}")
    return array.astype(jnp.int32)


def _check_length(op: str, name: str, array: jax.Array, length: int) -> None:
    if array.shape[0] != length:
        raise ValueError(f"{op}: {name} has {array.shape[0]} rows, expected {length}")


def _bytes(array: jax.Array) -> jax.Array:
    """uint8 [array.nbytes]: a float array's bytes in row-major order."""
    return jax.lax.bitcast_convert_type(array, jnp.uint8).reshape(-1)


def cpu_attention_start(pool: HostKvPool, q: jax.Array, k_new: jax.Array, v_new: jax.Array, layer,
                        slot_mapping, block_tables, context_lens, dep: jax.Array | None = None) -> PendingAttention:
    """Appends k_new / v_new [n, kv_heads, head_dim] at slot_mapping [n] into `layer` of the pool,
    then starts decode attention of q [n, q_heads, head_dim] over the pool: request i attends to
    its first context_lens[i] tokens (the new one included) through block_tables [n, max_blocks].
    `dep` (e.g. the token of a store into the blocks it reads) must be computed before the call:
    XLA orders custom calls by their operands only (an optimization_barrier does not hold them)."""
    op = "cpu_attention_start"
    pool._check_open(op)
    if q.ndim != 3 or q.shape[2] != pool.head_dim or q.dtype not in _POOL_DTYPES:
        raise ValueError(f"{op}: q must be a float16/bfloat16/float32 [num_reqs, num_q_heads, "
                         f"{pool.head_dim}] array, got {q.dtype} {list(q.shape)}")
    if q.shape[1] % pool.num_kv_heads:
        raise ValueError(f"{op}: q has {q.shape[1]} heads, not a multiple of the pool's "
                         f"{pool.num_kv_heads} kv heads")
    num_reqs = q.shape[0]
    pool._check_rows(op, "k_new", k_new, num_reqs)
    pool._check_rows(op, "v_new", v_new, num_reqs)
    operands = (q, k_new, v_new, _index_array(op, "layer", layer, 0),
                _index_array(op, "slot_mapping", slot_mapping, 1),
                _index_array(op, "block_tables", block_tables, 2),
                _index_array(op, "context_lens", context_lens, 1))
    for name, array in zip(("slot_mapping", "block_tables", "context_lens"), operands[4:]):
        _check_length(op, name, array, num_reqs)
    dep = jnp.zeros((), jnp.int32) if dep is None else dep
    q, k_new, v_new, layer, slot_mapping, block_tables, context_lens = operands
    rows = jnp.concatenate([_bytes(q), _bytes(k_new), _bytes(v_new)])
    requests = jnp.concatenate([slot_mapping, context_lens, block_tables.reshape(-1)])
    token = jax.ffi.ffi_call(_ATTENTION_START, jax.ShapeDtypeStruct((), jnp.int32))(
        rows, layer, requests, dep, pool_id=np.int64(pool.pool_id), num_reqs=np.int64(num_reqs),
        num_q_heads=np.int64(q.shape[1]), q_dtype=_POOL_DTYPES[np.dtype(q.dtype)])
    return PendingAttention(token, q.shape, q.dtype, pool.pool_id)


def cpu_attention_wait(pending: PendingAttention, dep: jax.Array) -> jax.Array:
    """The output [n, q_heads, head_dim] (q's dtype) of a started attention. `dep` is any array
    that must be computed before the wait, e.g. the GPU work meant to overlap the CPU's."""
    return jax.ffi.ffi_call(_ATTENTION_WAIT, jax.ShapeDtypeStruct(pending.out_shape, pending.out_dtype))(
        pending.token, dep, pool_id=np.int64(pending.pool_id))


def host_kv_store(pool: HostKvPool, k_rows: jax.Array, v_rows: jax.Array, layer,
                  slot_mapping) -> jax.Array:
    """Writes k_rows / v_rows [m, kv_heads, head_dim] at slot_mapping [m] into `layer` of the pool (int32 [], or
    [m]: each row's own layer, so that one call moves the rows of many layers).
    Returns an int32 token; unless a later call or an output reads it, XLA drops the store. Later calls
    that take the token as `dep` see the rows; to read them from NumPy on a GPU
    host, call `synchronize()` after the step has finished."""
    op = "host_kv_store"
    pool._check_open(op)
    slot_mapping = _index_array(op, "slot_mapping", slot_mapping, 1)
    pool._check_rows(op, "k_rows", k_rows, slot_mapping.shape[0])
    pool._check_rows(op, "v_rows", v_rows, slot_mapping.shape[0])
    return jax.ffi.ffi_call(_KV_STORE, jax.ShapeDtypeStruct((), jnp.int32))(
        k_rows, v_rows, _layer_array(op, layer, slot_mapping.shape[0]), slot_mapping,
        pool_id=np.int64(pool.pool_id))


def host_kv_load(pool: HostKvPool, layer, slot_mapping, dep: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
    """Reads the K and V rows [m, kv_heads, head_dim] at slot_mapping [m] of `layer` (int32 [], or [m]: each
    row's own layer; slot -1: a zero row). `dep` (e.g. a store's token) must be computed before the load."""
    op = "host_kv_load"
    pool._check_open(op)
    slot_mapping = _index_array(op, "slot_mapping", slot_mapping, 1)
    rows = jax.ShapeDtypeStruct((slot_mapping.shape[0], pool.num_kv_heads, pool.head_dim), pool.dtype)
    dep = jnp.zeros((), jnp.int32) if dep is None else dep
    k_rows, v_rows = jax.ffi.ffi_call(_KV_LOAD, (rows, rows))(
        _layer_array(op, layer, slot_mapping.shape[0]), slot_mapping, dep, pool_id=np.int64(pool.pool_id))
    return k_rows, v_rows


def token_after(rows: jax.Array) -> jax.Array:
    """An int32 [] token computed after `rows` (e.g. a load's): 0 x a float element, which XLA cannot fold."""
    return (rows.reshape(-1)[0].astype(jnp.float32) * 0.0).astype(jnp.int32)


def synchronize(timeout_s: float = 60.0) -> None:
    """Waits until the CPU has finished every handoff call a GPU has queued so far (run it after
    the step's outputs are ready) and raises RuntimeError for the first error the CPU found in one.
    Calls on the CPU backend finish before their step returns, so there it returns at once."""
    _C.handoff_synchronize(timeout_s)


def cuda_handoff_available() -> bool:
    """Whether libcuda loaded, so that the calls are registered for CUDA and pools are pinned."""
    return "CUDA" in _HANDLERS[_ATTENTION_START]


def cuda_driver_status() -> str:
    """Why the CUDA handlers are or are not registered, in words."""
    return _C.cuda_driver_status()
