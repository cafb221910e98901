"""The wire format: every message between two stages, its kinds and its layout, defined here once.

A message is one flat float32 tensor: a header, then blocks whose sizes are fixed for the whole
run, so that a receiver can post a buffer of the right size before the message arrives.

    forward (stage k -> k+1):  [kind, step, epoch, batch, rows, flag | stats | labels [B (* K)] | h_k [B * D]]
    backward (stage k+1 -> k): [kind, step, rows | dL/dh_k [B * D]]

B is the largest batch of the run (a batch of `rows` < B rows is padded), D the number of
features of one example's activation. Every block starts on a 64-byte boundary (`ALIGN` floats):
the payloads are used in place, and a matrix product reads unaligned data in a different order,
so a pipeline would differ from one process in the last bits. Labels travel as float32: class
indices (exact below 2^24), or soft labels [B, K] as they are. `stats` carries the lower stages'
latest statistics up to the last stage, which logs them (`StatsLayout`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ALIGN = 16  # floats: 64 bytes, the alignment of PyTorch's CPU allocations


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


# Kinds: the first float of every message.
DATA = 0.0  # a batch (forward) or its gradient (backward)
SNAPSHOT = 1.0  # report your state to rank 0; its flag is one of the three below
STOP = 2.0  # the run is over: pass it on, flush, end
NONE = 3.0  # backward only: this step has no gradient (the stage above skipped its update)

# A SNAPSHOT's flag: where rank 0 is in its epoch.
MID_EPOCH = 0  # somewhere inside the epoch: every stage reports as it is
EPOCH_END = 1  # after the epoch's last batch: every stage reports once it has run the whole epoch
RUN_END = 2  # the run ended inside the epoch (a step budget): every stage reports once it has run its steps


@dataclass(frozen=True)
class StatsLayout:
    """The stats block: per interface (staleness, synth_loss), then per forward interface input_loss."""

    interfaces: int  # K - 1
    forward_interfaces: int  # K - 1 under the complete unlock, else 0

    @property
    def numel(self) -> int:
        return 2 * self.interfaces + self.forward_interfaces

    def interface(self, k: int) -> slice:
        """(staleness, synth_loss) of the interface above stage k."""
        return slice(2 * k, 2 * k + 2)

    def forward_interface(self, k: int) -> int:
        """input_loss of the forward interface in front of stage k (k >= 1)."""
        return 2 * self.interfaces + k - 1

    def empty(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.full((self.numel,), math.nan, device=device)


@dataclass
class Forward:
    """A forward message, unpacked (views into the message, no copies)."""

    kind: float
    step: int
    epoch: int
    batch: int
    rows: int
    flag: int
    stats: torch.Tensor  # [stats numel]
    labels: torch.Tensor | None  # [rows] int64, or soft labels [rows, K]; None unless DATA
    h: torch.Tensor | None  # [rows, *shape]; None unless DATA


@dataclass(frozen=True)
class ForwardLayout:
    """Messages going up from a stage whose output has per-example `shape`."""

    batch: int  # B, the largest batch
    shape: tuple[int, ...]
    stats: StatsLayout
    label_width: int = 0  # 0: class indices [B]; K: soft labels [B, K]
    HEAD = 6

    @property
    def labels_at(self) -> int:
        return _aligned(self.HEAD + self.stats.numel)

    @property
    def h_at(self) -> int:
        return self.labels_at + _aligned(self.batch * max(1, self.label_width))

    @property
    def numel(self) -> int:
        return self.h_at + self.batch * math.prod(self.shape)

    def pack(self, kind: float, step: int, epoch: int = 0, batch: int = 0, flag: int = 0,
             stats: torch.Tensor | None = None, labels: torch.Tensor | None = None,
             h: torch.Tensor | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        rows = 0 if labels is None else len(labels)
        msg = torch.empty(self.numel, device=device)
        msg[:self.HEAD] = torch.tensor([kind, step, epoch, batch, rows, flag], dtype=torch.float32)
        msg[self.HEAD:self.HEAD + self.stats.numel] = self.stats.empty(device) if stats is None else stats
        if labels is not None and h is not None:
            msg[self.labels_at:self.labels_at + labels.numel()] = labels.reshape(-1)
            msg[self.h_at:self.h_at + h.numel()] = h.reshape(-1)
        return msg

    def unpack(self, msg: torch.Tensor) -> Forward:
        kind, step, epoch, batch, rows, flag = (float(v) if i == 0 else int(v)
                                                for i, v in enumerate(msg[:self.HEAD].tolist()))
        stats = msg[self.HEAD:self.HEAD + self.stats.numel]
        labels = h = None
        if kind == DATA:
            if self.label_width:
                labels = msg[self.labels_at:self.labels_at + rows * self.label_width].view(rows, self.label_width)
            else:
                labels = msg[self.labels_at:self.labels_at + rows].long()
            h = msg[self.h_at:self.h_at + rows * math.prod(self.shape)].view(rows, *self.shape)
        return Forward(kind, step, epoch, batch, rows, flag, stats, labels, h)


@dataclass(frozen=True)
class BackwardLayout:
    """Messages going down to a stage whose output has per-example `shape`: the gradient at it."""

    batch: int
    shape: tuple[int, ...]
    HEAD = ALIGN  # [kind, step, rows], padded

    @property
    def numel(self) -> int:
        return self.HEAD + self.batch * math.prod(self.shape)

    def pack(self, kind: float, step: int, grad: torch.Tensor | None = None,
             device: torch.device | str = "cpu") -> torch.Tensor:
        rows = 0 if grad is None else len(grad)
        msg = torch.empty(self.numel, device=device)
        msg[:3] = torch.tensor([kind, step, rows], dtype=torch.float32)
        if grad is not None:
            msg[self.HEAD:self.HEAD + grad.numel()] = grad.reshape(-1)
        return msg

    def unpack(self, msg: torch.Tensor) -> tuple[float, int, torch.Tensor | None]:
        """(kind, step, dL/dh [rows, *shape] in batch-mean units, or None)."""
        kind, step, rows = float(msg[0]), int(msg[1]), int(msg[2])
        if kind != DATA:
            return kind, step, None
        return kind, step, msg[self.HEAD:self.HEAD + rows * math.prod(self.shape)].view(rows, *self.shape)
