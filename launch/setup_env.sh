#!/usr/bin/env bash
# Creates .venv with the pinned stack and installs espeak-ng (for the synthetic corpus) when missing.
# Idempotent: a second run only checks. Usage: source-free, just `bash launch/setup_env.sh`.
#   PYTHON      interpreter to build the venv from (default: python3.11, else python3)
#   VENV        venv directory (default: .venv in the repository)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=${VENV:-.venv}

if ! command -v espeak-ng >/dev/null 2>&1; then
  echo "[setup] installing espeak-ng (Debian package)" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get install -y -q espeak-ng >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q espeak-ng >/dev/null; }
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $PYTHON" >&2
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.requirements.sha"
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing requirements.txt into $VENV (first time: a few minutes)" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  # torch first and alone, so that no other package pulls a different (CUDA) build of it.
  "$VENV/bin/python" -m pip install -q "$(grep '^torch==' requirements.txt)"
  "$VENV/bin/python" -m pip install -q -r requirements.txt
  echo "$want" > "$stamp"
fi
