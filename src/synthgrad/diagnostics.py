"""Diagnostics: divergence checks, the true gradient at a boundary, and agreement with it."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from synthgrad.boundary import run_stage
from synthgrad.errors import DivergenceError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_finite(t: torch.Tensor, what: str, stage: int, step: int) -> None:
    """Raise DivergenceError naming the stage and step when `t` holds a NaN or an infinity."""
    # One reduction where isfinite().all() takes four passes (a synthetic gradient is checked every step):
    # the sum is NaN or infinite when any element is, or when finite ones overflow, divergence too.
    if not math.isfinite(float(t.detach().sum())):
        raise DivergenceError(
            f"non-finite {what} at stage {stage + 1}, step {step}; the run diverged. Try a lower learning "
            "rate for the stages or the synthesizers, or a smaller or warmed-up synthetic gradient "
            "(BackwardInterface scale, warmup_steps)", what=what, stage=stage, step=step)


@contextlib.contextmanager
def frozen_batchnorm_stats(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Run extra forward passes in train mode without moving BN running statistics."""
    saved = []
    for m in modules:
        for bn in m.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats:
                saved.append((bn, bn.momentum, bn.num_batches_tracked.clone()))
                bn.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
    try:
        yield
    finally:
        for bn, momentum, tracked in saved:
            bn.momentum = momentum
            bn.num_batches_tracked.copy_(tracked)


def true_gradient(upper: Sequence[nn.Module], h: torch.Tensor, labels: torch.Tensor,
                  loss_fn: LossFn = F.cross_entropy) -> torch.Tensor:
    """dL/dh through the stages above h at their current parameters (batch-mean units)."""
    h = h.detach().requires_grad_(True)
    with frozen_batchnorm_stats(upper):
        out = h
        for stage in upper:
            out = run_stage(stage, out)  # on a copy: a stage may work on its input in place
        (grad,) = torch.autograd.grad(loss_fn(out, labels), h)
    return grad


def gradient_agreement(prediction: torch.Tensor, true_grad: torch.Tensor) -> tuple[float, float]:
    """(cosine similarity, relative error) of a per-example prediction against a batch-mean gradient."""
    p = prediction.detach().flatten().double() / prediction.shape[0]
    t = true_grad.detach().flatten().double()
    cos = F.cosine_similarity(p, t, dim=0).item()
    rel = ((p - t).norm() / t.norm().clamp_min(1e-30)).item()
    return cos, rel


def parameter_agreement(stage: nn.Module, inp: torch.Tensor, applied: torch.Tensor,
                        true_grad: torch.Tensor) -> tuple[float, float] | None:
    """(cosine, relative error) of the stage's parameter gradient under `applied` against under `true_grad`,
    both gradients at the stage's output (batch-mean units, [B, ...]); None for a stage with nothing to train.

    The stage's update follows J^T g summed over the batch, where per-example errors of a synthetic gradient that
    are uncorrelated with the truth cancel: a stage can learn from a gradient that lies no nearer the true one
    than zero does example by example (activation-space relative error about 1), and this says whether it does.
    One more forward pass of the stage on `inp` (h_(k-1), its input), BN statistics and the random stream left
    alone, and two backward passes through it.
    """
    params = [p for p in stage.parameters() if p.requires_grad]
    if not params:
        return None
    # Its own random stream (dropout): diagnosing a step leaves the run's draws, and so its training, alone.
    with frozen_batchnorm_stats([stage]), torch.enable_grad(), torch.random.fork_rng(devices=[]):
        out = run_stage(stage, inp.detach())
        ga = torch.autograd.grad(out, params, applied.detach().to(out.dtype), retain_graph=True, allow_unused=True)
        gt = torch.autograd.grad(out, params, true_grad.detach().to(out.dtype), allow_unused=True)
    pairs = [(a, t) for a, t in zip(ga, gt, strict=True) if a is not None and t is not None]
    if not pairs:
        return None
    a = torch.cat([a.flatten() for a, _ in pairs]).double()
    t = torch.cat([t.flatten() for _, t in pairs]).double()
    cos = F.cosine_similarity(a, t, dim=0).item()
    rel = ((a - t).norm() / t.norm().clamp_min(1e-30)).item()
    return cos, rel
