#!/usr/bin/env bash
# Set up with the dev tools, then lint and run the test suite (no network, no real MNIST needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
.venv/bin/ruff check --no-cache src tests benchmarks
.venv/bin/python -m pytest "$@"
