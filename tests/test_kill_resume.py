"""A real `kill -9` of a training process at a random moment, then `--resume`: nothing lost, nothing torn."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from synthgrad.metrics import read_metrics
from synthgrad.rundir import read_model

TIMING = {"wall_time_s", "samples_per_s", "epoch_time_s", "eval_time_s"}


def _cmd(fake: Path, tmp: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "synthgrad", "train", "--data-dir", str(fake), "--no-verify-md5",
            "--cache-dir", str(tmp / "cache"), "--model", "fcn-2", "--width", "64", "--synth-width", "64",
            "--method", "dni", "--epochs", "12", "--batch-size", "16", "--threads", "1", "--log-every", "1",
            "--checkpoint-every", "7", "--no-plots", "--quiet", "--run-dir", str(run), *extra]


def test_kill_9_then_resume_matches_an_uninterrupted_run(fake_data_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(_cmd(fake_data_dir, tmp_path, full), check=True, env=env, timeout=300, capture_output=True)

    proc = subprocess.Popen(_cmd(fake_data_dir, tmp_path, cut), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    metrics = cut / "metrics.jsonl"
    # Kill somewhere in the middle: after some steps were logged (12 epochs x 32 steps in all).
    while time.time() < deadline:
        if metrics.exists() and metrics.stat().st_size > 40_000:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"

    r = subprocess.run([sys.executable, "-m", "synthgrad", "train", "--resume", str(cut), "--quiet", "--no-plots"],
                       env=env, timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "final test accuracy" in r.stdout

    a = read_model(full / "final.pt").payload["stages"]
    b = read_model(cut / "final.pt").payload["stages"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = read_metrics(full / "metrics.jsonl"), read_metrics(cut / "metrics.jsonl")
    steps = [r["step"] for r in rb if r["kind"] == "step"]
    assert steps == sorted(set(steps)), "duplicated step records after the resume"
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in ra] == [
        {k: v for k, v in r.items() if k not in TIMING} for r in rb]
    assert (cut / "metrics.jsonl").read_text().endswith("\n")
