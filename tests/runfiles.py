"""Reading run directories in tests: checkpoint payloads and metrics without their timing fields."""

from __future__ import annotations

from pathlib import Path

from synthgrad import checkpoint
from synthgrad.metrics import read_metrics

TIMING = {"wall_time_s", "samples_per_s", "epoch_time_s", "eval_time_s"}


def payload(state: dict) -> dict:
    """The trainer's part of a checkpoint (the whole dict in files written before the envelope)."""
    return state.get("payload", state)


def stages(run: Path) -> dict:
    """The network's parameters in the run's final.pt."""
    return payload(checkpoint.load(run / checkpoint.FINAL))["stages"]


def records(run: Path) -> list[dict]:
    """metrics.jsonl without its timing fields: what an interrupted run must reproduce exactly."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(run / "metrics.jsonl")]
