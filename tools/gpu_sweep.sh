#!/usr/bin/env bash
# One call on the GPU machine: install this tree, then run the kernel sweeps named on the command
# line (default: every tools/gpu_sweeps/*.py), each under its own time limit. Each sweep checks
# every variant against torch before timing it, prints a table last and writes $OUT/<name>.json.
#   bash tools/gpu_sweep.sh [attention decode matmul ...]    (SWEEP_LIMIT_S, default 150 s each)
set -uo pipefail
cd "$(dirname "$0")/.."
LOG="${OUT:-/tmp}"
mkdir -p "$LOG"
unset TRITON_INTERPRET
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
PY="${PYTHON:-$(command -v python3 || command -v python)}"
"$PY" -m pip install --no-deps --no-build-isolation -e . >"$LOG/pip_install.log" 2>&1 \
  || { tail -20 "$LOG/pip_install.log"; echo "install FAILED"; exit 2; }
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
names=("$@")
[ ${#names[@]} -eq 0 ] && names=($(ls tools/gpu_sweeps/*.py | xargs -n1 basename | sed 's/\.py$//' | grep -v '^_'))
rc=0
for n in "${names[@]}"; do
  echo "== sweep $n"
  timeout "${SWEEP_LIMIT_S:-150}" "$PY" "tools/gpu_sweeps/$n.py" >"$LOG/sweep_$n.log" 2>&1
  r=$?; [ $r -ne 0 ] && rc=$r
  tail -"${SWEEP_TAIL:-30}" "$LOG/sweep_$n.log"
  echo "== sweep $n rc=$r"
done
exit $rc
