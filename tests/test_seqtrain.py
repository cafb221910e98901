"""Sequence runs: resumes reproduce an unbroken run's records, finished runs stay finished, bad starts leave nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from runfiles import records

from synthgrad.cli import main
from synthgrad.config import TrainConfig
from synthgrad.metrics import read_metrics
from synthgrad.seqconfig import SequenceConfig


def _copy(run: Path, *extra: str) -> list[str]:
    return ["train", "--task", "copy", "--method", "dni", "--truncation", "3", "--width", "16", "--synth-width", "16",
            "--batch-size", "4", "--max-steps", "24", "--log-every", "4", "--checkpoint-every", "5", "--synth-warmup",
            "0", "--run-dir", str(run), "--quiet", "--no-plots", *extra]


def test_resuming_a_finished_run_adds_no_final_record(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(_copy(run)) == 0
    once = records(run)
    for _ in range(2):
        assert main(["train", "--resume", str(run), "--quiet", "--no-plots"]) == 0
    assert [r["kind"] for r in read_metrics(run / "metrics.jsonl")].count("final") == 1
    assert records(run) == once


def test_a_resume_inside_a_logging_window_gives_the_records_of_an_unbroken_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from synthgrad.seqtrain import SequenceTrainer

    assert main(_copy(tmp_path / "whole")) == 0
    cut = tmp_path / "cut"
    step = SequenceTrainer._copy_step
    calls = []

    def dies_at_step_7(self: SequenceTrainer) -> dict:
        calls.append(1)
        if len(calls) == 7:  # the checkpoint at step 5 lies inside the window of steps 5..8
            raise SystemExit("killed")
        return step(self)

    monkeypatch.setattr(SequenceTrainer, "_copy_step", dies_at_step_7)
    with pytest.raises(SystemExit):
        main(_copy(cut))
    monkeypatch.undo()
    assert main(["train", "--resume", str(cut), "--quiet", "--no-plots"]) == 0
    whole = records(tmp_path / "whole")
    assert len([r for r in whole if r["kind"] == "step"]) == 6 and records(cut) == whole


def test_charlm_text_too_short_for_the_streams_is_refused_with_the_minimum(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture) -> None:
    text = tmp_path / "short.txt"
    base = ["train", "--task", "charlm", "--text", str(text), "--width", "8", "--max-steps", "2", "--quiet",
            "--no-plots"]
    # Defaults: 32 streams of windows of 5 need 32 x 6 training characters, 90% of the text: 214 characters.
    for n in (100, 150, 213):
        text.write_text(("abcdefghij" * 30)[:n])
        assert main([*base, "--run-dir", str(tmp_path / f"r{n}")]) == 2
        err = capsys.readouterr().err
        assert f"holds {n} characters" in err and "at least 214" in err and "Traceback" not in err, err
        assert not (tmp_path / f"r{n}").exists()
    text.write_text(("abcdefghij" * 30)[:214])
    assert main([*base, "--run-dir", str(tmp_path / "r214")]) == 0


def test_a_refused_start_leaves_no_run_directory(tmp_path: Path, fake_data_dir: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--task", "charlm", "--text", str(tmp_path / "missing.txt"), "--run-dir",
                 str(tmp_path / "a")]) == 3
    junk = tmp_path / "junk"
    junk.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (junk / name).write_bytes(b"\x00" * 16)
    assert main(["train", "--data-dir", str(junk), "--no-verify-md5", "--cache-dir", str(tmp_path / "c"),
                 "--run-dir", str(tmp_path / "b")]) == 3
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_both_configurations_share_the_common_fields_and_checks() -> None:
    from synthgrad.config import CommonConfig

    shared = {f for f in CommonConfig.__dataclass_fields__}
    assert {"seed", "device", "threads", "lr", "synth_lr", "schedule", "max_steps", "log_every",
            "checkpoint_every", "extra"} <= shared
    assert shared <= set(TrainConfig.__dataclass_fields__) and shared <= set(SequenceConfig.__dataclass_fields__)
    from synthgrad.errors import ConfigError

    for cfg in (TrainConfig(model="fcn-2", seed=-1), SequenceConfig(task="copy", seed=-1)):
        with pytest.raises(ConfigError, match="--seed must be >= 0"):
            cfg.resolve()
    # config.json of an existing run (keys in the old order) still loads
    old = SequenceConfig(task="copy").resolve().to_dict()
    assert SequenceConfig.from_dict(dict(reversed(list(old.items())))) == SequenceConfig(task="copy").resolve()


def test_sigterm_stops_a_sequence_run_after_a_step_and_it_resumes_exactly(tmp_path: Path) -> None:
    import os
    import signal

    from synthgrad import checkpoint
    from synthgrad.errors import Interrupted
    from synthgrad.seqtrain import SequenceTrainer
    from synthgrad.stopping import StopRequests

    assert main(_copy(tmp_path / "whole")) == 0
    cfg = SequenceConfig(task="copy", truncation=3, hidden=16, synth_width=16, batch_size=4, max_steps=24,
                         log_every=4, checkpoint_every=5, synth_warmup=0).resolve()
    cut = tmp_path / "cut"

    def signal_at_step_7(step: int) -> None:
        if step == 7:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, handled in this process

    with StopRequests() as stop:
        trainer = SequenceTrainer(cfg, cut, stop=stop, on_step=signal_at_step_7)
        trainer.start()
        with pytest.raises(Interrupted, match=f"stopped by SIGTERM at step 7; .*--resume {cut}") as info:
            trainer.fit()
    assert info.value.exit_code == 143 and checkpoint.load(cut / checkpoint.LATEST)["step"] == 7
    assert main(["train", "--resume", str(cut), "--quiet", "--no-plots"]) == 0
    assert records(cut) == records(tmp_path / "whole")
