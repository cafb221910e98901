"""The zoo: user-like architectures as blocks, grouped into stages, registered beside the paper's models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import synthgrad as sg
from synthgrad import models, zoo

SHAPES = {  # the per-example activation after each of the four blocks, on 28x28 images
    "resmlp": [(128,), (128,), (128,), (10,)],
    "resnet-mini": [(8, 14, 14), (16, 7, 7), (16, 7, 7), (10,)],
    "vit-mini": [(16, 32), (16, 32), (16, 32), (10,)],
    "lstm-rows": [(28, 32), (28, 32), (28, 32), (10,)],
}


@pytest.mark.parametrize("name", list(zoo.SPECS))
def test_blocks_have_the_documented_boundary_shapes(name: str) -> None:
    torch.manual_seed(0)
    blocks = models.build_layers(name, (1, 28, 28), 10)
    h, shapes = torch.randn(3, 1, 28, 28), []
    for b in blocks:
        h = b(h)
        shapes.append(tuple(h.shape[1:]))
    assert shapes == SHAPES[name]


@pytest.mark.parametrize("name", list(zoo.SPECS))
@pytest.mark.parametrize("k", [1, 2, 4])
def test_grouped_stages_compute_the_same_network(name: str, k: int) -> None:
    torch.manual_seed(0)
    blocks = models.build_layers(name, (1, 28, 28), 10)
    stages = zoo.group_blocks(blocks, k)
    assert len(stages) == k
    x = torch.randn(5, 1, 28, 28)
    torch.testing.assert_close(nn.Sequential(*stages).eval()(x), nn.Sequential(*blocks).eval()(x))
    # Every block lands in exactly one stage, in order.
    owned = [m for s in stages for m in ([s] if any(s is b for b in blocks) else list(s))]
    assert owned == blocks


def test_group_blocks_refuses_an_impossible_count() -> None:
    with pytest.raises(ValueError, match="use 1..4"):
        zoo.group_blocks([nn.Identity()] * 4, 5)


@pytest.mark.parametrize("name", list(zoo.SPECS))
def test_registered_for_the_cli_and_trains_with_cdni(name: str) -> None:
    # A few cDNI steps on a fixed batch lower the training loss through the public API.
    spec = models.get_spec(name)
    assert spec.defaults["epochs"] == 10 and spec.defaults["width"] > 0
    torch.manual_seed(0)
    stages = zoo.group_blocks(models.build_layers(name, (1, 28, 28), 10), 2)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    dni = sg.DNI.build(stages, x[:2], conditioned=True, num_classes=10)
    losses = [dni.step(x, y)["train_loss"] for _ in range(30)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) < sum(losses[:5])
