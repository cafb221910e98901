"""Plots of sequence runs: held-out BPC over steps (charlm), longest length solved over steps (copy tasks)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from synthgrad.errors import ConfigError  # noqa: E402
from synthgrad.metrics import read_metrics  # noqa: E402
from synthgrad.plots import finish_figure  # noqa: E402


def is_sequence_run(run_dir: str | Path) -> bool:
    """True when the run directory's config.json names a sequence task."""
    try:
        return "task" in json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False


def sequence_label(run_dir: Path) -> str:
    """'task method T=5 s0' from the run's config.json."""
    try:
        cfg = json.loads((run_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return run_dir.name
    return f"{cfg.get('task')} {cfg.get('method')} T={cfg.get('truncation')} s{cfg.get('seed', 0)}"


def plot_sequence_runs(run_dirs: list[str | Path], out_dir: str | Path) -> list[Path]:
    """Write bpc.png (charlm runs) and/or length.png (copy runs), plus seq_loss.png for all."""
    runs = []
    for d in map(Path, run_dirs):
        if not (d / "metrics.jsonl").is_file():
            raise ConfigError(f"{d} has no metrics.jsonl; give the directory of a synthgrad run")
        runs.append((d, read_metrics(d / "metrics.jsonl")))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def figure(key: str, kind: str, name: str, title: str, ylabel: str, log: bool = False, **style) -> None:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        drawn = False
        for d, recs in runs:
            pts = [(r["step"], r[key]) for r in recs if r.get("kind") == kind and r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=sequence_label(d), **style)
                drawn = True
        if not drawn:
            plt.close(fig)
            return
        written.append(finish_figure(fig, ax, out / name, title=title, ylabel=ylabel, log=log))

    figure("bpc", "eval", "bpc.png", "Held-out bits per character", "BPC", marker="o", ms=3)
    figure("max_length_solved", "step", "length.png", "Longest sequence length solved", "length N",
           drawstyle="steps-post")
    figure("train_loss", "step", "seq_loss.png", "Training loss", "loss (nats per sequence or per char)", log=True)
    return written
