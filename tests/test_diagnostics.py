"""Diagnostics: agreement of a synthetic gradient with the true one, at the boundary and in the stage's update."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from synthgrad.diagnostics import gradient_agreement, parameter_agreement


def _stage_and_batch() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    stage = nn.Linear(4, 6, bias=False)
    # 32 examples of 4 features: J^T g = g^T x lives in a 4-dimensional span of the batch.
    return stage, torch.randn(32, 4, generator=g), torch.randn(32, 6, generator=g) / 32


def test_the_true_gradient_agrees_exactly_and_zero_is_no_better_than_nothing() -> None:
    stage, x, t = _stage_and_batch()
    assert parameter_agreement(stage, x, t, t) == pytest.approx((1.0, 0.0), abs=1e-9)
    cos, rel = parameter_agreement(stage, x, torch.zeros_like(t), t)
    assert cos == 0.0 and rel == pytest.approx(1.0)
    cos, rel = parameter_agreement(stage, x, -t, t)
    assert cos == pytest.approx(-1.0) and rel == pytest.approx(2.0)


def test_per_example_errors_that_the_batch_sum_cancels_do_not_count() -> None:
    # Noise n with x^T n = 0 (per example as large as the gradient itself) leaves the update W += g^T x alone:
    # far from the truth example by example, exact in what the stage learns.
    stage, x, t = _stage_and_batch()
    noise = torch.randn(t.shape, generator=torch.Generator().manual_seed(1))
    noise -= x @ torch.linalg.lstsq(x, noise).solution  # the part of each column outside the span of x
    noise *= 3 * t.norm() / noise.norm()
    applied = t + noise
    _, rel_activation = gradient_agreement(applied * len(x), t)
    assert rel_activation == pytest.approx(3.0, rel=1e-4)
    assert parameter_agreement(stage, x, applied, t) == pytest.approx((1.0, 0.0), abs=1e-6)


def test_a_stage_without_parameters_to_train_has_no_agreement_and_batchnorm_statistics_stay() -> None:
    _, x, t = _stage_and_batch()
    frozen = nn.Linear(4, 6).requires_grad_(False)
    assert parameter_agreement(frozen, x, t, t) is None
    stage = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
    before = stage[1].running_mean.clone()
    cos, _ = parameter_agreement(stage, x, t, t)
    assert cos == pytest.approx(1.0) and torch.equal(stage[1].running_mean, before)


def test_measuring_leaves_the_random_stream_alone() -> None:
    # A stage with dropout draws on the forward pass; a diagnosed step must train as an undiagnosed one does.
    _, x, t = _stage_and_batch()
    stage = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5))
    torch.manual_seed(3)
    expected = torch.rand(5)
    torch.manual_seed(3)
    parameter_agreement(stage, x, t, t)
    assert torch.equal(torch.rand(5), expected)
