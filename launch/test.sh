#!/usr/bin/env bash
# The test suite: sets up the environment, then runs pytest. Extra arguments go to pytest.
# The default run includes the end-to-end DeepSpeed tests; `-m "not slow"` skips the slowest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
# shellcheck disable=SC1091
source .venv/bin/activate
python -m pytest -q "$@"
