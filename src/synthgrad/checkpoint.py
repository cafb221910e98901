"""Atomic checkpoints: written to a temporary file, synced, then renamed into place."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from synthgrad.errors import ConfigError

LATEST = "checkpoint.pt"  # everything needed to resume
BEST = "best.pt"  # the stages with the best test accuracy so far
FINAL = "final.pt"  # the stages at the end of training


def save(path: str | Path, state: dict) -> None:
    """Write `state` so that `path` always holds either the old or the new checkpoint, whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: str | Path) -> dict:
    """Read a checkpoint written by `save`, with an error that says what to do if it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path}; the run never reached its first checkpoint: "
                          "start it again without --resume (add --overwrite to reuse the directory)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 (torch raises many kinds for a damaged file)
        raise ConfigError(f"checkpoint {path} is unreadable ({e}); remove it and start again") from e
