"""The sequence tasks' defaults table: what fills unset flags, what the user's flags override, what a resume keeps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from runfiles import records

from synthgrad.cli import build_parser, main
from synthgrad.seqconfig import SequenceConfig, config_from_args
from synthgrad.seqdefaults import SEQUENCE_DEFAULTS, TRUNCATION


def _resolve(*args: str) -> SequenceConfig:
    return config_from_args(build_parser().parse_args(["train", *args]))


@pytest.mark.parametrize("task,method", sorted(SEQUENCE_DEFAULTS))
def test_every_unset_field_comes_from_the_tasks_row(task: str, method: str) -> None:
    cfg = SequenceConfig(task=task, method=method, text="t.txt" if task == "charlm" else None).resolve()
    assert cfg.truncation == TRUNCATION == 5
    for key, value in SEQUENCE_DEFAULTS[(task, method)].items():
        assert getattr(cfg, key) == value, key
    # BPTT has no synthesizer to discount; DNI always records the discount it trains with
    assert (cfg.synth_discount is None) == (method == "bptt")


def test_flags_win_and_the_charlm_discount_follows_the_scale() -> None:
    copy = _resolve("--task", "copy", "--method", "dni", "--synth-scale", "0.5", "--max-steps", "7", "--clip", "2",
                    "--schedule", "cosine", "--width", "8")
    assert (copy.synth_scale, copy.synth_discount, copy.max_steps, copy.clip, copy.schedule, copy.hidden) == \
        (0.5, 1.0, 7, 2.0, "cosine", 8)
    charlm = _resolve("--task", "charlm", "--text", "t.txt", "--method", "dni", "--synth-scale", "0.5")
    assert (charlm.synth_scale, charlm.synth_discount, charlm.aux_weight) == (0.5, 0.5, 100.0)
    assert _resolve("--task", "charlm", "--text", "t.txt", "--method", "dni", "--synth-discount", "1").synth_discount \
        == 1.0
    assert _resolve("--task", "copy", "--method", "dni", "--aux-weight", "0").aux_weight == 0.0


def test_a_run_saved_before_the_table_resumes_with_its_own_settings(tmp_path: Path) -> None:
    # --truncation 1: every episode crosses window boundaries, so the discount weighs the synthesizer's targets
    base = ["train", "--task", "copy", "--method", "dni", "--truncation", "1", "--width", "8", "--batch-size", "4",
            "--synth-warmup", "0", "--log-every", "1", "--synth-discount", "0.1", "--quiet", "--no-plots"]
    assert main([*base, "--max-steps", "6", "--run-dir", str(tmp_path / "whole")]) == 0
    run = tmp_path / "run"
    assert main([*base, "--max-steps", "3", "--run-dir", str(run)]) == 0
    cfg = json.loads((run / "config.json").read_text())
    # As saved before 2026-11-30, when a None discount meant the scale (0.1): today's default would be 1.
    cfg.update(synth_discount=None, max_steps=6)
    (run / "config.json").write_text(json.dumps(cfg))
    assert main(["train", "--resume", str(run), "--quiet", "--no-plots"]) == 0
    assert records(run) == records(tmp_path / "whole")  # trained on with the discount at the scale, as it began


def test_help_gives_each_tasks_default(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "clip each window's gradient norm to this; default: copy 1, repeat-copy 1, charlm 5" in text
    assert "copy 20000, repeat-copy 20000, charlm 40000" in text
    assert main(["models"]) == 0
    assert "charlm      dni   hidden 256" in capsys.readouterr().out
