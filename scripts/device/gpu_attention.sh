#!/usr/bin/env bash
# On the GPU machine: build the package with its CUDA kernels (skipped with NEO_SKIP_BUILD=1), check the paged
# attention kernel against the reference (tests/kernels/test_paged_attention_gpu.py), then time it
# (scripts/bench_gpu_attention.py; this script's arguments go to it). Writes gpu_attention_log.txt and
# gpu_attention.json into $OUT. TEST_TIMEOUT / BENCH_TIMEOUT: seconds per stage, 0 skips the stage;
# TEST_FILTER: a pytest -k expression.
set -uo pipefail
cd "$(dirname "$0")/../.."
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/neo_jax_xla_cache}  # reused by later calls on a warm machine
OUT=${OUT:-/tmp/gpu_figures}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
export CUDACXX=${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
# SASS for Hopper (H100, H200) only: half the nvcc time of the default "90-real;80-virtual".
export CMAKE_ARGS=${CMAKE_ARGS:--DCMAKE_CUDA_ARCHITECTURES=90-real}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
  if [ "${NEO_SKIP_BUILD:-0}" != 1 ]; then
    start=$(date +%s)
    python3 -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | grep -v "is ignored"
    echo "build: $(( $(date +%s) - start )) s"
  fi
  python3 -c "from neo_jax.kernels import _cuda; print('built', _cuda.__file__)" || exit 1
  if [ "${TEST_TIMEOUT:-150}" != 0 ]; then
    timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q --tb=short --maxfail=5 -k "${TEST_FILTER:-}" \
      tests/kernels/test_paged_attention_gpu.py
    echo "kernel tests exit code $?"
  fi
  if [ "${BENCH_TIMEOUT:-170}" != 0 ]; then
    timeout "${BENCH_TIMEOUT:-170}" python3 scripts/bench_gpu_attention.py --output-json "$OUT/gpu_attention.json" "$@"
    echo "attention benchmark exit code $?"
  fi
} 2>&1 | tee "$OUT/gpu_attention_log.txt"
