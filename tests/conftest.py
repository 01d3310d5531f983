"""A hook for the whole suite: compiled programs are freed between tests once the process nears the kernel's
limit on memory mappings."""

from __future__ import annotations

import gc
import pathlib

import jax
import pytest


def memory_maps() -> tuple[int, int] | None:
    """(this process's memory mappings, the kernel's limit on them), or None where /proc does not tell."""
    try:
        limit = int(pathlib.Path("/proc/sys/vm/max_map_count").read_text())
        with open("/proc/self/maps") as maps:
            return sum(1 for _ in maps), limit
    except (OSError, ValueError):
        return None


@pytest.fixture(autouse=True)
def free_compiled_programs_near_the_map_limit():
    """Each executable of XLA's CPU backend maps ~8 regions of JIT-compiled code, and the suite compiles enough of
    them to pass vm.max_map_count (65530 by default), where XLA's compiler segfaults or aborts. After a test that
    leaves more than half the limit used, JAX's caches are cleared (later tests recompile what they use; one
    module added 25k mappings on its own)."""
    yield
    maps = memory_maps()
    if maps is not None and maps[0] > maps[1] // 2:
        jax.clear_caches()
        gc.collect()
