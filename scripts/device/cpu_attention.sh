#!/usr/bin/env bash
# On the GPU machine's host: build the package, check that the op loads and runs (the extension alone, after
# JAX, through the package; a backtrace under cuda-gdb if that crashes), run the cpu_ops tests (the
# AVX512-BF16/FP16 kernels only run there), then scripts/bench_cpu_attention.py: the full sweep, and short
# sweeps of the goal cells with huge pages, with the converting AVX-512 kernel, with 512- and 2048-token chunks and on one
# thread, and of a few long requests with 512- and 1024-token chunks.
# Writes log.txt and cpu_attention.json (the full sweep) into $OUT, and the short sweeps' JSON packed in
# $OUT/variants.tar.gz (the device tool returns at most 8 files).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/cpu_attention_out}
mkdir -p "$OUT/variants"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
bench() { timeout "$1" python3 scripts/bench_cpu_attention.py "${@:2}"; echo "bench $2 exit code $?"; }
smoke='import ml_dtypes, numpy as np
from neo_jax import cpu_ops
k = np.ones((4, 2, 16, 128), ml_dtypes.bfloat16)
q = np.ones((2, 8, 128), ml_dtypes.bfloat16)
out = cpu_ops.paged_decode_attention(q, k, k, np.array([[0, 1], [2, 3]], np.int32), np.array([20, 32], np.int32))
print("smoke", cpu_ops.cpu_isa(), cpu_ops.num_threads(), "sum", out.astype(np.float32).sum(), "(2048 expected)")'
echo "$smoke" > /tmp/cpu_ops_smoke.py
{
  lscpu | grep -E "Model name|^CPU\(s\)|Thread|NUMA node\(s\)|L3"
  uname -r; cat /sys/kernel/mm/transparent_hugepage/enabled
  install() { python3 -m pip install -q -e . --no-deps --no-build-isolation "$@" 2>&1 | { grep -v "is ignored" || true; }; }
  # Without the CUDA kernels (CMake finds no CUDA compiler) if the full build fails.
  time install || CUDACXX=/bin/false install --config-settings=build-dir=build/cpu_only || exit 1
  so=$(ls build/*/cpu_ops/_C*.so | head -1)
  load="import importlib.util as u; s = u.spec_from_file_location('neo_jax.cpu_ops._C', '$so'); C = u.module_from_spec(s); s.loader.exec_module(C); print(C.cpu_isa(), C.num_threads())"
  timeout 60 python3 -X faulthandler -c "$load"; echo "extension alone: exit code $?"
  timeout 60 python3 -X faulthandler -c "import jax; $load"; echo "extension after jax: exit code $?"
  chosen=none
  for env in "" NEO_CPU_ISA=avx512 NEO_CPU_THREADS=1 JAX_PLATFORMS=cpu NEO_CPU_ISA=avx2; do
    env $env timeout 60 python3 -X faulthandler /tmp/cpu_ops_smoke.py && { chosen="$env"; break; }
    echo "package smoke with env '$env' failed"
    [ -z "$env" ] && timeout 90 cuda-gdb -q -batch -ex run -ex bt -ex "x/4i \$pc" --args python3 /tmp/cpu_ops_smoke.py 2>&1 | tail -40
  done
  echo "environment chosen: '$chosen'"
  [ "$chosen" = none ] && exit 1
  [ -n "$chosen" ] && export "$chosen"
  JAX_PLATFORMS=cpu timeout "${TEST_TIMEOUT:-60}" python3 -m pytest -q -x --tb=short tests/cpu_ops
  echo "tests exit code $?"
  bench "${BENCH_TIMEOUT:-120}" --output-json "$OUT/cpu_attention.json"
  goal_cells=(--requests 64 256 --contexts 1024 8192 --seconds-per-cell 0.3)
  bench 25 --huge-pages "${goal_cells[@]}" --output-json "$OUT/variants/huge_pages.json"
  bench 25 --isa avx512 "${goal_cells[@]}" --output-json "$OUT/variants/avx512.json"
  # 1k contexts are one 1024-token chunk each by default; two chunks and a merge with 512 (the default until 9f42652).
  NEO_CPU_CHUNK_TOKENS=512 bench 25 "${goal_cells[@]}" --output-json "$OUT/variants/chunk512.json"
  NEO_CPU_CHUNK_TOKENS=2048 bench 25 "${goal_cells[@]}" --output-json "$OUT/variants/chunk2048.json"
  # Few long requests, where 1024-token chunks give 16 threads fewer tasks: both lengths in the same run.
  few_long=(--requests 1 2 4 --contexts 4096 32768 --seconds-per-cell 0.3)
  for chunk in 512 1024; do
    NEO_CPU_CHUNK_TOKENS=$chunk bench 40 "${few_long[@]}" --output-json "$OUT/variants/few_long_chunk$chunk.json"
  done
  bench 25 --threads 1 --requests 16 --contexts 1024 8192 --probe-gb 1 --output-json "$OUT/variants/1_thread.json"
} 2>&1 | tee "$OUT/log.txt"
tar -czf "$OUT/variants.tar.gz" -C "$OUT" variants && rm -r "$OUT/variants"
