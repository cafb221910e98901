"""--tensorboard: TensorBoard's own reader finds every metric of metrics.jsonl, once, also across a resume."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from synthgrad import data
from synthgrad.cli import main
from synthgrad.config import TrainConfig
from synthgrad.metrics import read_metrics
from synthgrad.trainer import Progress, Trainer, prepare_run_dir


def _board(run: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})  # 0: keep every value
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _expected(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    # The oracle, written out: "step" records keep their keys, other kinds get "kind/" in front, lists one tag per
    # entry (interface_i, or stage_i for stage_* keys); None and the step itself are not scalars.
    out: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        prefix = "" if r["kind"] == "step" else r["kind"] + "/"
        for key, value in r.items():
            if key in ("kind", "step") or value is None:
                continue
            if isinstance(value, list):
                unit = "stage" if key.startswith("stage_") else "interface"
                for i, v in enumerate(value, start=1):
                    if v is not None:
                        out.setdefault(f"{prefix}{key}/{unit}_{i}", []).append((r["step"], float(v)))
            else:
                out.setdefault(prefix + key, []).append((r["step"], float(value)))
    return out


def _assert_same(board: dict, records: list[dict]) -> None:
    want = _expected(records)
    assert set(board) == set(want)
    for tag, points in want.items():
        got = board[tag]
        assert [s for s, _ in got] == [s for s, _ in points], tag  # every step once, in order: no duplicates
        assert all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6) for (_, a), (_, b) in zip(got, points, strict=True))


def test_classifier_run_writes_every_metric(fake_data_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["train", "--data-dir", str(fake_data_dir), "--no-verify-md5", "--cache-dir", str(tmp_path / "c"),
                 "--model", "fcn-3", "--width", "32", "--synth-width", "32", "--method", "cdni", "--epochs", "2",
                 "--log-every", "3", "--diagnose-every", "4", "--eval-every", "5", "--tensorboard", "--no-plots",
                 "--quiet", "--run-dir", str(run)]) == 0
    board = _board(run)
    assert {"train_loss", "synth_loss/interface_1", "synth_loss/interface_3", "grad_cosine/interface_2",
            "grad_rel_error/interface_1", "epoch/test_accuracy", "epoch/train_loss", "eval/test_accuracy"} <= set(board)
    _assert_same(board, read_metrics(run / "metrics.jsonl"))


def test_resume_leaves_no_duplicate_scalars(fake_data_dir: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(model="fcn-2", method="dni", epochs=2, batch_size=32, width=32, synth_width=32, log_every=1,
                      diagnose_every=2, checkpoint_every=5, verify_md5=False, tensorboard=True).resolve()
    ds = data.load("mnist", fake_data_dir, cache_dir=tmp_path / "c", check_md5=False)
    run = tmp_path / "run"
    prepare_run_dir(run, overwrite=False)

    def stop(step: int) -> None:
        if step == 8:
            raise KeyboardInterrupt

    t = Trainer(cfg, ds, run, progress=Progress(enabled=False), on_step=stop)
    t.start()
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    assert t.metrics is None  # the interrupted run closed its directory: steps 6 and 7 reached both files
    assert max(s for s, _ in _board(run)["train_loss"]) == 7
    resumed = Trainer(cfg, ds, run, progress=Progress(enabled=False))
    resumed.resume()  # back to the checkpoint of step 5: the records of steps 6 and 7 are dropped and redone
    resumed.fit()
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "step"] == list(range(1, 33))
    _assert_same(_board(run), records)


def test_sequence_run_writes_its_metrics(tmp_path: Path) -> None:
    run = tmp_path / "copy"
    assert main(["train", "--task", "copy", "--method", "dni", "--truncation", "3", "--width", "16", "--max-steps",
                 "12", "--log-every", "4", "--tensorboard", "--no-plots", "--quiet", "--run-dir", str(run)]) == 0
    board = _board(run)
    assert {"train_loss", "bit_error", "final/max_length_solved"} <= set(board)
    _assert_same(board, read_metrics(run / "metrics.jsonl"))


def test_missing_package_is_one_clear_line(fake_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    code = main(["train", "--data-dir", str(fake_data_dir), "--no-verify-md5", "--tensorboard", "--quiet",
                 "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == ("synthgrad: error: --tensorboard needs the tensorboard package: "
                                 "pip install 'synthgrad[tensorboard]'")
    assert not (tmp_path / "run").exists()


def test_resume_turns_tensorboard_on_with_the_whole_history(fake_data_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["--data-dir", str(fake_data_dir), "--no-verify-md5", "--cache-dir", str(tmp_path / "c"), "--model",
            "mlp", "--method", "backprop", "--max-steps", "6", "--log-every", "2", "--no-plots", "--quiet"]
    assert main(["train", *args, "--run-dir", str(run)]) == 0
    assert not (run / "tensorboard").exists()
    assert main(["train", "--resume", str(run), "--tensorboard", "--no-plots", "--quiet"]) == 0
    _assert_same(_board(run), read_metrics(run / "metrics.jsonl"))
