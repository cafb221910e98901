"""What a stage reads at a boundary: its own copy of the activation, so that it may work on its input in place."""

from __future__ import annotations

import torch
from torch import nn


def run_stage(stage: nn.Module, inp: torch.Tensor) -> object:
    """stage(inp) on a copy of inp [B, ...]: what the stage returns (checked by the caller).

    A stage that begins with an in-place layer (nn.ReLU(inplace=True), common where a model is cut after a
    convolution or a BatchNorm) would otherwise write into h_(k-1), which the stage below keeps for its
    synthesizer's regression and which the diagnostics reread, and fail outright on an input that is a leaf
    needing a gradient (the stage's input gradient is the target of the interface below). The copy is one
    activation per stage and step, and it changes no value: the gradient flows through it to inp unchanged.
    """
    return stage(inp.clone())
