"""Stop requests: SIGINT and SIGTERM, for the length of a run, become a flag the training loop reads at safe points."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from synthgrad.checkpoint import LATEST
from synthgrad.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    """Within `with StopRequests() as stop:`, a SIGINT or SIGTERM sets `stop.signum` instead of killing the process.

    The loop checks `stop.signum` after each step, writes its checkpoint and raises `Interrupted`. A
    second signal does not wait for the safe point: it raises `Interrupted` at once (checkpoints are
    written atomically, so a half-written one never replaces the last). While `immediate` is True the
    first signal does so already: before a loop runs, or for one with no safe point to stop at. The
    previous handlers come back on exit. Outside the main thread (where Python cannot handle signals)
    it does nothing.
    """

    def __init__(self, immediate: bool = False):
        self.immediate = immediate
        self.signum: int | None = None
        self.run_dir: Path | None = None  # the run being stopped, for the message of an immediate stop
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.immediate or self.signum is not None:
            self.signum = signum
            raise Interrupted(f"stopped by {signal.Signals(signum).name}", signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def check(self, step: int, run_dir: Path, save: Callable[[], None] | None) -> None:
        """At a loop's safe point: if a signal came, checkpoint with `save` (None: saved here already) and raise
        Interrupted, whose message names the checkpoint and the resume command."""
        if self.signum is None:
            return
        if save is not None:
            save()
        raise Interrupted(f"stopped by {self.name} at step {step}; {run_dir / LATEST} holds it: continue with "
                          f"`synthgrad train --resume {run_dir}`", self.signum)
