"""NumPy entry points of the CPU paged decode-attention op and the KV append.

Arrays are used in place (no copies): the caches and `out` must be C-contiguous NumPy arrays, bf16
ones as `ml_dtypes.bfloat16`. The work runs on the op's own pool of pinned threads with the GIL
released. Shapes:

    q, out            [num_reqs, num_q_heads, head_dim]               float32 / float16 / bfloat16
    k_cache, v_cache  [num_blocks, num_kv_heads, block_size, head_dim] float32 / float16 / bfloat16
    block_tables      int32 [num_reqs, max_blocks_per_req]
    context_lens      int32 [num_reqs]     (0: a padding request, its output row is zero)
    k_new, v_new      [num_tokens, num_kv_heads, head_dim], the cache's dtype
    slot_mapping      int32 [num_tokens]   (block_id * block_size + offset; -1 skips the row)
"""

from __future__ import annotations

import atexit

import numpy as np

from neo_jax.cpu_ops import _C


def paged_decode_attention(
    q: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    block_tables: np.ndarray,
    context_lens: np.ndarray,
    scale: float | None = None,
    out: np.ndarray | None = None,
    isa: str | None = None,
) -> np.ndarray:
    """Decode attention of one query token per request over its paged context; returns `out`.

    `scale` defaults to 1/sqrt(head_dim); `isa` ("scalar", "avx2", "avx512", "avx512_bf16") forces
    a kernel no better than the CPU's (default: the best, capped by NEO_CPU_ISA). Raises ValueError
    naming the argument on any inconsistent shape, dtype, length or block id.
    """
    if out is None and isinstance(q, np.ndarray):
        out = np.empty_like(q)
    _C.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, out, scale, isa)
    return out


def append_kv(
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    k_new: np.ndarray,
    v_new: np.ndarray,
    slot_mapping: np.ndarray,
) -> None:
    """Writes row i of k_new / v_new into slot slot_mapping[i] of k_cache / v_cache, in place."""
    _C.append_kv(k_cache, v_cache, k_new, v_new, slot_mapping)


def cpu_isa() -> str:
    """The instruction set the kernels use by default on this CPU."""
    return _C.cpu_isa()


def available_isas() -> list[str]:
    """Every instruction set this CPU can run the kernels with, lowest first."""
    return _C.available_isas()


def chunk_tokens() -> int:
    """Target tokens per chunk that a long context splits into, each chunk a task of its own, merged by
    log-sum-exp: `NEO_CPU_CHUNK_TOKENS` (default 1024), fixed for the process."""
    return _C.chunk_tokens()


def num_threads() -> int:
    """Threads of the op's pool (the calling thread included)."""
    return _C.num_threads()


def physical_cores() -> int:
    """Physical cores this process may run on (the default pool size on a machine without a CUDA GPU)."""
    return _C.physical_cores()


def set_num_threads(num_threads: int) -> None:
    """Restarts the pool with `num_threads` threads (the pool starts with NEO_CPU_THREADS, else the physical
    cores, or half of them on a machine with a CUDA GPU)."""
    _C.set_num_threads(num_threads)


def read_bandwidth_probe(num_bytes: int = 1 << 30, repeats: int = 5) -> list[float]:
    """GB/s of a multithreaded read of `num_bytes` on the op's pool, once per repeat."""
    return _C.read_bandwidth_probe(num_bytes, repeats)


# Workers are joined before the interpreter tears down, so exit never waits on a sleeping pool.
atexit.register(_C.shutdown_threads)
