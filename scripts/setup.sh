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
[ $# -gt 0 ] && spec=".[$1]"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$spec"
