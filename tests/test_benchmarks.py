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


def test_update_agreement_reports_the_early_and_late_median_cosines_of_a_run(tmp_path: Path) -> None:
    import json

    update_agreement = benchscripts.load("update_agreement")
    # Two interfaces; cosines high before step 500 and near zero after (what DNI does on the zoo).
    diagnostics = [{"step": s, "param_cosine": [0.6, 0.5] if s < 500 else [0.01 * (s // 100), -0.1]}
                   for s in range(0, 2000, 100)]
    record = {"dataset": "mnist", "model": "m", "stages": 3, "method": "dni", "seed": 0, "epochs": 1,
              "final": 90.0, "diagnostics": diagnostics}
    (tmp_path / "library").mkdir()
    (tmp_path / "library" / "mnist-m-k3-dni-s0-e1.json").write_text(json.dumps(record))
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "mnist-m-k3-frozen-s0-e1.json").write_text(json.dumps({"final": 80.0}))
    update_agreement.main(["--runs-root", str(tmp_path), "--report", str(tmp_path / "r.md")])
    row = (tmp_path / "r.md").read_text().splitlines()[-1]
    # From step 500: 0.05 ... 0.19, median 0.12; the last 10: 0.10 ... 0.19, median 0.145, printed 0.15
    # (0.14 + 0.15 in floats is just above 0.29).
    assert row == "| mnist | m | 3 | dni | 1 | - | 80.00 | 90.00 | 0.60, 0.50 | 0.12, -0.10 | 0.15, -0.10 |"


@pytest.mark.parametrize("variant,rates", [("lin+lowlr2e-3", [2e-3, 2e-3, 1e-3]),
                                           ("lin+stagelr2e-3", [2e-3, 2e-3, 2e-3]),
                                           ("lin+stagelr2e-3+lowlr4e-3", [4e-3, 4e-3, 2e-3])])
def test_zoo_variants_give_each_stage_the_rate_their_tokens_name(variant: str, rates: list[float]) -> None:
    import torch

    from synthgrad.models import build_layers
    from synthgrad.zoo import group_blocks

    variants = benchscripts.load("zoo_variants")
    stages = group_blocks(build_layers("resmlp", (1, 28, 28), 10), 3)
    rule, _ = variants.build_variant(variant, stages, torch.zeros(2, 1, 28, 28), True, 10)
    assert [o.param_groups[0]["lr"] for o in rule.optimizers] == rates
