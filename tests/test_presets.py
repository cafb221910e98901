"""--preset paper: the paper's settings fill what the command line leaves unset, are saved, shown and validated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from synthgrad.cli import main
from synthgrad.config import TrainConfig
from synthgrad.errors import ConfigError

# The paper's feed-forward settings (Jaderberg et al. 2017, as summarised in ARCHITECTURE.md and issue 21),
# written out here as the oracle rather than read from presets.py.
PAPER = {"lr": 3e-5, "batch_size": 256, "schedule": "constant", "optimizer": "adam", "max_steps": 500_000}
PAPER_SYNTH = {"dni": {"synth_lr": 3e-5, "synth_hidden": 2, "synth_width": 1024},
               "cdni": {"synth_lr": 3e-5, "synth_hidden": 0}}


def _run(tmp_path: Path, fake: Path, *args: str) -> dict:
    run = tmp_path / "run"
    assert main(["train", "--data-dir", str(fake), "--no-verify-md5", "--cache-dir", str(tmp_path / "cache"),
                 "--run-dir", str(run), "--overwrite", "--quiet", "--no-plots", *args]) == 0
    return json.loads((run / "config.json").read_text())


@pytest.mark.parametrize("method", ["backprop", "dni", "cdni"])
def test_paper_preset_sets_the_papers_values(method: str) -> None:
    cfg = TrainConfig(model="fcn-3", method=method, preset="paper").resolve()
    for key, value in {**PAPER, **PAPER_SYNTH.get(method, {})}.items():
        assert getattr(cfg, key) == value, key
    # 500k steps of 256 on MNIST's 60,000 training images
    assert cfg.total_steps(60_000) == 500_000 and cfg.preset == "paper"
    plain = TrainConfig(model="fcn-3", method=method).resolve()
    assert (plain.lr, plain.batch_size, plain.schedule, plain.preset) != (cfg.lr, cfg.batch_size, cfg.schedule,
                                                                             cfg.preset)


def test_preset_fills_only_what_the_command_line_leaves_unset(tmp_path: Path, fake_data_dir: Path) -> None:
    cfg = _run(tmp_path, fake_data_dir, "--model", "fcn-2", "--method", "dni", "--preset", "paper", "--dry-run")
    assert cfg["preset"] == "paper" and cfg["max_steps"] == 20  # --dry-run was given: it wins over 500k steps
    for key, value in {**PAPER, **PAPER_SYNTH["dni"]}.items():
        assert cfg[key] == value or key == "max_steps", key
    given = _run(tmp_path, fake_data_dir, "--model", "fcn-2", "--method", "dni", "--preset", "paper", "--max-steps",
                 "3", "--lr", "1e-3", "--batch-size", "64", "--schedule", "cosine", "--synth-width", "32",
                 "--epochs", "2")
    assert (given["lr"], given["batch_size"], given["schedule"], given["synth_width"], given["epochs"],
            given["max_steps"]) == (1e-3, 64, "cosine", 32, 2, 3)
    assert (given["synth_lr"], given["synth_hidden"], given["preset"]) == (3e-5, 2, "paper")


def test_a_preset_run_resumes_with_its_preset_settings(tmp_path: Path, fake_data_dir: Path) -> None:
    first = _run(tmp_path, fake_data_dir, "--model", "mlp", "--method", "cdni", "--preset", "paper", "--max-steps",
                 "2")
    assert main(["train", "--resume", str(tmp_path / "run"), "--quiet", "--no-plots"]) == 0
    again = json.loads((tmp_path / "run" / "config.json").read_text())
    assert again == first and again["synth_hidden"] == 0 and again["lr"] == 3e-5


def test_convolutional_synthesizers_keep_their_channel_width() -> None:
    # 1024 hidden units are the paper's for vectors; on feature maps the width counts channels
    cfg = TrainConfig(model="cnn", method="dni", preset="paper").resolve()
    assert cfg.synth_width is None and cfg.synth_hidden == 2 and cfg.lr == 3e-5


def test_unknown_preset_and_preset_with_a_task_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="unknown preset 'fast'; choose one of: paper"):
        TrainConfig(model="mlp", preset="fast").resolve()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--preset", "fast"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--preset: invalid choice: 'fast'" in err and "paper" in err.splitlines()[-1]
    assert main(["train", "--task", "copy", "--preset", "paper"]) == 2
    err = capsys.readouterr().err
    assert "--preset applies to classification only" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_help_and_models_show_the_presets_settings(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--preset {paper}" in text and "paper: lr 3e-05, batch_size 256, schedule constant" in text
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "presets" in out and "dni: synth_lr 3e-05, synth_hidden 2" in out and "synth_width 1024" in out
