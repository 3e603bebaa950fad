#!/usr/bin/env bash
# The test suite: sets up the environment, then runs pytest. Extra arguments go to pytest.
# The default run (what CI runs) includes the end-to-end DeepSpeed tests; `-m "not slow"` skips most of them
# (the overfit guard and a launcher smoke test stay), and
# `--extended` adds the tests marked `extended` (variants of paths the default covers; a few minutes more).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
# shellcheck disable=SC1091
source .venv/bin/activate
# DeepSpeed's CPU backend compiles its shared-memory op on first use (about 30 s). Build it once here, in this
# checkout's .venv: a launcher test killed by its timeout mid-build would leave a lock that every later run waits
# on, and a lock left by another checkout in ~/.cache cannot stall this one.
export TORCH_EXTENSIONS_DIR="$PWD/.venv/torch_extensions"
python - <<'PY'
try:
    from deepspeed.comm.torch import build_shm_op
except ImportError:  # a DeepSpeed without it builds nothing on CPU
    build_shm_op = None
if build_shm_op is not None:
    print("[test] DeepSpeed CPU shm op:", "ready" if build_shm_op() is not None else "not used here", flush=True)
PY
python -m pytest -q "$@"
