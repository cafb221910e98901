"""Rank 0's feed of batches: tensors it shuffles itself, or any iterable of (x, y) batches the user gives."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator

import torch

from synthgrad.batching import batches, epoch_order, num_batches
from synthgrad.errors import ConfigError


class Feed:
    """Rank 0's batches, epoch by epoch, resumable at any (epoch, batch).

    data: (x, y) tensors: shuffled each epoch by (seed, epoch), in batches of `batch_size` (the last,
        smaller one dropped unless drop_last=False); or a factory called in rank 0's process, as
        factory(epoch) or factory(), returning an iterable of (x, y) batches (a DataLoader, say);
        or any other re-iterable of (x, y) batches, iterated once per epoch.
    """

    def __init__(self, data: object, batch_size: int | None = None, seed: int = 0, drop_last: bool = True):
        self.seed, self.drop_last = seed, drop_last
        self.tensors: tuple[torch.Tensor, torch.Tensor] | None = None
        self.factory: Callable[..., Iterable] | None = None
        self.iterable: Iterable | None = None
        if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
            x, y = data
            if len(x) != len(y):
                raise ConfigError(f"data: {len(x)} inputs but {len(y)} labels")
            if batch_size is None or not 1 <= batch_size <= len(x):
                raise ConfigError(f"with (x, y) tensors, batch_size must be in 1..{len(x)}, got {batch_size}")
            self.tensors, self.batch_size = (x, y), batch_size
        elif callable(data):
            self.factory = data
        elif isinstance(data, Iterable):
            self.iterable = data
        else:
            raise ConfigError("data must be (x, y) tensors, a factory returning an iterable of (x, y) batches "
                              f"(a DataLoader, say), or such an iterable; got {type(data).__name__}")

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of `epoch`, from batch number `start` on."""
        if self.tensors is not None:
            x, y = self.tensors
            order = epoch_order(len(x), self.seed, epoch)
            yield from batches(x, y, self.batch_size, order, start=start, drop_last=self.drop_last)
            return
        if self.factory is not None:
            takes_epoch = len(inspect.signature(self.factory).parameters) >= 1
            source = self.factory(epoch) if takes_epoch else self.factory()
        else:
            source = self.iterable
        for i, item in enumerate(source):  # type: ignore[arg-type]
            if i >= start:
                yield batch_pair(item)

    def batches_per_epoch(self) -> int | None:
        """Known for tensors only: the number of batches in one epoch."""
        if self.tensors is None:
            return None
        return num_batches(len(self.tensors[1]), self.batch_size, self.drop_last)

    def first_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch to learn the input shape and the batch size from."""
        for x, y in self.epoch(0):
            return x, y
        raise ConfigError("data yields no batch: nothing to train on")


def batch_pair(item: object) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of one batch that a loader gave; ConfigError that says how to adapt any other form."""
    if isinstance(item, list | tuple) and len(item) >= 2 and all(isinstance(t, torch.Tensor) for t in item[:2]):
        if len(item[0]) != len(item[1]):
            raise ConfigError(f"a batch holds {len(item[0])} inputs but {len(item[1])} labels: the data must give "
                              "one label per example")
        return item[0], item[1]
    got = (f"a dict with keys {sorted(map(str, item))}" if isinstance(item, dict)
           else f"a {type(item).__name__}" + (f" of {len(item)}" if isinstance(item, list | tuple) else ""))
    raise ConfigError(f"each batch must be (x, y), two tensors; the data gave {got}. Adapt it with a module-level "
                      "factory, for example def data(epoch): return ((b['x'], b['y']) for b in make_loader(epoch))")
