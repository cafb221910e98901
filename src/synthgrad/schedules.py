"""Learning-rate schedules: a step's multiplier of every learning rate, as picklable callables."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable


def lr_factor(schedule: str, step: int, total: int) -> float:
    """The multiplier of every learning rate at `step` (0-based) of `total`: cosine decay to 0, or constant 1."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))
    return 1.0


def cosine_schedule(total_steps: int) -> Callable[[int], float]:
    """step -> 0.5 (1 + cos(pi step / total_steps)): every learning rate decays to 0 over the run.
    Give it to a rule (`DNI(..., schedule=...)`) or to the pipeline (`Pipeline(..., schedule=...)`)."""
    return functools.partial(lr_factor, "cosine", total=total_steps)
