"""A stage reads its own copy of the activation: stages that begin with an in-place layer train exactly as the same
stages out of place, under every rule, with the diagnostics on."""

from __future__ import annotations

import pytest
import torch
import usermodel as um

import synthgrad as sg
from synthgrad.boundary import run_stage


def test_run_stage_leaves_its_input_alone_and_passes_the_gradient_through() -> None:
    h = torch.tensor([[-1.0, 2.0]], requires_grad=True)  # a leaf needing a gradient, as a stage's input is
    out = run_stage(torch.nn.ReLU(inplace=True), h)
    assert torch.equal(h.detach(), torch.tensor([[-1.0, 2.0]]))
    out.sum().backward()  # type: ignore[union-attr]
    assert torch.equal(h.grad, torch.tensor([[0.0, 1.0]]))


def _rule(method: str, stages: list[torch.nn.Module], x: torch.Tensor) -> sg.StepRule:
    if method == "backprop":
        return sg.Backprop(stages)
    if method == "dgl":
        return sg.DGL.build(stages, sample=x[:2], num_classes=um.NUM_CLASSES)
    return sg.DNI.build(stages, sample=x[:2], conditioned=method == "cdni", num_classes=um.NUM_CLASSES,
                        unlock="complete" if method == "dni-complete" else "update")


@pytest.mark.parametrize("method", ["backprop", "dni", "cdni", "dni-complete", "dgl"])
def test_stages_that_begin_in_place_train_as_the_same_stages_out_of_place(method: str) -> None:
    x, y = um.data(256)
    sample = x[:2].clone()
    runs = []
    for inplace in (True, False):
        rule = _rule(method, um.inplace_stages(inplace), x)
        for i in range(0, len(x), 32):
            diagnose = {"diagnose": i % 64 == 0} if method not in ("backprop", "dgl") else {}
            rule.step(x[i:i + 32], y[i:i + 32], **diagnose)
        runs.append([t.detach().clone() for r in rule.stage_rules for t in r.state_dict()["stage"].values()])
    assert torch.equal(x[:2], sample)  # building read the caller's sample through the stages: left alone
    moved = [t.detach() for s in um.inplace_stages() for t in s.state_dict().values()]
    assert any(not torch.equal(a, b) for a, b in zip(runs[0], moved, strict=True)), "nothing trained"
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1], strict=True))
