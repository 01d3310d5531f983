#!/usr/bin/env bash
# On the GPU machine: build the package with its CUDA kernels, check the paged attention kernel against the
# reference (tests/kernels/test_paged_attention_gpu.py), then time it (scripts/bench_gpu_attention.py).
# Writes log.txt and gpu_attention_h100.json into $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu_attention_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export CUDACXX=${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$CUDACXX" --version | tail -1
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
  time python3 -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | grep -v "is ignored"
  python3 -c "from neo_jax.kernels import _cuda; print('built', _cuda.__file__)" || exit 1
  timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q --tb=short --maxfail=5 tests/kernels/test_paged_attention_gpu.py
  echo "tests exit code $?"
  timeout "${BENCH_TIMEOUT:-170}" python3 scripts/bench_gpu_attention.py --output-json "$OUT/gpu_attention_h100.json"
  echo "bench exit code $?"
} 2>&1 | tee "$OUT/log.txt"
