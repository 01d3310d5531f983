"""Paged KV bookkeeping: one `BlockPool` per memory (GPU now, host memory for the NEO pipeline).

A pool hands out block ids of one KV cache array. Block 0 is never handed out: it is the scratch block that
padding tokens of a step are aimed at (the GPU cache's `write_kv` drops their writes) and that padded
block-table entries point at, so padded shapes need no masks and never touch a live request's KV.
"""

from __future__ import annotations

from neo_jax.sequence import Request

SCRATCH_BLOCK = 0


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockPool:
    """Free list of the blocks 1..num_blocks-1 of one cache; deterministic order, so runs repeat exactly."""

    def __init__(self, name: str, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"{name} KV pool: num_blocks must be >= 2 (block 0 is scratch), got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"{name} KV pool: block_size must be positive, got {block_size}")
        self.name = name
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, SCRATCH_BLOCK, -1))

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_missing(self, request: Request, num_tokens: int) -> int:
        """More blocks the request needs for its KV to hold its first `num_tokens` tokens."""
        return max(0, blocks_for(num_tokens, self.block_size) - len(request.block_table))

    def can_hold(self, request: Request, num_tokens: int) -> bool:
        return self.blocks_missing(request, num_tokens) <= len(self._free)

    def grow(self, request: Request, num_tokens: int) -> None:
        """Extends the request's block table so that it holds `num_tokens` tokens."""
        if request.kv_pool not in (None, self.name):
            raise ValueError(f"request {request.request_id}: its KV is in pool {request.kv_pool!r}, not {self.name!r}")
        missing = self.blocks_missing(request, num_tokens)
        if missing == 0:  # most decode steps: the newest block has room
            request.kv_pool = self.name
            return
        if missing > len(self._free):
            raise MemoryError(f"{self.name} KV pool: {missing} blocks asked for, {len(self._free)} free")
        request.block_table.extend(self._free.pop() for _ in range(missing))
        request.kv_pool = self.name

    def free(self, request: Request) -> None:
        """Returns the request's blocks; its KV is gone."""
        if request.kv_pool != self.name:
            return
        self._free.extend(reversed(request.block_table))
        request.block_table = []
        request.kv_pool = None
