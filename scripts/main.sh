#!/usr/bin/env bash
# The main job: set up, fetch MNIST, train the MLP with synthetic gradients (DNI), write the plots.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/synthgrad data fetch --dataset mnist
.venv/bin/synthgrad train --model mlp --method dni --epochs 20 "$@"
