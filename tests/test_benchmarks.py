"""Every benchmark script starts: its imports resolve and it parses `--help` (they are run by hand, not by CI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import benchscripts
import pytest

BENCHMARKS = benchscripts.BENCHMARKS
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if 'if __name__ == "__main__"' in p.read_text())


def test_there_are_benchmark_scripts() -> None:
    assert len(SCRIPTS) >= 8


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_the_script_imports_and_prints_its_usage(script: Path, tmp_path: Path) -> None:
    # In a scratch directory: --help must not write anything anyway, and nothing lands in the checkout.
    env = {**os.environ, "PYTHONPATH": str(BENCHMARKS)}
    run = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "usage:" in run.stdout
    assert not any(tmp_path.iterdir())


def test_the_held_out_models_are_four_blocks_that_compose_to_class_scores() -> None:
    import torch

    holdout = benchscripts.load("holdout")

    for name in holdout.SPECS:
        blocks = holdout.build_blocks(name, (1, 28, 28), 10)
        x = torch.randn(3, 1, 28, 28)
        for block in blocks:
            x = block(x)
        assert len(blocks) == 4 and x.shape == (3, 10), name
