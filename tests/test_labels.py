"""The label as context: one-hot from indices of any integer dtype, soft labels as they are; anything else and
labels out of range refused."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import usermodel as um
from torch import nn

import synthgrad as sg
from synthgrad.errors import ConfigError
from synthgrad.labels import context, one_hot


def test_indices_of_any_integer_dtype_give_the_same_one_hot() -> None:
    y = torch.tensor([2, 0, 1])
    expected = torch.eye(3)[y]
    for dtype in (torch.int64, torch.int32, torch.uint8):
        out = one_hot(y.to(dtype), 3)
        assert out.dtype == torch.float32 and torch.equal(out, expected)


@pytest.mark.parametrize("y", [torch.tensor([0.0, 1.0]), torch.tensor([True, False]), torch.eye(3).long()])
def test_labels_that_are_neither_indices_nor_soft_are_refused_with_what_to_pass(y: torch.Tensor) -> None:
    with pytest.raises(ConfigError, match=r"class indices, an integer tensor \[B\], or soft labels, a float tensor "
                                          r"\[B, 3\] whose rows sum to 1"):
        context(y, 3)


def test_soft_labels_are_the_context_as_they_are_and_one_hot_rows_equal_indices() -> None:
    y = torch.tensor([[0.25, 0.75, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    out = context(y, 3)
    assert out.dtype == torch.float32 and torch.equal(out, y.float())
    assert torch.equal(context(torch.eye(3)[[2, 0]], 3), context(torch.tensor([2, 0]), 3))


@pytest.mark.parametrize("y,match", [
    (torch.full((2, 3), 0.5), r"rows summing to 1.5..1.5. Normalise them"),
    (torch.tensor([[1.5, -0.5, 0.0]]), r"weights from -0.5"),
    (torch.full((2, 4), 0.25), r"soft labels must be \[B, num_classes\] = \[B, 3\], got \[2, 4\]")])
def test_soft_labels_that_are_not_distributions_over_the_classes_are_refused(y: torch.Tensor, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        context(y, 3)


@pytest.mark.parametrize("bad", [3, -1])
def test_labels_out_of_range_are_refused_naming_the_range(bad: int) -> None:
    with pytest.raises(ConfigError, match=r"labels must lie in 0..2 for num_classes=3"):
        one_hot(torch.tensor([0, bad, 1]), 3)


def _stages(features: int = 6) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(features, 16), nn.ReLU()), nn.Linear(16, 3)]


def test_cdni_and_dgl_steps_refuse_a_label_beyond_num_classes_before_touching_the_stages() -> None:
    x, y = torch.randn(8, 6), torch.tensor([0, 1, 2, 3, 0, 1, 2, 0])
    for rule in (sg.DNI.build(_stages(), sample=x[:2], conditioned=True, num_classes=3),
                 sg.DGL.build(_stages(), sample=x[:2], num_classes=3)):
        before = [p.detach().clone() for p in rule.stages[0].parameters()]
        with pytest.raises(ConfigError, match="0..2 for num_classes=3, but this batch holds 0..3"):
            rule.step(x, y)
        assert all(torch.equal(a, b) for a, b in zip(before, rule.stages[0].parameters(), strict=True))


def _state(rule: sg.StepRule) -> list[torch.Tensor]:
    return [t.detach().clone() for r in rule.stage_rules for t in r.stage.state_dict().values()]


def test_one_hot_soft_labels_train_as_the_indices_do() -> None:
    # The oracle: a soft label that puts all its weight on one class is that class's index, for every rule.
    x, y = um.data(64)
    soft = torch.eye(um.NUM_CLASSES)[y]
    for build in (lambda: sg.DNI.build(_stages(20), sample=x[:2], conditioned=True, num_classes=um.NUM_CLASSES),
                  lambda: sg.DNI.build(_stages(20), sample=x[:2]),
                  lambda: sg.DGL.build(_stages(20), sample=x[:2], num_classes=um.NUM_CLASSES),
                  lambda: sg.Backprop(_stages(20))):
        by_index, by_soft = build(), build()
        for i in range(0, 64, 16):
            by_index.step(x[i:i + 16], y[i:i + 16], diagnose=False)
            by_soft.step(x[i:i + 16], soft[i:i + 16], diagnose=False)
        after_index, after_soft = _state(by_index), _state(by_soft)
        assert any(not torch.equal(a, b) for a, b in zip(after_index, _state(build()), strict=True))
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(after_index, after_soft, strict=True))


def test_cdni_and_dgl_learn_from_mixup_labels_as_backprop_does() -> None:
    x, y = um.data(1024, seed=2)  # the test set: plain examples, class indices
    xm, ym = um.mixup_data(2048)  # the training set: mixed examples, soft labels [2048, 3]

    def wide() -> list[nn.Module]:
        torch.manual_seed(0)
        return [nn.Sequential(nn.Linear(20, 64), nn.ReLU()), nn.Linear(64, um.NUM_CLASSES)]

    accuracy = {}
    for rule in (sg.Backprop(wide(), lr=1e-2),
                 sg.DNI.build(wide(), sample=xm[:2], conditioned=True, num_classes=um.NUM_CLASSES, lr=1e-2),
                 sg.DGL.build(wide(), sample=xm[:2], num_classes=um.NUM_CLASSES, lr=1e-2)):
        for _ in range(4):
            for i in range(0, len(xm), 64):
                stats = rule.step(xm[i:i + 64], ym[i:i + 64])
        assert math.isfinite(stats["train_loss"])
        accuracy[type(rule).__name__] = (rule.network()(x).argmax(1) == y).float().mean().item()
    # Backprop reaches 0.83 (the majority class is 0.5); cDNI and DGL reach 0.85 and 0.87.
    assert accuracy["Backprop"] > 0.75, accuracy
    assert accuracy["DNI"] > accuracy["Backprop"] - 0.05 and accuracy["DGL"] > accuracy["Backprop"] - 0.05, accuracy


@pytest.mark.parametrize("num_classes", [2, 5])
def test_num_classes_that_the_model_does_not_output_is_refused_at_build(num_classes: int) -> None:
    x = torch.randn(4, 6)
    for build in (lambda: sg.DNI.build(_stages(), sample=x, conditioned=True, num_classes=num_classes),
                  lambda: sg.DGL.build(_stages(), sample=x, num_classes=num_classes)):
        with pytest.raises(ConfigError, match=rf"num_classes={num_classes}, but the model's last stage outputs 3 "
                                              r"logits per example: pass num_classes=3"):
            build()
    # A loss of the user's own may read the outputs otherwise: the check is the default cross-entropy's.
    sg.DNI.build(_stages(), sample=x, conditioned=True, num_classes=num_classes,
                 loss_fn=lambda out, y: F.cross_entropy(out[:, :2], y.clamp(max=1)))


def test_a_batch_with_fewer_labels_than_inputs_is_refused_by_every_rule() -> None:
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2])
    for rule in (sg.Backprop(_stages()), sg.DNI.build(_stages(), sample=x[:2]),
                 sg.DGL.build(_stages(), sample=x[:2], num_classes=3)):
        with pytest.raises(ConfigError, match="the batch holds 4 inputs but 3 labels"):
            rule.step(x, y)
