"""metrics.jsonl: one JSON object per logged step and per epoch, safe against kills."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def _clean(value: object) -> object:
    # JSON has no NaN/inf: write them as null so every line stays parseable.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


class MetricsLog:
    """Append-only JSON-lines log; each record is written whole and flushed.

    A checkpoint stores `offset()`; resuming calls `truncate(offset)`, so lines written
    after the checkpoint (or half-written by a kill) are dropped, never duplicated.
    With `tensorboard`, every record is also written as TensorBoard scalars into
    ``tensorboard/`` beside the log, which always holds exactly the log's records.
    """

    def __init__(self, path: str | Path, tensorboard: bool = False):
        self.path = Path(path)
        self._board = None
        if tensorboard:
            from synthgrad.tensorboard_log import SUBDIR, TensorBoardMirror  # imports tensorboard: only when asked

            self._board = TensorBoardMirror(self.path.parent / SUBDIR)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        if self._board is not None:
            self._board.reset(read_metrics(self.path) if self.path.stat().st_size else [])

    def write(self, record: dict) -> None:
        clean = {k: _clean(v) for k, v in record.items()}
        line = json.dumps(clean, separators=(",", ":"))
        self._file.write(line + "\n")
        self._file.flush()
        if self._board is not None:
            self._board.add(clean)  # as the log has it: non-finite values are None there, and skipped here

    def offset(self) -> int:
        self._file.flush()
        return self._file.tell()

    def sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._board is not None:
            self._board.flush()

    def truncate(self, offset: int) -> None:
        self._file.flush()
        self._file.truncate(offset)
        self._file.seek(offset)
        if self._board is not None:  # the scalars follow: dropped records leave no duplicates behind
            self._board.reset(read_metrics(self.path))

    def close(self) -> None:
        self._file.close()
        if self._board is not None:
            self._board.close()


def read_metrics(path: str | Path) -> list[dict]:
    """All complete records of a metrics.jsonl (a torn last line, if any, is skipped)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records
