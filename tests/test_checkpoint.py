"""Checkpoint files: a damaged or non-finite checkpoint is refused with its cause, never resumed silently wrong."""

from __future__ import annotations

import errno
import hashlib
import io
import random
from pathlib import Path

import pytest
import torch
from runfiles import payload, records, stages

from synthgrad import checkpoint
from synthgrad.cli import main
from synthgrad.errors import ConfigError, DivergenceError


def _train(fake: Path, tmp: Path, run: Path, *extra: str) -> list[str]:
    """A tiny run: 2 epochs of 16 steps, a checkpoint every 5 steps and at each epoch end."""
    return ["train", "--data-dir", str(fake), "--no-verify-md5", "--cache-dir", str(tmp / "cache"), "--model", "fcn-2",
            "--width", "16", "--synth-width", "16", "--batch-size", "32", "--epochs", "2", "--checkpoint-every", "5",
            "--log-every", "4", "--threads", "1", "--quiet", "--no-plots", "--run-dir", str(run), *extra]


def _cut_at(fake: Path, tmp: Path, run: Path, step: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Start the tiny run and let it die after `step` (its checkpoints up to there written)."""
    from synthgrad import trainer

    fit = trainer.Trainer.fit

    def dying_fit(self: trainer.Trainer) -> object:
        def die(at: int) -> None:
            if at == step:
                raise SystemExit("killed")  # not a SynthgradError: as abrupt as a kill for what is on disk
        self.on_step = die
        return fit(self)

    monkeypatch.setattr(trainer.Trainer, "fit", dying_fit)
    with pytest.raises(SystemExit):
        main(_train(fake, tmp, run))
    monkeypatch.undo()


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def unbroken(fake_data_dir: Path, tmp_path: Path) -> Path:
    run = tmp_path / "unbroken"
    assert main(_train(fake_data_dir, tmp_path, run)) == 0
    return run


def test_a_flipped_exponent_byte_is_refused_and_the_previous_checkpoint_resumes(
        fake_data_dir: Path, tmp_path: Path, unbroken: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    """The issue's case: one exponent byte of a weight; refused, then --from-previous ends as the unbroken run."""
    run = tmp_path / "run"
    _cut_at(fake_data_dir, tmp_path, run, 23, monkeypatch)  # checkpoints at 5, 10, 15, 16 (epoch end), 20
    latest = run / checkpoint.LATEST
    weight = payload(checkpoint.load(latest))["rule"]["stage_rules"][0]["stage"]["1.weight"]
    raw = bytearray(latest.read_bytes())
    at = raw.find(weight.numpy().tobytes()[:64])  # the weight's storage inside the file
    assert at > 0
    raw[at + 3] ^= 0x40  # the first float's exponent: a weight of ~0.03 becomes ~1e17
    latest.write_bytes(bytes(raw))
    capsys.readouterr()

    assert main(["train", "--resume", str(run), "--quiet", "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "integrity check" in err and f"--resume {run} --from-previous" in err
    assert main(["train", "--resume", str(run), "--from-previous", "--quiet", "--no-plots"]) == 0
    assert _equal(stages(run), stages(unbroken))
    assert records(run) == records(unbroken)  # metrics cut back to the previous checkpoint, nothing twice
    assert (run / "checkpoint.damaged.pt").is_file()


def test_random_byte_flips_are_refused_or_resume_exactly(fake_data_dir: Path, tmp_path: Path, unbroken: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    """Fault injection: 20 seeded tries of 1 to 3 flipped bytes in checkpoint.pt. Never silently wrong."""
    run = tmp_path / "run"
    _cut_at(fake_data_dir, tmp_path, run, 29, monkeypatch)  # last checkpoint at step 25: short resumes
    good = (run / checkpoint.LATEST).read_bytes()
    metrics = (run / "metrics.jsonl").read_bytes()
    rng = random.Random(19)
    outcomes = []
    for _ in range(20):
        raw = bytearray(good)
        for _ in range(rng.randint(1, 3)):
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        (run / checkpoint.LATEST).write_bytes(bytes(raw))
        (run / "metrics.jsonl").write_bytes(metrics)
        (run / checkpoint.FINAL).unlink(missing_ok=True)
        capsys.readouterr()
        code = main(["train", "--resume", str(run), "--quiet", "--no-plots"])
        err = capsys.readouterr().err
        if code == 0:  # resumed: then exactly as the unbroken run
            assert _equal(stages(run), stages(unbroken)) and records(run) == records(unbroken)
        else:
            assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
            assert str(run / checkpoint.LATEST) in err
        outcomes.append(code)
    assert outcomes.count(2) >= 15  # the checksum covers every byte


def test_non_finite_weights_in_a_checkpoint_are_named_on_resume(fake_data_dir: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    """A checkpoint written with an infinite weight (as before checkpoints were checked: a bare torch.save)."""
    run = tmp_path / "run"
    assert main(_train(fake_data_dir, tmp_path, run, "--epochs", "1")) == 0
    state = checkpoint.load(run / checkpoint.LATEST)
    flat = {**payload(state), "step": state["step"], "config": state["config"],
            "metrics_offset": state["metrics_offset"]}  # the trainer's layout before the envelope
    flat["rule"]["stage_rules"][1]["stage"]["0.weight"][0, 0] = float("inf")
    flat["epoch"] = 0  # so that the resume has steps to take
    torch.save(flat, run / checkpoint.LATEST)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--quiet", "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "non-finite values in rule.stage_rules.1.stage.0.weight (1 of" in err and "diverged" in err
    assert "Traceback" not in err


def test_a_diverged_state_never_replaces_the_last_good_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / checkpoint.LATEST
    checkpoint.save(path, {"w": torch.ones(3), "step": 5})
    with pytest.raises(DivergenceError, match=r"non-finite values in w \(1 of 3\)"):
        checkpoint.save(path, {"w": torch.tensor([1.0, float("nan"), 2.0]), "step": 6})
    assert checkpoint.load(path)["step"] == 5
    assert not (tmp_path / checkpoint.PREVIOUS).exists()  # nothing was rotated either
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.LATEST]


def test_each_write_keeps_the_previous_checkpoint_and_uses_its_own_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / checkpoint.LATEST
    for step in (1, 2, 3):
        checkpoint.save(path, {"step": step})
    assert checkpoint.load(path)["step"] == 3 and checkpoint.load(tmp_path / checkpoint.PREVIOUS)["step"] == 2
    a, b = checkpoint.temp_path(path), checkpoint.temp_path(path)
    assert a != b and str(__import__("os").getpid()) in a.name and checkpoint.is_temp(a.name)
    raw = path.read_bytes()  # the format: magic, SHA-256 of the body, body
    assert raw.startswith(checkpoint.MAGIC) and hashlib.sha256(raw[48:]).digest() == raw[16:48]
    assert torch.load(io.BytesIO(raw[48:]), weights_only=False) == {"step": 3}


def test_a_writer_killed_after_keeping_the_previous_checkpoint_leaves_no_stray_file(tmp_path: Path) -> None:
    # kill -9 between keeping checkpoint.prev.pt (a hard link to checkpoint.pt) and renaming the new file onto
    # checkpoint.pt leaves both names on one file; the next write must still keep it and leave no temporary link.
    path, previous = tmp_path / checkpoint.LATEST, tmp_path / checkpoint.PREVIOUS
    checkpoint.save(path, {"step": 1})
    previous.hardlink_to(path)
    checkpoint.save(path, {"step": 2})
    assert checkpoint.load(path)["step"] == 2 and checkpoint.load(previous)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([checkpoint.LATEST, checkpoint.PREVIOUS])


class _FullDisk:
    """An open() for checkpoint.py whose files take `room` bytes, then fail as a full disk does."""

    def __init__(self, room: int):
        self.room = room

    def __call__(self, path: Path, mode: str = "r") -> _Limited:
        return _Limited(open(path, mode), self.room)  # noqa: SIM115 (closed by _Limited)


class _Limited:
    def __init__(self, f: io.BufferedWriter, room: int):
        self.f, self.room = f, room

    def write(self, data: bytes | memoryview) -> int:
        if len(data) > self.room:
            self.f.write(bytes(data[:self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self.f, name)

    def __enter__(self) -> _Limited:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()


def test_a_full_disk_stops_with_one_line_removes_the_partial_file_and_keeps_the_checkpoint(
        fake_data_dir: Path, tmp_path: Path, unbroken: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    from synthgrad import trainer

    run = tmp_path / "run"
    save = trainer.Trainer.save_checkpoint

    def save_then_fill_the_disk(self: trainer.Trainer) -> None:
        if self.step == 20:  # this checkpoint finds the disk full, 10 kB into the file
            monkeypatch.setattr(checkpoint, "open", _FullDisk(10_000), raising=False)
        save(self)

    monkeypatch.setattr(trainer.Trainer, "save_checkpoint", save_then_fill_the_disk)
    capsys.readouterr()
    assert main(_train(fake_data_dir, tmp_path, run)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"No space left on device writing {run / checkpoint.LATEST}" in err and f"--resume {run}" in err
    assert not [p.name for p in run.iterdir() if checkpoint.is_temp(p.name)]  # the partial file is gone
    assert checkpoint.load(run / checkpoint.LATEST)["step"] == 16  # the previous checkpoint, whole
    monkeypatch.undo()
    assert main(["train", "--resume", str(run), "--quiet", "--no-plots"]) == 0  # space freed: resume
    assert _equal(stages(run), stages(unbroken)) and records(run) == records(unbroken)


def test_damaged_files_get_a_clear_error(tmp_path: Path) -> None:
    for name, raw in (("empty.pt", b""), ("junk.pt", b"hello world"), ("short.pt", checkpoint.MAGIC + b"\x00" * 8)):
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(ConfigError, match="damaged|unreadable"):
            checkpoint.load(tmp_path / name)
    with pytest.raises(ConfigError, match="no checkpoint"):
        checkpoint.load(tmp_path / "missing.pt")
