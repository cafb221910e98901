"""A dataset as checked NumPy arrays: what a reader (cifar.py, npz.py) hands to data.py, which makes the tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Arrays:
    """Images [N, C, H, W] (uint8 0..255 or float32), int64 labels [N] in 0..K-1 and the K class names.

    source: where they came from; tried: the sources tried before it, for messages.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: tuple[str, ...]
    source: str = ""
    tried: list[str] = field(default_factory=list)
