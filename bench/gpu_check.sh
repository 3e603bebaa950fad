#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): real shapes, random weights, noise audio, three PART stages with checkpoints,
# kill -9 and resume, evaluation, per-stage throughput and MFU. Under 8 minutes on one H100/H200.
#   bash bench/gpu_check.sh [gpu_check.py args]        report in $OUT (if set) or docs/gpu_check/
# Packages missing on the machine can come as wheels in .whl/ (installed to /tmp/site, nothing else touched).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PY" bench/gpu_check.py --out "${OUT:-docs/gpu_check}" "$@"
