#!/usr/bin/env bash
# One call on the GPU machine (no network, no MLIR needed): install this tree, run the GPU
# tests, then the benchmarks side by side with torch. Logs go to $OUT when it is set.
#   bash tools/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
LOG="${OUT:-/tmp}"
mkdir -p "$LOG"
unset TRITON_INTERPRET
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
PY="${PYTHON:-$(command -v python3 || command -v python)}"
# Fresh caches: nothing compiled elsewhere is trusted here.
export GRAPHIR_CACHE_DIR="${GRAPHIR_CACHE_DIR:-$(mktemp -d -t graphir-cache-XXXX)}"
export GRAPHIR_CODEGEN_DIR="${GRAPHIR_CODEGEN_DIR:-$(mktemp -d -t graphir-codegen-XXXX)}"

echo "== environment"
"$PY" -c "import sys, torch, triton, numpy; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__, '|', torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader || true

echo "== install (no deps, no build isolation)"
"$PY" -m pip install --no-deps --no-build-isolation -e . >"$LOG/pip_install.log" 2>&1 \
  || { tail -20 "$LOG/pip_install.log"; echo "install FAILED"; exit 2; }

echo "== GPU tests"
# GRAPHIR_GPU_TEST_JOBS=N runs them in N pytest-xdist workers (the image has pytest-xdist): their
# time is mostly cold kernel compiles. Default 1 (one process), as measured so far.
JOBS="${GRAPHIR_GPU_TEST_JOBS:-1}"
XDIST=(); [ "$JOBS" -gt 1 ] && XDIST=(-n "$JOBS")
NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}" "$PY" -m pytest -m gpu tests/gpu tests/runtime/cuda \
  -q -rs -p no:cacheprovider --durations=12 ${XDIST[@]+"${XDIST[@]}"} >"$LOG/gpu_tests.log" 2>&1
TESTS=$?
tail -40 "$LOG/gpu_tests.log"

echo "== benchmarks"
# One call has a 10-minute budget: torch.compile's max-autotune peer only when asked
# (GRAPHIR_BENCH_COMPILE=reduce-overhead,max-autotune-no-cudagraphs, or run bench_gpu.py alone).
GRAPHIR_BENCH_COMPILE="${GRAPHIR_BENCH_COMPILE:-reduce-overhead}" \
  "$PY" tools/bench_gpu.py >"$LOG/bench_gpu.log" 2>&1
BENCH=$?
grep -E "^\[|Error|error" "$LOG/bench_gpu.log" | cut -c1-200 | tail -8

echo "== summary: tests rc=$TESTS bench rc=$BENCH (logs in $LOG)"
# The short table last (it is the end of the bench log).
tail -22 "$LOG/bench_gpu.log"
[ "$TESTS" -eq 0 ] && [ "$BENCH" -eq 0 ]
