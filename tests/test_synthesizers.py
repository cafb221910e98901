"""Synthesizers: zero start, shapes, context."""

from __future__ import annotations

import pytest
import torch

from synthgrad.synthesizers import ConvSynthesizer, VectorSynthesizer, make_synthesizer


@pytest.mark.parametrize("hidden", [0, 1, 2])
def test_vector_synthesizer_starts_at_zero_with_the_activation_shape(hidden: int) -> None:
    s = VectorSynthesizer(32, hidden_layers=hidden, width=16)
    h = torch.randn(8, 32)
    out = s(h)
    assert out.shape == h.shape and torch.count_nonzero(out) == 0


def test_conv_synthesizer_preserves_resolution_and_starts_at_zero() -> None:
    s = ConvSynthesizer(16, hidden_layers=2, width=8, context_dim=10)
    h = torch.randn(4, 16, 14, 14)
    ctx = torch.nn.functional.one_hot(torch.arange(4), 10).float()
    out = s(h, ctx)
    assert out.shape == h.shape and torch.count_nonzero(out) == 0


@pytest.mark.parametrize("shape", [(16, 7, 7), (64,)])
def test_context_changes_the_prediction(shape: tuple[int, ...]) -> None:
    s = make_synthesizer(shape, hidden_layers=1, width=8, context_dim=10)
    torch.nn.init.normal_(s.net[-1].weight)
    s.eval()
    h = torch.randn(4, *shape)
    a = s(h, torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 3]), 10).float())
    b = s(h, torch.nn.functional.one_hot(torch.tensor([4, 5, 6, 7]), 10).float())
    assert not torch.allclose(a, b)


def test_conditioned_synthesizer_without_context_says_why() -> None:
    with pytest.raises(ValueError, match="needs the context"):
        VectorSynthesizer(8, context_dim=10)(torch.randn(2, 8))
