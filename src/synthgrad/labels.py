"""The label as the synthesizers' context [B, K]: one-hot from class indices [B], or soft labels [B, K] as given."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from synthgrad.errors import ConfigError

SUM_TOLERANCE = 1e-3  # how far a soft label's row may sum from 1 (float32 mixup weights sum to 1 within 1e-6)


def is_soft(y: torch.Tensor) -> bool:
    """Whether y holds soft labels: floating point [B, K] (mixup, a teacher's probabilities, label smoothing)."""
    return y.dim() == 2 and y.dtype.is_floating_point


def context(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The label as context, float32 [B, num_classes]: one-hot for class indices y [B], the distribution itself
    for soft labels y [B, num_classes]. ConfigError, saying what to pass, for anything else (see one_hot, soft)."""
    return soft(y, num_classes) if is_soft(y) else one_hot(y, num_classes)


def soft(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Soft labels y [B, num_classes] (rows of non-negative weights summing to 1) as float32.

    ConfigError for the wrong number of classes and, on the CPU, for rows that are not distributions: a
    cDNI synthesizer and the default cross-entropy read them as probabilities. On a GPU the rows go unchecked:
    reading them back would stall every step.
    """
    if y.shape[1] != num_classes:
        raise ConfigError(f"soft labels must be [B, num_classes] = [B, {num_classes}], got {list(y.shape)}: pass "
                          "the number of classes the model predicts")
    if y.device.type == "cpu" and len(y):
        low, sums = float(y.min()), y.sum(1)
        if low < 0 or float((sums - 1).abs().max()) > SUM_TOLERANCE:
            raise ConfigError(f"soft labels must be distributions over the classes: rows of non-negative weights "
                              f"summing to 1; this batch holds weights from {low:.3g} and rows summing to "
                              f"{float(sums.min()):.4g}..{float(sums.max()):.4g}. Normalise them, for example "
                              "y / y.sum(1, keepdim=True), or y.softmax(1) for logits")
    return y.float()


def one_hot(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """y [B] of class indices (any integer dtype) -> the one-hot [B, num_classes], float32.

    ConfigError for labels that are neither indices nor soft labels [B, K] (other shapes, bool, complex,
    float indices [B]) and, on the CPU, for indices outside 0..num_classes-1. On a GPU the range goes
    unchecked: reading it back would stall every step.
    """
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ConfigError(f"the label must be class indices, an integer tensor [B], or soft labels, a float tensor "
                          f"[B, {num_classes}] whose rows sum to 1; got {str(y.dtype)} {list(y.shape)}. For float "
                          "indices pass y.long()")
    if y.device.type == "cpu" and len(y):
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= num_classes:
            raise ConfigError(f"labels must lie in 0..{num_classes - 1} for num_classes={num_classes}, but this "
                              f"batch holds {low}..{high}: pass the number of classes the model predicts")
    return F.one_hot(y.long(), num_classes).float()


def check_num_classes(output_shape: tuple[int, ...], num_classes: int | None, loss_fn: object) -> None:
    """ConfigError when the model's output [B, C] (per-example shape `output_shape`) has C != num_classes under the
    default cross-entropy: the labels' one-hot would not match the logits it is read against."""
    if num_classes is None or loss_fn is not F.cross_entropy or len(output_shape) != 1:
        return  # a loss of the user's own may read its outputs otherwise
    if output_shape[0] != num_classes:
        raise ConfigError(f"num_classes={num_classes}, but the model's last stage outputs {output_shape[0]} "
                          f"logits per example: pass num_classes={output_shape[0]}, or end the model with a "
                          f"Linear to {num_classes} classes")
