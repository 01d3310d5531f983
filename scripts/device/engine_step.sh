#!/usr/bin/env bash
# All the GPU figures in one call, so that the CUDA build happens once: scripts/device/gpu_attention.sh (build,
# kernel tests, kernel timings), then the engine step for llama-3-8b (bf16, random weights) with
# scripts/benchmark_step.py: the greedy-token check on the tiny preset, decode batches 256/1/16/64 at context
# 1024 (the batch-256 step also traced: device time per kernel), a 2048-token prefill.
# Writes engine_step.json and engine_step_log.txt into $OUT, besides gpu_attention.sh's files.
# STEP_TIMEOUT: seconds for the step benchmark (0 skips it; default 240, or what is left of DEADLINE_S seconds
# from this script's start); STEP_ARGS: more arguments for it; the variables of gpu_attention.sh pass through,
# and this script's arguments go to bench_gpu_attention.py.
set -uo pipefail
cd "$(dirname "$0")/../.."
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/neo_jax_xla_cache}  # reused by later calls on a warm machine
export OUT=${OUT:-/tmp/gpu_figures}
mkdir -p "$OUT"
bash scripts/device/gpu_attention.sh "$@"
# STEP_VARIANTS: '|'-separated sets of environment assignments (e.g. "NEO_XLA_COMMAND_BUFFERS=1|XLA_FLAGS=--x=y");
# for each, the batch-256 and batch-1 decode steps alone (batch 256 traced) go to engine_step_variant_<n>.json,
# before the main run (VARIANT_TIMEOUT seconds each).
IFS='|' read -ra variants <<< "${STEP_VARIANTS:-}"
for n in "${!variants[@]}"; do
  {
    echo "variant $n: ${variants[n]}"
    # shellcheck disable=SC2086  # each variant is a list of assignments
    env ${variants[n]} XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 PYTHONUNBUFFERED=1 timeout "${VARIANT_TIMEOUT:-60}" \
      python3 scripts/benchmark_step.py --batch-sizes 256 1 --prefill-len 0 --profile-batch 256 --iters 5 \
      --output-json "$OUT/engine_step_variant_$n.json" > /dev/null
    echo "variant $n exit code $?"
  } 2>&1 | tee -a "$OUT/engine_step_log.txt"
done
if [ -n "${DEADLINE_S:-}" ]; then STEP_TIMEOUT=${STEP_TIMEOUT:-$(( DEADLINE_S > SECONDS ? DEADLINE_S - SECONDS : 0 ))}; fi
if [ "${STEP_TIMEOUT:-240}" != 0 ]; then
  {
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 PYTHONUNBUFFERED=1 timeout "${STEP_TIMEOUT:-240}" \
      python3 scripts/benchmark_step.py --check --profile-batch 256 --output-json "$OUT/engine_step.json" \
      ${STEP_ARGS:-}
    echo "step benchmark exit code $?"
  } 2>&1 | tee -a "$OUT/engine_step_log.txt"
fi
