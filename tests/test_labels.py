"""The label as context: one-hot from indices of any integer dtype; soft labels and labels out of range refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import synthgrad as sg
from synthgrad.errors import ConfigError
from synthgrad.labels import one_hot


def test_indices_of_any_integer_dtype_give_the_same_one_hot() -> None:
    y = torch.tensor([2, 0, 1])
    expected = torch.eye(3)[y]
    for dtype in (torch.int64, torch.int32, torch.uint8):
        out = one_hot(y.to(dtype), 3)
        assert out.dtype == torch.float32 and torch.equal(out, expected)


@pytest.mark.parametrize("y", [torch.eye(3)[[0, 2]], torch.tensor([0.0, 1.0]), torch.tensor([True, False])])
def test_labels_that_are_not_indices_are_refused_with_what_to_pass(y: torch.Tensor) -> None:
    with pytest.raises(ConfigError, match=r"class indices, an integer tensor \[B\].*y.argmax\(1\)"):
        one_hot(y, 3)


@pytest.mark.parametrize("bad", [3, -1])
def test_labels_out_of_range_are_refused_naming_the_range(bad: int) -> None:
    with pytest.raises(ConfigError, match=r"labels must lie in 0..2 for num_classes=3"):
        one_hot(torch.tensor([0, bad, 1]), 3)


def _stages() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(6, 16), nn.ReLU()), nn.Linear(16, 3)]


def test_cdni_and_dgl_steps_refuse_a_label_beyond_num_classes_before_touching_the_stages() -> None:
    x, y = torch.randn(8, 6), torch.tensor([0, 1, 2, 3, 0, 1, 2, 0])
    for rule in (sg.DNI.build(_stages(), sample=x[:2], conditioned=True, num_classes=3),
                 sg.DGL.build(_stages(), sample=x[:2], num_classes=3)):
        before = [p.detach().clone() for p in rule.stages[0].parameters()]
        with pytest.raises(ConfigError, match="0..2 for num_classes=3, but this batch holds 0..3"):
            rule.step(x, y)
        assert all(torch.equal(a, b) for a, b in zip(before, rule.stages[0].parameters(), strict=True))
