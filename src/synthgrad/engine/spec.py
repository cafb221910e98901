"""What a pipeline run is made of: the spec every process builds its stage from, and rank 0's feed of batches."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from synthgrad.errors import ConfigError
from synthgrad.interfaces import BackwardInterface, ForwardInterface, OptimizerFactory, adam
from synthgrad.labels import context
from synthgrad.stage import LossFn

METHODS = ("backprop", "dni", "cdni", "ddg", "dgl")
StageFactory = Callable[[int], nn.Module]  # k -> stage k
InterfaceFactory = Callable[[int, tuple[int, ...]], BackwardInterface]  # (k, shape of h_k) -> interface above k
# (k, network input shape, shape of h_(k-1)) -> forward interface in front of stage k
ForwardInterfaceFactory = Callable[[int, tuple[int, ...], tuple[int, ...]], ForwardInterface]


@dataclass
class PipelineSpec:
    """Everything a stage process needs to build and run its stage. It is sent to every process, so
    every field must pickle: module-level functions, functools.partial, or instances of module-level
    classes, not lambdas or closures.

    stage: k -> stage k (an nn.Module); each process calls it for its own k only (rank 0 also calls it
        for every k to assemble the plain network at the end). The engine seeds torch with
        seed + k before the call.
    method: "backprop" (the locked pipeline: each stage waits for the true gradient), "dni", "cdni",
        "ddg" (delayed true gradients: a stage updates when the true gradient of its step arrives, K-1-k
        steps late; synthgrad.delayed) or "dgl" (each stage but the last trains on a local auxiliary
        classifier, nothing is sent down; synthgrad.auxiliary).
    interface: (k, per-example shape of h_k) -> the BackwardInterface above stage k; None: the
        library's default (`synthgrad.defaults.DefaultInterfaces`).
    forward_interface: the complete unlock's (k, input shape, shape of h_(k-1)) -> ForwardInterface
        in front of stage k >= 1; None: the default. Only with unlock="complete".
    lockstep: a stage takes step t+1 only after the target of its step t has arrived (and, under the
        complete unlock, the real input of step t): slower, and equal to `DNI.step` bit for bit.
    max_inflight: activations a stage may send ahead of the stage above (backpressure).
    threads: torch threads per process; None: this machine's cores divided among the local stages.
    """

    stage: StageFactory
    num_stages: int
    method: str = "dni"
    num_classes: int | None = None
    optimizer: OptimizerFactory = field(default_factory=lambda: adam(1e-3))
    interface: InterfaceFactory | None = None
    forward_interface: ForwardInterfaceFactory | None = None
    unlock: str = "update"
    loss_fn: LossFn = F.cross_entropy
    update_prob: float = 1.0
    seed: int = 0
    schedule: Callable[[int], float] | None = None
    lockstep: bool = False
    max_inflight: int = 2
    threads: int | None = None
    device: str = "cpu"
    fault: tuple[int, int] | None = None  # test hook: (rank, step) at which that rank raises
    slow: tuple[int, float] | None = None  # test hook: (rank, seconds) that rank sleeps in each step
    lower_optimizer: OptimizerFactory | None = None  # every stage but the last (as sg.DNI's); None: optimizer

    def validate(self) -> None:
        """Refuse what cannot work, before any process starts."""
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if self.num_stages < 2:
            raise ConfigError(f"a pipeline needs num_stages >= 2, got {self.num_stages}")
        if self.method in ("cdni", "dgl") and not self.num_classes:
            raise ConfigError(f"method {self.method!r} needs num_classes to build the one-hot label")
        if self.method in ("ddg", "dgl") and (self.unlock != "update" or self.update_prob < 1):
            raise ConfigError(f"method {self.method!r} takes neither the complete unlock nor update_prob below 1")
        if self.unlock not in ("update", "complete"):
            raise ConfigError(f"unknown unlock {self.unlock!r}; choose update or complete")
        if self.method == "backprop" and self.unlock != "update":
            raise ConfigError("the complete unlock needs synthetic gradients: use method 'dni' or 'cdni'")
        if self.method == "backprop" and self.update_prob < 1:
            raise ConfigError("update_prob below 1 is not supported by the locked pipeline (method 'backprop'); "
                              "use method 'dni' or 'cdni', or train in one process")
        if not 0 <= self.update_prob <= 1:
            raise ConfigError(f"update_prob must lie in [0, 1], got {self.update_prob}")
        if self.max_inflight < 1:
            raise ConfigError(f"max_inflight must be >= 1, got {self.max_inflight}")

    @property
    def complete(self) -> bool:
        return self.unlock == "complete" and self.method != "backprop"

    def context(self, y: torch.Tensor) -> torch.Tensor | None:
        """The interfaces' context: the label [B, K] for cDNI and DGL (one-hot, or the soft labels given), else
        None (as `DNI.context`)."""
        return context(y, self.num_classes) if self.method in ("cdni", "dgl") else None
