"""Run directories: one run per directory (locked), clear errors for files and read-only places, one envelope."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from runfiles import payload

from synthgrad import checkpoint
from synthgrad.cli import main
from synthgrad.config import TrainConfig
from synthgrad.errors import ConfigError
from synthgrad.metrics import read_metrics


def _train(fake: Path, tmp: Path, *args: str) -> list[str]:
    return ["train", "--data-dir", str(fake), "--no-verify-md5", "--cache-dir", str(tmp / "cache"), "--model", "fcn-2",
            "--width", "16", "--synth-width", "16", "--max-steps", "3", "--quiet", "--no-plots", *args]


def _copy(*args: str) -> list[str]:
    return ["train", "--task", "copy", "--width", "8", "--batch-size", "4", "--max-steps", "3", "--quiet", "--no-plots",
            *args]


def _one_line_error(capsys: pytest.CaptureFixture, *needles: str) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "internal error" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_run_dir_naming_a_file_is_refused_for_every_kind_of_run(fake_data_dir: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    file = tmp_path / "notes.txt"
    file.write_text("keep me\n")
    for args in (_train(fake_data_dir, tmp_path, "--run-dir", str(file)),
                 _train(fake_data_dir, tmp_path, "--run-dir", str(file), "--overwrite"),
                 _train(fake_data_dir, tmp_path, "--run-dir", str(file), "--overwrite", "--stages", "2"),
                 _copy("--run-dir", str(file)), _copy("--run-dir", str(file), "--overwrite"),
                 ["train", "--resume", str(file)]):
        assert main(args) == 2, args
        _one_line_error(capsys, str(file))
    assert file.read_text() == "keep me\n"


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[tuple[Path, Callable[[], None]]]:
    """(a directory, a function that makes it read-only): permissions for a user, a read-only tmpfs for root."""
    d = tmp_path / "ro"
    d.mkdir()
    root = os.geteuid() == 0
    if root and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(d)],
                               capture_output=True).returncode != 0:
        pytest.skip("root without the right to mount a tmpfs: no way to make a directory read-only")

    def freeze() -> None:
        if root:
            subprocess.run(["mount", "-o", "remount,ro", str(d)], check=True)
        else:
            for p in [d, *d.rglob("*")]:
                if p.is_dir():
                    p.chmod(0o555)

    yield d, freeze
    if root:
        subprocess.run(["umount", "-l", str(d)], check=False)
    else:
        for p in [d, *d.rglob("*")]:
            if p.is_dir():
                p.chmod(0o755)


def test_read_only_run_directories_are_refused_clearly(fake_data_dir: Path, tmp_path: Path, capsys:
                                                       pytest.CaptureFixture, read_only: tuple) -> None:
    ro, freeze = read_only
    run = ro / "run"
    assert main(_train(fake_data_dir, tmp_path, "--run-dir", str(run))) == 0
    (ro / "empty").mkdir()
    freeze()
    capsys.readouterr()
    before = {p.name: p.stat().st_size for p in run.iterdir()}
    for args in (_train(fake_data_dir, tmp_path, "--run-dir", str(ro / "new")),  # a new run: mkdir fails
                 _train(fake_data_dir, tmp_path, "--run-dir", str(ro / "empty")),  # an empty directory
                 ["train", "--resume", str(run), "--quiet", "--no-plots"],
                 _train(fake_data_dir, tmp_path, "--run-dir", str(run), "--overwrite"),
                 _train(fake_data_dir, tmp_path, "--run-dir", str(ro / "new"), "--stages", "2"),
                 _copy("--run-dir", str(ro / "new"))):
        assert main(args) == 2, args
        _one_line_error(capsys, "not writable")
    assert {p.name: p.stat().st_size for p in run.iterdir()} == before


def test_a_claimed_directory_is_refused_naming_its_holder_and_overwrite_deletes_nothing(
        fake_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from synthgrad.rundir import RunDir

    run = tmp_path / "run"
    assert main(_train(fake_data_dir, tmp_path, "--run-dir", str(run))) == 0
    files = sorted(p.name for p in run.iterdir())
    capsys.readouterr()
    with RunDir(run, "classifier") as held:  # as a running run holds it
        held.reopen()
        for args in (_train(fake_data_dir, tmp_path, "--run-dir", str(run), "--overwrite"),
                     ["train", "--resume", str(run), "--quiet", "--no-plots"],
                     _train(fake_data_dir, tmp_path, "--run-dir", str(run), "--overwrite", "--stages", "2")):
            assert main(args) == 2
            _one_line_error(capsys, "in use by another synthgrad run", f"pid {os.getpid()}")
        assert sorted(p.name for p in run.iterdir()) == files
    # Released (as when the holder ends or is killed): the directory can be taken again.
    assert main(_train(fake_data_dir, tmp_path, "--run-dir", str(run), "--overwrite")) == 0


def test_two_processes_started_into_one_directory_exactly_one_proceeds(fake_data_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    run = tmp_path / "run"
    args = ["--run-dir", str(run), "--max-steps", "800", "--epochs", "50", "--batch-size", "32", "--log-every", "10",
            "--threads", "1"]  # a few seconds of training
    procs = [subprocess.Popen([sys.executable, "-m", "synthgrad", *_train(fake_data_dir, tmp_path, *args, "--seed",
                                                                          str(seed))],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (1, 2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], outs
    winner = codes.index(0)
    loser_err = outs[1 - winner][1]
    assert "in use by another synthgrad run" in loser_err or "already holds a run" in loser_err, loser_err
    # One run's files only: config, checkpoints and metrics agree on its seed, and no step is logged twice.
    seed = winner + 1
    assert json.loads((run / "config.json").read_text())["seed"] == seed
    for name in (checkpoint.LATEST, checkpoint.FINAL):
        assert checkpoint.load(run / name)["config"]["seed"] == seed
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "step"]
    assert steps == sorted(set(steps)) and steps[-1] == 800 and len(steps) == 80 + 50 - 10  # + epoch ends


def test_overwrite_deletes_only_a_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(b"\xff\xd8")
    assert main(_copy("--run-dir", str(photos), "--overwrite")) == 2
    _one_line_error(capsys, "no synthgrad run", "--overwrite deletes only runs")
    assert (photos / "cat.jpg").exists()


def test_one_envelope_round_trip_and_resume_cuts_metrics_back(tmp_path: Path) -> None:
    from synthgrad.rundir import Checkpoint, RunDir

    cfg = TrainConfig(model="fcn-2", width=8, epochs=1, batch_size=4, lr=1e-3)
    with RunDir(tmp_path / "run", "classifier") as run:
        run.create()
        run.begin(cfg, "fake data", note="x")
        assert run.metrics is not None
        run.metrics.write({"kind": "step", "step": 1})
        run.save_checkpoint(1, {"w": torch.ones(2)})
        run.metrics.write({"kind": "step", "step": 2})  # after the checkpoint: dropped by a resume
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["extra"]["data_source"] == "fake data" and saved["extra"]["note"] == "x"
    with RunDir(tmp_path / "run", "classifier") as run:
        ckpt = run.resume(cfg)
        assert isinstance(ckpt, Checkpoint) and (ckpt.kind, ckpt.step) == ("classifier", 1)
        assert torch.equal(payload(checkpoint.load(tmp_path / "run" / checkpoint.LATEST))["w"], torch.ones(2))
        assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1]
    with RunDir(tmp_path / "run", "sequence") as run, pytest.raises(ConfigError, match="classifier run"):
        run.resume(cfg)


def test_a_writer_attaches_to_the_directory_its_launcher_holds(tmp_path: Path) -> None:
    from synthgrad.rundir import RunDir

    cfg = TrainConfig(model="fcn-2", width=8, epochs=1, batch_size=4, lr=1e-3, stages=2)
    with RunDir(tmp_path / "run", "pipeline") as launcher:
        launcher.create()
        with RunDir(tmp_path / "run", "pipeline") as rank0:  # in a spawned stage process, in the engine
            rank0.attach()
            rank0.begin(cfg, "fake data", engine="pipeline")
            rank0.save_checkpoint(0, {"positions": []})
        with RunDir(tmp_path / "run", "pipeline") as other, pytest.raises(ConfigError, match="in use"):
            other.reopen()  # anyone else is still refused
    assert checkpoint.load(tmp_path / "run" / checkpoint.LATEST)["kind"] == "pipeline"
