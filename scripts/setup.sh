#!/usr/bin/env bash
# Create .venv and install synthgrad into it (torch 2.13.0 CPU build; see pyproject.toml).
# Usage: bash scripts/setup.sh [extra]   e.g. `bash scripts/setup.sh dev` adds pytest and ruff.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
spec="."
if [ $# -gt 0 ]; then
  case "$1" in
    dev|tensorboard) spec=".[$1]" ;;
    *) echo "setup.sh: unknown extra '$1'; use 'dev' (pytest, ruff, tensorboard) or 'tensorboard', or nothing" >&2
       exit 2 ;;
  esac
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$spec"
