"""The trainer: run directory contents, resume equals an uninterrupted run, divergence keeps the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from synthgrad import checkpoint, data
from synthgrad.config import TrainConfig
from synthgrad.errors import DivergenceError
from synthgrad.metrics import read_metrics
from synthgrad.trainer import Progress, Trainer, load_network, prepare_run_dir

TIMING = {"wall_time_s", "samples_per_s", "epoch_time_s", "eval_time_s"}


def _cfg(**kw) -> TrainConfig:
    base = dict(model="fcn-2", method="dni", epochs=2, batch_size=32, width=32, synth_width=32,
                log_every=3, diagnose_every=4, checkpoint_every=5, verify_md5=False, seed=7)
    return TrainConfig(**{**base, **kw}).resolve()


def _dataset(fake_data_dir: Path, tmp_path: Path) -> data.Dataset:
    return data.load("mnist", fake_data_dir, cache_dir=tmp_path / "cache", check_md5=False)


def _run(cfg: TrainConfig, ds: data.Dataset, run_dir: Path, stop_at: int | None = None) -> Trainer:
    prepare_run_dir(run_dir, overwrite=False)

    def stop(step: int) -> None:
        if step == stop_at:
            raise KeyboardInterrupt

    t = Trainer(cfg, ds, run_dir, progress=Progress(enabled=False), on_step=stop)
    t.start()
    t.fit()
    return t


def _strip(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_run_directory_holds_config_metrics_and_checkpoints(fake_data_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg()
    t = _run(cfg, _dataset(fake_data_dir, tmp_path), tmp_path / "run")
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.json", "metrics.jsonl", "checkpoint.pt", "best.pt", "final.pt"} <= files
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["lr"] == cfg.lr and saved["extra"]["torch_version"] == torch.__version__
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1]
    for r in records:
        assert {"epoch", "step", "train_loss", "wall_time_s", "samples_per_s"} <= set(r)
    assert all(0 <= r["test_accuracy"] <= 1 for r in epochs)
    steps = [r for r in records if r["kind"] == "step"]
    assert any(r.get("grad_cosine") for r in steps) and all(len(r["synth_loss"]) == 2 for r in steps)
    net, _ = load_network(tmp_path / "run" / "final.pt")
    x = torch.randn(2, 1, 28, 28)
    t.rule.network().eval()
    torch.testing.assert_close(net(x), t.rule.network()(x))


def test_training_beats_chance_on_a_learnable_task(fake_data_dir: Path, tmp_path: Path) -> None:
    t = _run(_cfg(epochs=4, method="cdni"), _dataset(fake_data_dir, tmp_path), tmp_path / "run")
    assert t.final_accuracy > 0.5


@pytest.mark.parametrize("method", ["backprop", "dni", "cdni"])
def test_interrupted_and_resumed_run_equals_uninterrupted(method: str, fake_data_dir: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = _cfg(method=method, update_prob=0.7, eval_every=6)  # mid-epoch evaluations at steps 6, 12, 18, ...
    ds = _dataset(fake_data_dir, tmp_path)
    full = _run(cfg, ds, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        _run(cfg, ds, tmp_path / "cut", stop_at=22)  # last checkpoint: the end of epoch 0, step 16
    resumed = Trainer(cfg, ds, tmp_path / "cut", progress=Progress(enabled=False))
    resumed.resume()
    assert resumed.step == 20  # checkpoint_every=5
    resumed.fit()
    for a, b in zip(full.rule.stages.state_dict().values(), resumed.rule.stages.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for ia, ib in zip(full.rule.interfaces, resumed.rule.interfaces, strict=True):
        for a, b in zip(ia.model.state_dict().values(), ib.model.state_dict().values(), strict=True):
            assert torch.equal(a, b)
    assert _strip(read_metrics(tmp_path / "full" / "metrics.jsonl")) == _strip(
        read_metrics(tmp_path / "cut" / "metrics.jsonl"))


def test_mid_epoch_evaluations_trace_the_curve_and_leave_training_alone(fake_data_dir: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    ds = _dataset(fake_data_dir, tmp_path)
    plain = _run(_cfg(method="cdni"), ds, tmp_path / "plain")
    traced = _run(_cfg(method="cdni", eval_every=5), ds, tmp_path / "traced")  # 16 steps per epoch
    records = read_metrics(tmp_path / "traced" / "metrics.jsonl")
    evals = [r for r in records if r["kind"] == "eval"]
    assert [(r["epoch"], r["step"]) for r in evals] == [(0, 5), (0, 10), (0, 15), (1, 20), (1, 25), (1, 30)]
    assert all(0 <= r["test_accuracy"] <= 1 and r["eval_time_s"] >= 0 for r in evals)
    times = [r["wall_time_s"] for r in records]
    assert times == sorted(times)  # evaluations count in the wall time, in order
    # Evaluating (eval mode, no grad) changes nothing in training: same parameters, same step records.
    for a, b in zip(plain.rule.stages.state_dict().values(), traced.rule.stages.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert _strip([r for r in records if r["kind"] != "eval"]) == _strip(
        read_metrics(tmp_path / "plain" / "metrics.jsonl"))
    assert plain.final_accuracy == traced.final_accuracy


def test_divergence_stops_and_keeps_the_last_good_checkpoint(fake_data_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg(method="backprop")
    ds = _dataset(fake_data_dir, tmp_path)
    run_dir = tmp_path / "run"
    prepare_run_dir(run_dir, overwrite=False)

    def poison(step: int) -> None:
        if step == 12:  # after the checkpoint at step 10, make the next loss NaN
            with torch.no_grad():
                next(t.rule.stages.parameters()).fill_(float("nan"))

    t = Trainer(cfg, ds, run_dir, progress=Progress(enabled=False), on_step=poison)
    t.start()
    with pytest.raises(DivergenceError, match="step 12"):
        t.fit()
    state = checkpoint.load(run_dir / "checkpoint.pt")
    assert state["step"] == 10
    assert all(torch.isfinite(v).all() for r in state["payload"]["rule"]["stage_rules"] for v in r["stage"].values()
               if v.is_floating_point())


def test_parameters_gone_non_finite_are_never_checkpointed_and_the_run_resumes(fake_data_dir: Path,
                                                                               tmp_path: Path) -> None:
    cfg = _cfg(method="backprop")  # a checkpoint every 5 steps, 32 steps in all
    ds = _dataset(fake_data_dir, tmp_path)
    run_dir = tmp_path / "run"

    def poison(step: int) -> None:
        if step == 10:  # just before the checkpoint of step 10, and before any loss has seen it
            with torch.no_grad():
                next(t.rule.stages.parameters())[0, 0] = float("inf")

    prepare_run_dir(run_dir, overwrite=False)
    t = Trainer(cfg, ds, run_dir, progress=Progress(enabled=False), on_step=poison)
    t.start()
    with pytest.raises(DivergenceError, match=r"step 10: non-finite values in .*stage_rules.*stage\.1\.weight \(1 of"):
        t.fit()
    assert checkpoint.load(run_dir / "checkpoint.pt")["step"] == 5  # the last good one, not replaced
    resumed = Trainer(cfg, ds, run_dir, progress=Progress(enabled=False))
    resumed.resume()  # resuming does not meet the same error again
    assert resumed.fit().steps == 32


def test_existing_run_directory_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    from synthgrad.errors import ConfigError

    with pytest.raises(ConfigError, match="--overwrite"):
        prepare_run_dir(tmp_path / "run", overwrite=False)
    assert (tmp_path / "run" / "metrics.jsonl").exists()
