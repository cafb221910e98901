"""A real `kill -9`, SIGTERM or SIGINT of a training process mid-run, then `--resume`: nothing lost, nothing torn."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fakes import write_fake_dataset
from runfiles import payload, records

from synthgrad import checkpoint
from synthgrad.metrics import read_metrics

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}


def _cmd(fake: Path, tmp: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "synthgrad", "train", "--data-dir", str(fake), "--no-verify-md5",
            "--cache-dir", str(tmp / "cache"), "--model", "fcn-2", "--width", "64", "--synth-width", "64",
            "--method", "dni", "--epochs", "12", "--batch-size", "16", "--threads", "1", "--log-every", "1",
            "--checkpoint-every", "7", "--no-plots", "--quiet", "--run-dir", str(run), *extra]


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(fake data directory, the run uninterrupted): the oracle of every test here."""
    tmp = tmp_path_factory.mktemp("unbroken")
    fake = write_fake_dataset(tmp / "fake-mnist")
    subprocess.run(_cmd(fake, tmp, tmp / "full"), check=True, env=ENV, timeout=300, capture_output=True)
    return fake, tmp / "full"


def _start(fake: Path, tmp: Path, run: Path, *args: str) -> subprocess.Popen:
    cmd = [*_cmd(fake, tmp, run), *args] if not args else [sys.executable, "-m", "synthgrad", "train", *args]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _signal_after(proc: subprocess.Popen, metrics: Path, size: int, signum: int) -> tuple[str, str]:
    """Send `signum` once metrics.jsonl has grown past `size` bytes (12 epochs x 32 steps in all); wait for the end."""
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.stat().st_size > size:
            break
        time.sleep(0.01)
    proc.send_signal(signum)
    return proc.communicate(timeout=60)


def _same_as_unbroken(cut: Path, full: Path) -> None:
    assert _equal(payload(checkpoint.load(full / "final.pt"))["stages"], payload(checkpoint.load(cut / "final.pt"))[
        "stages"])
    rb = read_metrics(cut / "metrics.jsonl")
    steps = [r["step"] for r in rb if r["kind"] == "step"]
    assert steps == sorted(set(steps)), "duplicated step records after the resume"
    assert records(full) == records(cut)
    assert (cut / "metrics.jsonl").read_text().endswith("\n")
    assert not [p.name for p in cut.iterdir() if p.name.endswith(".tmp")]


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kill_9_then_resume_matches_an_uninterrupted_run(unbroken: tuple[Path, Path], tmp_path: Path) -> None:
    fake, full = unbroken
    cut = tmp_path / "cut"
    proc = _start(fake, tmp_path, cut)
    _signal_after(proc, cut / "metrics.jsonl", 40_000, signal.SIGKILL)  # the kernel drops its lock too
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"

    r = subprocess.run([sys.executable, "-m", "synthgrad", "train", "--resume", str(cut), "--quiet", "--no-plots"],
                       env=ENV, timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "final test accuracy" in r.stdout
    _same_as_unbroken(cut, full)


def test_sigterm_and_sigint_stop_at_a_step_and_the_run_resumes_exactly(unbroken: tuple[Path, Path],
                                                                        tmp_path: Path) -> None:
    fake, full = unbroken
    cut = tmp_path / "cut"
    for signum, code, args, size in ((signal.SIGTERM, 143, (), 20_000),
                                     (signal.SIGINT, 130, ("--resume", str(cut), "--quiet", "--no-plots"), 45_000)):
        proc = _start(fake, tmp_path, cut, *args)
        _, err = _signal_after(proc, cut / "metrics.jsonl", size, signum)
        assert proc.returncode == code, err
        name = signal.Signals(signum).name
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert f"stopped by {name} at step" in err and f"`synthgrad train --resume {cut}`" in err, err
        step = int(err.split(" at step ")[1].split(";")[0])
        assert checkpoint.load(cut / "checkpoint.pt")["step"] == step  # written where it stopped
    r = subprocess.run([sys.executable, "-m", "synthgrad", "train", "--resume", str(cut), "--quiet", "--no-plots"],
                       env=ENV, timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _same_as_unbroken(cut, full)
