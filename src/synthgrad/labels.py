"""The label as the synthesizers' context: class indices [B] -> one-hot [B, K], checked where it is cheap."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from synthgrad.errors import ConfigError


def one_hot(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """y [B] of class indices (any integer dtype) -> the one-hot [B, num_classes], float32.

    ConfigError for labels that are not indices (soft or one-hot labels [B, K], floats) and, on the CPU,
    for indices outside 0..num_classes-1. On a GPU the range goes unchecked: reading it back would stall
    every step.
    """
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ConfigError(f"the label must be class indices, an integer tensor [B]; got {str(y.dtype)} "
                          f"{list(y.shape)}. cDNI's synthesizers and DGL's classifiers see it one-hot, built from "
                          "the indices: for one-hot labels pass y.argmax(1); soft labels (mixup, label "
                          "smoothing in the data) are not supported, put label smoothing in loss_fn instead")
    if y.device.type == "cpu" and len(y):
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= num_classes:
            raise ConfigError(f"labels must lie in 0..{num_classes - 1} for num_classes={num_classes}, but this "
                              f"batch holds {low}..{high}: pass the number of classes the model predicts")
    return F.one_hot(y.long(), num_classes).float()
