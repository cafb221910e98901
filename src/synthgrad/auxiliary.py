"""Decoupled greedy learning (DGL, Belilovsky et al. 2020): auxiliary classifiers and their local losses.

DGL puts a small classifier above each stage but the last and trains the stage on that classifier's
loss: nothing is sent down, no stage waits for another. In synthgrad it is an interface like a
synthesizer's: `AuxiliaryClassifier.predict` returns the gradient of the local loss at h (per-example
units, as a synthesizer's prediction) and trains the classifier on the same loss. Its context is the
one-hot label.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from synthgrad.errors import ConfigError
from synthgrad.interfaces import BackwardInterface, OptimizerFactory, adam
from synthgrad.labels import check_num_classes, context
from synthgrad.localloss import auxiliary_head, local_gradient
from synthgrad.rules import Schedule, StepRule, activation_shapes
from synthgrad.stage import LossFn


class AuxiliaryClassifier(BackwardInterface):
    """The local loss above a stage: cross-entropy of `head(h)` against the label (the context, one-hot)."""

    calls_model_with_context = False  # its model is a classifier head, called as head(h)

    def __init__(self, head: nn.Module, optimizer: OptimizerFactory | torch.optim.Optimizer):
        super().__init__(head, optimizer)
        self.last_loss = math.nan

    def predict(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """B * d(local loss)/dh, and one update of the head on that loss (the stage's step uses the gradient)."""
        if context is None:
            raise ValueError("an auxiliary classifier needs the label: run it with the one-hot context (method dgl)")
        grad, loss = local_gradient(self.model, self.optimizer, h, context)
        self.last_loss = loss.item()  # what `update` reports as DGL's synth_loss
        return grad

    def update(self, prediction: torch.Tensor, target_grad: torch.Tensor) -> float:
        """Nothing comes from above in DGL: the head learnt in `predict`."""
        return self.last_loss


class DefaultAuxiliaryClassifiers:
    """The interface factory of DGL: (k, shape of h_k) -> an AuxiliaryClassifier with `auxiliary_head`, Adam at lr."""

    def __init__(self, num_classes: int, lr: float = 1e-3):
        self.num_classes, self.lr = num_classes, lr

    def __call__(self, k: int, shape: tuple[int, ...]) -> AuxiliaryClassifier:
        return AuxiliaryClassifier(auxiliary_head(shape, self.num_classes), adam(self.lr))


class DGL(StepRule):
    """Decoupled greedy learning (Belilovsky et al. 2020): every stage but the last trains on the loss of its own
    auxiliary classifier (synthgrad.auxiliary); nothing goes down, no stage waits for another.

    heads: one AuxiliaryClassifier per stage but the last. num_classes: for the one-hot label they see.
    """

    method = "dgl"

    def __init__(self, stages: Sequence[nn.Module], heads: Sequence[BackwardInterface], num_classes: int,
                 lr: float = 1e-3, optimizer: OptimizerFactory | None = None, loss_fn: LossFn = F.cross_entropy,
                 seed: int = 0, schedule: Schedule | None = None, lower_optimizer: OptimizerFactory | None = None):
        if len(heads) != len(stages) - 1:
            raise ConfigError(f"{len(stages)} stages need {len(stages) - 1} auxiliary classifiers, got {len(heads)}")
        super().__init__(stages, lr, optimizer, loss_fn, 1.0, seed, heads, None, schedule, lower_optimizer)
        self.num_classes = num_classes

    @classmethod
    def build(cls, stages: Sequence[nn.Module], sample: torch.Tensor, num_classes: int, *, lr: float = 1e-3,
              aux_lr: float = 1e-3, **kwargs) -> DGL:
        """DGL over `stages` with the default auxiliary classifier above every stage but the last."""
        make = DefaultAuxiliaryClassifiers(num_classes, aux_lr)
        shapes = activation_shapes(stages, sample)
        check_num_classes(shapes[-1], num_classes, kwargs.get("loss_fn", F.cross_entropy))
        heads = [make(k, shape) for k, shape in enumerate(shapes[:-1])]
        return cls(stages, heads, num_classes, lr=lr, **kwargs)

    def step(self, x: torch.Tensor, y: torch.Tensor, diagnose: bool | None = None) -> dict:
        """One DGL step; returns {"train_loss": the last stage's loss, "synth_loss": [each local classifier's loss]}."""
        self._begin_step(x, y)
        ctx = context(y, self.num_classes)
        h, local = x, []
        for rule in self.stage_rules:
            res = rule.step(h, y, self.steps, context=ctx, input_grad=False)
            if rule.interface is not None:
                local.append(rule.interface.last_loss)  # type: ignore[attr-defined]
            h = res.output
        self.steps += 1
        assert res.loss is not None
        return {"train_loss": res.loss.item(), "synth_loss": local}
