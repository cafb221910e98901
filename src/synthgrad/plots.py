"""Plots from run directories: loss, synthesizer loss (log scale), test accuracy, gradient cosine."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from synthgrad.errors import ConfigError  # noqa: E402
from synthgrad.metrics import read_metrics  # noqa: E402


def run_label(run_dir: Path) -> str:
    """'model method' (plus seed and target when not default) from the run's config.json."""
    try:
        cfg = json.loads((run_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return run_dir.name
    label = f"{cfg.get('model')} {cfg.get('method')}"
    if cfg.get("target", "bootstrap") != "bootstrap" and cfg.get("method") != "backprop":
        label += f" ({cfg['target']} targets)"
    if cfg.get("stages"):
        label += f" K={cfg['stages']}"
    if cfg.get("unlock", "update") == "complete":
        label += " complete unlock"
    if cfg.get("update_prob", 1.0) < 1.0:
        label += f" p={cfg['update_prob']}"
    if cfg.get("optimizer", "adam") != "adam":
        label += f" {cfg['optimizer']}"
    return label + f" s{cfg.get('seed', 0)}"


def _load(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no metrics.jsonl; give the directory of a synthgrad run")
    return read_metrics(path)


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def _series(records: list[dict], key: str, index: int | None = None) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        if r.get("kind") != "step" or r.get(key) is None:
            continue
        v = r[key] if index is None else (r[key][index] if index < len(r[key]) else None)
        if v is not None:
            xs.append(r["step"])
            ys.append(v)
    return xs, ys


def finish_figure(fig: plt.Figure, ax: plt.Axes, path: Path, *, title: str, ylabel: str, log: bool = False,
                  xlabel: str = "step", legend_size: int = 7) -> Path:
    """Label, grid and legend an axes, save the figure as PNG at `path` and close it."""
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title, yscale="log" if log else "linear")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_runs(run_dirs: list[str | Path], out_dir: str | Path) -> list[Path]:
    """Write loss.png, accuracy.png and, for DNI runs, synth_loss.png, grad_cosine.png, param_cosine.png and
    act_rms.png."""
    runs = [(Path(d), _load(Path(d))) for d in run_dirs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for d, recs in runs:
        xs, ys = _series(recs, "train_loss")
        if xs:
            ax.plot(xs, _smooth(ys, 5), label=run_label(d))
    written.append(finish_figure(fig, ax, out / "loss.png", title="Classification loss",
                                 ylabel="training loss (cross-entropy)", log=True, legend_size=8))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for d, recs in runs:
        ep = [r for r in recs if r.get("kind") == "epoch"]
        if not ep:
            continue
        # Mid-epoch evaluations (--eval-every) join the curve at their fraction of an epoch.
        per_epoch = next((r["step"] / (r["epoch"] + 1) for r in ep if r.get("complete", True)), None)
        evals = [r for r in recs if r.get("kind") == "eval"] if per_epoch else []
        at = {id(r): r["step"] / per_epoch if per_epoch else r["epoch"] + 1 for r in ep + evals}  # x, in epochs
        line = sorted((at[id(r)], 100 * r["test_accuracy"]) for r in ep + evals)
        (drawn,) = ax.plot(*zip(*line, strict=True), label=run_label(d))
        ax.plot([at[id(r)] for r in ep], [100 * r["test_accuracy"] for r in ep], "o", ms=3, color=drawn.get_color())
    written.append(finish_figure(fig, ax, out / "accuracy.png", title="Test accuracy", ylabel="test accuracy (%)",
                                 xlabel="epoch", legend_size=8))

    # (key, file, title, y label, log scale, a second key drawn dashed where it differs from the first)
    for key, name, title, ylabel, log, dashed in (
        ("synth_loss", "synth_loss.png", "Synthesizer loss per interface", "MSE to target", True, None),
        ("grad_cosine", "grad_cosine.png", "Synthetic vs true gradient (dashed: as the stage applied it)",
         "cosine similarity", False, "applied_cosine"),
        ("param_cosine", "param_cosine.png", "Stage update under the synthetic vs the true gradient",
         "cosine of parameter gradients", False, None),
        ("input_loss", "input_loss.png", "Synthetic input loss per stage (complete unlock)",
         "MSE to the real activation", True, None),
        ("act_rms_drift", "act_rms.png", "Activation RMS per boundary, over its first sample",
         "RMS / first RMS", True, None),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        drawn = False
        for d, recs in runs:
            n = max((len(r[key]) for r in recs if isinstance(r.get(key), list)), default=0)
            for i in range(n):
                xs, ys = _series(recs, key, i)
                if xs:
                    (line,) = ax.plot(xs, ys, label=f"{run_label(d)} h{i + 1}")
                    drawn = True
                    axs, ays = _series(recs, dashed, i) if dashed else ([], [])
                    if axs and (axs != xs or max(abs(a - b) for a, b in zip(ays, ys, strict=True)) > 1e-3):
                        ax.plot(axs, ays, "--", color=line.get_color(), label=f"{run_label(d)} h{i + 1} ({dashed})")
        if not drawn:
            plt.close(fig)
            continue
        written.append(finish_figure(fig, ax, out / name, title=title, ylabel=ylabel, log=log))
    return written
