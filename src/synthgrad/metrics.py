"""metrics.jsonl: one JSON object per logged step and per epoch, safe against kills."""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

from synthgrad.errors import ConfigError


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
        try:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        except OSError as e:
            raise ConfigError(f"cannot open {self.path} ({e.strerror}); make the run directory writable") from e
        if self._board is not None:
            self._board.reset(read_metrics(self.path) if self.path.stat().st_size else [])

    def write(self, record: dict) -> None:
        clean = {k: _clean(v) for k, v in record.items()}
        line = json.dumps(clean, separators=(",", ":"))
        try:
            self._file.write(line + "\n")
            self._file.flush()
        except OSError as e:  # a full disk: the torn line is dropped on resume (truncate to the checkpoint's offset)
            raise self._error(e) from e
        if self._board is not None:
            self._board.add(clean)  # as the log has it: non-finite values are None there, and skipped here

    def offset(self) -> int:
        self._file.flush()
        return self._file.tell()

    def sync(self) -> None:
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as e:
            raise self._error(e) from e
        if self._board is not None:
            self._board.flush()

    def _error(self, e: OSError) -> ConfigError:
        return ConfigError(f"cannot write {self.path} ({e.strerror}); the last checkpoint is kept: fix the cause "
                           f"(free space?), then continue with `synthgrad train --resume {self.path.parent}`")

    def truncate(self, offset: int) -> None:
        self._file.flush()
        self._file.truncate(offset)
        self._file.seek(offset)
        if self._board is not None:  # the scalars follow: dropped records leave no duplicates behind
            self._board.reset(read_metrics(self.path))

    def close(self) -> None:
        # A full disk fails the flush again: what `write` could write is written already.
        with contextlib.suppress(OSError):
            self._file.close()
        if self._board is not None:
            self._board.close()


class RunningMeans:
    """Running means of a step's stats (scalars and per-interface lists; None entries skipped).

    Its state goes into checkpoints, so a resumed run's next record averages the same steps as an
    unbroken run's."""

    def __init__(self) -> None:
        self.sums: dict[str, list[float]] = {}
        self.counts: dict[str, list[int]] = {}

    def add(self, stats: dict) -> None:
        for k, v in stats.items():
            vals = v if isinstance(v, list) else [v]
            s = self.sums.setdefault(k, [0.0] * len(vals))
            c = self.counts.setdefault(k, [0] * len(vals))
            for i, val in enumerate(vals):
                if val is not None:
                    s[i] += val
                    c[i] += 1

    def means(self, scalar_keys: tuple[str, ...] | None = ("train_loss",)) -> dict:
        """Mean per key: a number for `scalar_keys` (None: every key), else a list (None where nothing was added)."""
        out = {}
        for k, s in self.sums.items():
            m = [si / ci if ci else None for si, ci in zip(s, self.counts[k], strict=True)]
            out[k] = m[0] if scalar_keys is None or k in scalar_keys else m
        return out

    def state(self) -> dict:
        return {"sums": self.sums, "counts": self.counts}

    @classmethod
    def from_state(cls, state: dict) -> RunningMeans:
        m = cls()
        m.sums, m.counts = state["sums"], state["counts"]
        return m


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
