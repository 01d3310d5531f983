#!/usr/bin/env bash
# On the GPU machine: the issue-5 figures. Builds the package (skipped with NEO_SKIP_BUILD=1), runs the pipeline
# equality tests (tests/neo_jax/test_pipeline.py) with JAX on the GPU, so the pipelined step goes through the CUDA
# start/wait path, then scripts/benchmark_pipeline.py on llama-3-8b (handoff per layer, overlap). Writes
# pipeline_log.txt and pipeline.json into $OUT. TEST_TIMEOUT / BENCH_TIMEOUT: seconds per stage (0 skips; the
# benchmark's default is 300 s after the tests, 540 without them);
# TEST_ARGS: more pytest arguments (e.g. -k neo), TEST_XLA_FLAGS: their XLA_FLAGS; BENCH_ARGS: more arguments for the benchmark. EXTRA: a command
# run after the build (an experiment).
set -uo pipefail
cd "$(dirname "$0")/../.."
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/neo_jax_xla_cache}  # reused by later calls on a warm machine
OUT=${OUT:-/tmp/pipeline_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=16 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
export CMAKE_ARGS=${CMAKE_ARGS:--DCMAKE_CUDA_ARCHITECTURES=90-real}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  if [ "${NEO_SKIP_BUILD:-0}" != 1 ]; then
    start=$(date +%s)
    python3 -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | grep -v "is ignored"
    echo "build: $(( $(date +%s) - start )) s"
  fi
  python3 -c "from neo_jax.cpu_ops import handoff; print('cuda handoff:', handoff.cuda_handoff_available(), handoff.cuda_driver_status())"
  if [ -n "${EXTRA:-}" ]; then bash -c "$EXTRA"; echo "extra exit code $?"; fi
  if [ "${TEST_TIMEOUT:-480}" != 0 ]; then
    # The tests compile dozens of small programs; skipping GEMM autotuning shortens each compile.
    XLA_FLAGS=${TEST_XLA_FLAGS:---xla_gpu_autotune_level=0} timeout "${TEST_TIMEOUT:-480}" \
      python3 -m pytest -q --tb=short -rA -p no:cacheprovider \
      tests/neo_jax/test_pipeline.py ${TEST_ARGS:-}
    echo "pipeline tests exit code $?"
  fi
  # The whole benchmark compiles ~30 programs: on a fresh machine it needs ~400 s, which a call has with no tests.
  bench_timeout=${BENCH_TIMEOUT:-$([ "${TEST_TIMEOUT:-480}" = 0 ] && echo 540 || echo 300)}
  if [ "$bench_timeout" != 0 ]; then
    timeout "$bench_timeout" python3 scripts/benchmark_pipeline.py --output-json "$OUT/pipeline.json" \
      ${BENCH_ARGS:-}
    echo "pipeline benchmark exit code $?"
  fi
} 2>&1 | tee "$OUT/pipeline_log.txt"
