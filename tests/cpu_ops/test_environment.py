"""Environment knobs (NEO_CPU_ISA, NEO_CPU_THREADS, NEO_CPU_CHUNK_TOKENS) and a clean interpreter exit, in
subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from neo_jax import cpu_ops


def run_python(code: str, **env: str | None) -> str:
    """Runs `code` in a fresh interpreter with `env` over ours (a None value unsets the variable); its stdout."""
    environment = {**os.environ, "JAX_PLATFORMS": "cpu", **env}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={name: value for name, value in environment.items() if value is not None},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.parametrize("isa", cpu_ops.available_isas())
def test_neo_cpu_isa_caps_the_default_kernel(isa):
    code = """
        import ml_dtypes, numpy as np
        from attention_reference import make_batch
        from neo_jax import cpu_ops
        b = make_batch(np.random.default_rng(0), [300, 5], 2, 4, 64, 16, ml_dtypes.bfloat16, ml_dtypes.bfloat16)
        args = (b.q, b.k_cache, b.v_cache, b.block_tables, b.context_lens)
        default = cpu_ops.paged_decode_attention(*args)
        explicit = cpu_ops.paged_decode_attention(*args, isa=cpu_ops.cpu_isa())
        print(cpu_ops.cpu_isa(), np.array_equal(default, explicit))
    """
    pythonpath = os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])
    assert run_python(code, NEO_CPU_ISA=isa, PYTHONPATH=pythonpath) == f"{isa} True"


@pytest.mark.parametrize("chunk_tokens", [None, "16", "512"])
def test_neo_cpu_chunk_tokens_sets_the_chunks_and_keeps_the_result(chunk_tokens):
    """Chunks of 16 tokens split the 1000- and 2100-token contexts into many merged parts, 512 into two or
    five, the default (1024) into one or three: the op still matches the float64 reference."""
    code = """
        import ml_dtypes, numpy as np
        from attention_reference import make_batch, output_tolerance, reference_attention
        from neo_jax import cpu_ops
        b = make_batch(np.random.default_rng(1), [1000, 2100, 7], 2, 4, 64, 16, np.float32, ml_dtypes.bfloat16)
        out = cpu_ops.paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.context_lens)
        expected = reference_attention(b)
        close = np.allclose(out, expected, rtol=output_tolerance(np.float32), atol=1e-4 * np.abs(expected).max())
        print(cpu_ops.chunk_tokens(), close)
    """
    pythonpath = os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])
    assert run_python(code, NEO_CPU_CHUNK_TOKENS=chunk_tokens, PYTHONPATH=pythonpath) == f"{chunk_tokens or 1024} True"


def physical_cores() -> int:
    """Distinct (package, core) pairs among the CPUs this process may run on, read from sysfs."""
    cores = set()
    for cpu in os.sched_getaffinity(0):
        topology = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        try:
            with open(topology + "physical_package_id") as package, open(topology + "core_id") as core:
                cores.add((int(package.read()), int(core.read())))
        except OSError:
            cores.add((0, cpu))
    return len(cores)


def test_the_default_pool_has_a_thread_per_core_or_half_of_them_next_to_a_gpu():
    code = "from neo_jax import cpu_ops; from neo_jax.cpu_ops import handoff; " \
           "print(cpu_ops.num_threads(), handoff.cuda_handoff_available())"
    threads, gpu = run_python(code, NEO_CPU_THREADS=None).split()
    assert int(threads) == (max(1, physical_cores() // 2) if gpu == "True" else physical_cores())


def test_physical_cores_counts_one_cpu_per_core():
    assert cpu_ops.physical_cores() == physical_cores()


def test_neo_cpu_threads_sets_the_pool_size():
    assert run_python("from neo_jax import cpu_ops; print(cpu_ops.num_threads())", NEO_CPU_THREADS="3") == "3"


@pytest.mark.parametrize("threads", ["1", "4"])
def test_interpreter_exits_after_using_the_pool(threads):
    """Workers left spinning or sleeping must not hold the exit (the subprocess has a timeout)."""
    code = """
        import threading, numpy as np
        from neo_jax import cpu_ops
        k = np.zeros((4, 1, 16, 64), np.float32)
        args = (np.ones((2, 1, 64), np.float32), k, k, np.zeros((2, 2), np.int32), np.array([16, 3], np.int32))
        worker = threading.Thread(target=lambda: [cpu_ops.paged_decode_attention(*args) for _ in range(50)])
        worker.start()
        for _ in range(50):
            out = cpu_ops.paged_decode_attention(*args)
        worker.join()
        print(float(out.sum()))
    """
    assert run_python(code, NEO_CPU_THREADS=threads) == "0.0"


def test_calls_after_the_workers_fell_asleep_give_the_same_output():
    """Idle workers sleep after NEO_CPU_SPIN_US and are woken one by another when a call comes: calls spaced out
    past the spin, with more tasks than threads, must finish and agree with the first (the subprocess has a
    timeout)."""
    code = """
        import time, numpy as np
        from neo_jax import cpu_ops
        rng = np.random.default_rng(0)
        k = rng.standard_normal((64, 2, 16, 64)).astype(np.float32)
        v = rng.standard_normal((64, 2, 16, 64)).astype(np.float32)
        args = (rng.standard_normal((4, 8, 64)).astype(np.float32), k, v,
                np.arange(64, dtype=np.int32).reshape(4, 16), np.array([256, 100, 1, 0], np.int32))
        first = cpu_ops.paged_decode_attention(*args)
        same = True
        for _ in range(200):
            time.sleep(0.001)
            same = same and np.array_equal(cpu_ops.paged_decode_attention(*args), first)
        print(same)
    """
    assert run_python(code, NEO_CPU_THREADS="4", NEO_CPU_SPIN_US="50") == "True"
