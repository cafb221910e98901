"""TensorBoard scalars mirroring metrics.jsonl: one tag per metric, one per interface (or stage) for lists.

Tags: a "step" record's metrics keep their names (``train_loss``); other kinds are prefixed with the
kind (``epoch/test_accuracy``, ``eval/test_accuracy``, ``final/bpc``); a list becomes one tag per entry,
``synth_loss/interface_1`` (or ``stage_busy_s/stage_1`` for the pipeline's per-stage lists). The
scalar's step is the record's ``step``. Needs the optional ``tensorboard`` package.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from synthgrad.errors import ConfigError

SUBDIR = "tensorboard"  # inside the run directory
EVENT_GLOB = "events.out.tfevents.*"
INSTALL = "pip install 'synthgrad[tensorboard]'"


def scalars(record: dict) -> Iterator[tuple[str, float]]:
    """(tag, value) for every number in one metrics record; None (no value) and text are skipped."""
    kind = record.get("kind", "step")
    prefix = "" if kind == "step" else f"{kind}/"
    for key, value in record.items():
        if key in ("kind", "step"):
            continue
        tag = prefix + key
        if isinstance(value, bool | int | float):
            yield tag, float(value)
        elif isinstance(value, list):
            unit = "stage" if key.startswith("stage_") else "interface"
            for i, v in enumerate(value, start=1):
                if isinstance(v, bool | int | float):
                    yield f"{tag}/{unit}_{i}", float(v)


class TensorBoardMirror:
    """Writes metrics records as scalars into `log_dir`; `reset` rewrites it to hold exactly some records."""

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError(f"--tensorboard needs the tensorboard package ({e}): {INSTALL}") from e
        self._writer_class = SummaryWriter
        self.log_dir = Path(log_dir)
        self._writer = None

    def reset(self, records: Iterable[dict]) -> None:
        """Start the event files afresh with these records (a resume's kept metrics.jsonl lines).

        Rewriting, rather than TensorBoard's purge_step, keeps the scalars equal to metrics.jsonl whatever
        the order of steps in the dropped lines, and shows a run that turns --tensorboard on midway whole."""
        self.close()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for old in self.log_dir.glob(EVENT_GLOB):
            old.unlink()
        self._writer = self._writer_class(log_dir=str(self.log_dir))
        for record in records:
            self.add(record)
        self.flush()

    def add(self, record: dict) -> None:
        """Write one metrics record's numbers at its step."""
        if self._writer is None:
            self.reset([])
        step = record.get("step")
        if not isinstance(step, int):
            return  # a record without a step has no place on TensorBoard's x axis
        for tag, value in scalars(record):
            self._writer.add_scalar(tag, value, global_step=step)

    def flush(self) -> None:
        """Push buffered events to disk (done with every metrics sync, before each checkpoint)."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
