"""The local loss and its least-squares mix with the synthetic gradient (synthgrad.localloss), against oracles."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import synthgrad as sg
from synthgrad.errors import ConfigError
from synthgrad.interfaces import BackwardInterface, adam
from synthgrad.localloss import LocalLoss, local_gradient


def _observe_many(local: LocalLoss, make_target, steps: int = 400) -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        c, loc = torch.randn(16, 8, generator=gen), torch.randn(16, 8, generator=gen)
        local.observe(c, loc, make_target(c, loc))


@pytest.mark.parametrize("a,b", [(0.5, 2.0), (1.0, 0.0), (0.0, 1.0), (0.3, 0.3)])
def test_the_mix_recovers_the_coefficients_that_made_the_targets(a: float, b: float) -> None:
    local = LocalLoss((8,), 3)
    _observe_many(local, lambda c, loc: a * c + b * loc)
    got = local.coefficients()
    assert got == pytest.approx((a, b), abs=1e-4)


def test_the_mix_never_descends_against_a_loss() -> None:
    """A local gradient anti-aligned with the targets gets b = 0 (and a is c's fit alone), not b < 0."""
    local = LocalLoss((8,), 3)
    _observe_many(local, lambda c, loc: 0.7 * c - 1.0 * loc)
    assert local.coefficients() == pytest.approx((0.7, 0.0), abs=0.05)
    worse = LocalLoss((8,), 3)
    _observe_many(worse, lambda c, loc: -1.0 * c + 0.4 * loc)
    assert worse.coefficients() == pytest.approx((0.0, 0.4), abs=0.05)


def test_before_any_target_the_stage_follows_its_synthesizer_alone() -> None:
    assert LocalLoss((8,), 3).coefficients() == (1.0, 0.0)


def test_the_local_gradient_is_the_cross_entropys_input_gradient_and_the_head_learns() -> None:
    torch.manual_seed(0)
    head = nn.Sequential(nn.Flatten(), nn.Linear(6, 3))
    h, y = torch.randn(5, 6), torch.tensor([0, 2, 1, 1, 0])
    hh = h.clone().requires_grad_(True)
    expected_loss = F.cross_entropy(head(hh), y)
    expected, weight_grad = torch.autograd.grad(expected_loss, [hh, head[1].weight])
    before = head[1].weight.detach().clone()
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    got, loss = local_gradient(head, opt, h, F.one_hot(y, 3).float())
    torch.testing.assert_close(got, expected * 5)  # per-example units, as a synthesizer's prediction
    torch.testing.assert_close(loss, expected_loss.detach())  # the loss before the head's step
    assert not weight_grad.eq(0).all()
    torch.testing.assert_close(head[1].weight.detach(), before - 0.1 * weight_grad)  # one SGD step on that loss


def test_cdni_interfaces_mix_a_local_loss_by_default_and_dni_ones_do_not() -> None:
    iface = BackwardInterface(nn.Linear(4, 4), adam(1e-3))
    h, onehot = torch.randn(8, 4), F.one_hot(torch.arange(8) % 3, 3).float()
    assert iface.local_gradient(h, None) is None and iface.local is None
    local = iface.local_gradient(h, onehot)
    assert local is not None and local.shape == h.shape and iface.local is not None
    p = torch.randn(8, 4)
    iface.local.moments = torch.tensor([1.0, 0.0, 1.0, 0.25, 0.5], dtype=torch.float64)  # a = 0.25, b = 0.5
    a, b = iface.local.coefficients()
    assert (a, b) == pytest.approx((0.25, 0.5), abs=1e-5)
    torch.testing.assert_close(iface.stage_gradient(p, conditioned=True, local=local),
                               (a * (p - p.mean(0)) + b * local) / 8)
    off = BackwardInterface(nn.Linear(4, 4), adam(1e-3), local_loss=False)
    assert off.local_gradient(h, onehot) is None


def test_local_loss_true_without_a_label_says_what_to_do() -> None:
    iface = BackwardInterface(nn.Linear(4, 4), adam(1e-3), local_loss=True)
    with pytest.raises(ConfigError, match="needs the label"):
        iface.local_gradient(torch.randn(2, 4), None)


def test_a_local_loss_refuses_an_activation_of_another_shape_and_says_what_to_do() -> None:
    iface = BackwardInterface(nn.Linear(4, 4), adam(1e-3))
    onehot = F.one_hot(torch.tensor([0, 1]), 3).float()
    iface.local_gradient(torch.randn(2, 4), onehot)
    with pytest.raises(ValueError, match="local_loss=False"):
        iface.local_gradient(torch.randn(2, 5), onehot)


class TrueGradient(nn.Module):
    """An oracle synthesizer: the exact per-example gradient of the loss at h, through a fixed readout."""

    def __init__(self, readout: nn.Module):
        super().__init__()
        self.readout, self.anchor = readout, nn.Parameter(torch.zeros(()))

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        assert context is not None
        with torch.enable_grad():
            hh = h.detach().requires_grad_(True)
            loss = F.cross_entropy(self.readout(hh), context.argmax(1), reduction="sum")
            (g,) = torch.autograd.grad(loss, hh)
        return g + 0.0 * self.anchor


def test_below_a_synthesizer_that_predicts_the_true_gradient_the_mix_leaves_the_local_loss_out() -> None:
    """The oracle: targets equal to the (centred) synthetic gradient give a = 1 and b = 0, whatever l is."""
    torch.manual_seed(0)
    readout = nn.Linear(6, 3)
    readout.requires_grad_(False)
    stages = [nn.Sequential(nn.Linear(5, 6), nn.Tanh()), readout]
    iface = BackwardInterface(TrueGradient(readout), adam(1e-3), center=False)
    dni = sg.DNI(stages, [iface], conditioned=True, num_classes=3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(300):
        dni.step(torch.randn(32, 5, generator=gen), torch.randint(0, 3, (32,), generator=gen))
    assert iface.local is not None
    assert iface.local.coefficients() == pytest.approx((1.0, 0.0), abs=1e-3)


def test_a_checkpoint_with_a_local_loss_loads_into_a_fresh_interface() -> None:
    iface = BackwardInterface(sg.VectorSynthesizer(4, hidden_layers=0), adam(1e-3))
    onehot = F.one_hot(torch.tensor([0, 1, 2, 0]), 3).float()
    h = torch.randn(4, 4)
    for _ in range(3):
        local = iface.local_gradient(h, onehot)
        iface.update(iface.predict(h, onehot), torch.randn(4, 4), local=local)
    fresh = BackwardInterface(sg.VectorSynthesizer(4, hidden_layers=0), adam(1e-3))
    fresh.load_state_dict(iface.state_dict())
    assert fresh.local is not None and fresh.local.coefficients() == iface.local.coefficients()
    torch.testing.assert_close(fresh.local_gradient(h, onehot), iface.local_gradient(h, onehot))


def test_a_diagnosed_step_reports_each_stages_mix_and_dni_reports_none() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))

    def stages() -> list[nn.Module]:
        return [nn.Sequential(nn.Linear(5, 6), nn.Tanh()), nn.Sequential(nn.Linear(6, 6), nn.Tanh()), nn.Linear(6, 3)]

    cdni = sg.DNI.build(stages(), x[:2], conditioned=True, num_classes=3)
    for _ in range(3):
        stats = cdni.step(x, y, diagnose=True)
    assert len(stats["mix_local"]) == 2 and all(b >= 0.0 for b in stats["mix_local"])
    assert stats["mix_synthetic"] == [i.local.coefficients()[0] for i in cdni.interfaces]
    dni = sg.DNI.build(stages(), x[:2])
    assert dni.step(x, y, diagnose=True)["mix_local"] == [None, None]


def test_a_run_resumed_from_its_state_continues_exactly_with_its_local_losses() -> None:
    def make() -> sg.DNI:
        torch.manual_seed(0)
        stages = [nn.Sequential(nn.Linear(5, 6), nn.Tanh()), nn.Sequential(nn.Linear(6, 6), nn.Tanh()), nn.Linear(6, 3)]
        return sg.DNI.build(stages, torch.randn(2, 5), conditioned=True, num_classes=3)

    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 5, generator=gen), torch.randint(0, 3, (16,), generator=gen)) for _ in range(12)]
    run = make()
    for x, y in batches[:6]:
        run.step(x, y)
    resumed = make()
    resumed.load_state_dict(copy.deepcopy(run.state_dict()))
    for x, y in batches[6:]:
        run.step(x, y)
        resumed.step(x, y)
    assert all(torch.equal(p, q) for p, q in zip(run.stages.parameters(), resumed.stages.parameters(), strict=True))
    assert [i.local.coefficients() for i in run.interfaces] == [i.local.coefficients() for i in resumed.interfaces]


def test_the_command_line_refuses_a_local_loss_without_the_label() -> None:
    from synthgrad.config import TrainConfig

    with pytest.raises(ConfigError, match="--synth-local needs the label.*--method cdni"):
        TrainConfig(model="resmlp", method="dni", synth_local=True).resolve()
    assert TrainConfig(model="resmlp", method="cdni").resolve().synth_local is True
    assert TrainConfig(model="mlp", method="cdni").resolve().synth_local is False  # the paper's rows keep theirs


def test_feature_maps_reach_the_head_pooled_to_4x4_and_an_older_2x2_head_resumes() -> None:
    from synthgrad.localloss import LocalLoss

    h, onehot = torch.randn(4, 3, 8, 8), F.one_hot(torch.tensor([0, 1, 2, 0]), 3).float()
    new = LocalLoss((3, 8, 8), 3)
    assert new.head[-1].in_features == 3 * 4 * 4
    old = LocalLoss((3, 8, 8), 3, pool=2)  # what the seventh session's checkpoints hold
    old.gradient(h, onehot)
    state = old.state_dict()
    del state["pool"]  # written before the pool was recorded
    new.load_state_dict(state)
    assert new.pool == 2 and new.head[-1].in_features == 3 * 2 * 2
    torch.testing.assert_close(new.gradient(h, onehot), old.gradient(h, onehot))  # the same head, the same step
