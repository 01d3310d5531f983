#!/usr/bin/env bash
# On the GPU machine's host: build the package, run the cpu_ops tests (the AVX512-BF16/FP16 kernels only run
# there), then scripts/bench_cpu_attention.py: the full sweep, and short sweeps of the goal cells with huge
# pages, with the converting AVX-512 kernel and on one thread. Writes log.txt and the JSON files into $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/cpu_attention_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
bench() { timeout "$1" python3 scripts/bench_cpu_attention.py "${@:2}"; echo "bench $2 exit code $?"; }
{
  lscpu | grep -E "Model name|^CPU\(s\)|Thread|NUMA node\(s\)|L3"
  cat /sys/kernel/mm/transparent_hugepage/enabled
  time python3 -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | grep -v "is ignored"
  python3 -c "from neo_jax import cpu_ops; print('isa', cpu_ops.cpu_isa(), 'threads', cpu_ops.num_threads())" || exit 1
  JAX_PLATFORMS=cpu timeout "${TEST_TIMEOUT:-100}" python3 -m pytest -q -x --tb=short tests/cpu_ops
  echo "tests exit code $?"
  bench "${BENCH_TIMEOUT:-150}" --output-json "$OUT/cpu_attention.json"
  goal_cells=(--requests 64 256 --contexts 1024 8192 --seconds-per-cell 0.3)
  bench 30 --huge-pages "${goal_cells[@]}" --output-json "$OUT/cpu_attention_huge_pages.json"
  bench 30 --isa avx512 "${goal_cells[@]}" --output-json "$OUT/cpu_attention_avx512.json"
  bench 40 --threads 1 --requests 16 --contexts 1024 8192 --probe-gb 1 --output-json "$OUT/cpu_attention_1_thread.json"
} 2>&1 | tee "$OUT/log.txt"
