"""Batches of tensors by index slicing, in a shuffled order that is a pure function of (seed, epoch)."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def epoch_order(num_examples: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled example order of one epoch: a pure function of (seed, epoch), so resumable."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_examples, generator=g)


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, order: torch.Tensor | None = None,
            start: int = 0, drop_last: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (x, y) batches by index slicing, from batch number `start` on; no per-sample Python work."""
    n = len(x)
    stop = n - n % batch_size if drop_last else n
    for i in range(start * batch_size, stop, batch_size):
        if order is None:
            yield x[i:i + batch_size], y[i:i + batch_size]
        else:
            idx = order[i:i + batch_size]
            yield x[idx], y[idx]


def num_batches(n: int, batch_size: int, drop_last: bool = True) -> int:
    """Batches in one epoch of n examples."""
    return n // batch_size if drop_last else -(-n // batch_size)
