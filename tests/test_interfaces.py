"""Interfaces: regression toward targets, gradient units, scale and warm-up."""

from __future__ import annotations

import torch
from torch import nn

from synthgrad import BackwardInterface, ForwardInterface, VectorSynthesizer, adam


def test_backward_interface_regresses_toward_the_target_gradient() -> None:
    torch.manual_seed(0)
    iface = BackwardInterface(VectorSynthesizer(8, hidden_layers=0), adam(1e-2))
    h = torch.randn(64, 8)
    true = (h @ torch.randn(8, 8)) / 64  # a linear function of h, batch-mean units
    losses = [iface.update(iface.predict(h), true) for _ in range(1000)]
    assert losses[-1] < 1e-3 * losses[0]
    # What the stage applies is back in batch-mean units and close to the target.
    applied = iface.stage_gradient(iface.predict(h))
    assert ((applied - true).norm() / true.norm()).item() < 0.05


def test_stage_gradient_units_scale_and_warmup() -> None:
    iface = BackwardInterface(VectorSynthesizer(4, hidden_layers=0), adam(1e-3), scale=0.5, warmup_steps=10)
    pred = torch.ones(8, 4)
    torch.testing.assert_close(iface.stage_gradient(pred, step=100), torch.full((8, 4), 0.5 / 8))
    torch.testing.assert_close(iface.stage_gradient(pred, step=4), torch.full((8, 4), 0.5 * 0.5 / 8))


class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x)


def test_forward_interface_regresses_toward_the_real_activation() -> None:
    torch.manual_seed(0)
    iface = ForwardInterface(_Linear(), adam(1e-2))
    x = torch.randn(128, 6)
    real = x @ torch.randn(6, 3)
    losses = [iface.update(iface.predict(x), real) for _ in range(400)]
    assert losses[-1] < 0.01 * losses[0]


def test_state_dict_round_trip() -> None:
    a = BackwardInterface(VectorSynthesizer(4, hidden_layers=1, width=8), adam(1e-3))
    h = torch.randn(8, 4)
    a.update(a.predict(h), torch.randn(8, 4))
    b = BackwardInterface(VectorSynthesizer(4, hidden_layers=1, width=8), adam(1e-3))
    b.load_state_dict(a.state_dict())
    a.train(False)
    b.train(False)
    torch.testing.assert_close(a.predict(h), b.predict(h))
