"""Step rules against oracles: backprop's update, zero synthesizers, bootstrap targets, eval mode."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from synthgrad import DNI, Backprop, BackwardInterface, adam, true_gradient
from synthgrad.diagnostics import check_finite
from synthgrad.errors import ConfigError, DivergenceError
from synthgrad.interfaces import OPTIMIZERS, OptimizerFactory
from synthgrad.models import build_stages


class OracleSynthesizer(nn.Module):
    """Returns the true per-example gradient B * dL/dh, computed through the stages above."""

    def __init__(self, upper: list[nn.Module]):
        super().__init__()
        self.upper = upper  # plain list: not registered, so not trained by the interface
        self.labels: torch.Tensor | None = None
        self.dummy = nn.Parameter(torch.zeros(()))  # gives the interface's optimizer a parameter

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        g = true_gradient(self.upper, h, self.labels)
        return g * h.shape[0] + 0 * self.dummy


def _batch(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def _oracle_dni(stages: list[nn.Module], y: torch.Tensor, optimizer: OptimizerFactory | None = None) -> DNI:
    interfaces = []
    for k in range(len(stages) - 1):
        synth = OracleSynthesizer(stages[k + 1:])
        synth.labels = y
        interfaces.append(BackwardInterface(synth, adam(1e-3)))
    return DNI(stages, interfaces, lr=1e-3, optimizer=optimizer)


@pytest.mark.parametrize("model,optimizer", [("mlp", "adam"), ("fcn-3", "adam"), ("cnn", "adam"), ("fcn-3", "sgd")])
def test_true_gradient_synthesizers_give_backprops_update(model: str, optimizer: str) -> None:
    x, y = _batch()
    torch.manual_seed(0)
    stages = build_stages(model, (1, 28, 28), 10)
    make = OPTIMIZERS[optimizer](1e-3 if optimizer == "adam" else 0.1)
    bp = Backprop(copy.deepcopy(stages), optimizer=make)
    dni = _oracle_dni(stages, y, make)
    expected = torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam
    assert isinstance(dni.optimizers[0], expected) and isinstance(bp.optimizers[0], expected)
    for _ in range(3):  # several steps: the optimizer state (Adam moments, momentum) must match too
        bp.step(x, y)
        dni.step(x, y)
    for p_bp, p_dni in zip(bp.stages.parameters(), dni.stages.parameters(), strict=True):
        torch.testing.assert_close(p_dni, p_bp, rtol=1e-5, atol=1e-6)
    for b_bp, b_dni in zip(bp.stages.buffers(), dni.stages.buffers(), strict=True):
        torch.testing.assert_close(b_dni, b_bp)


@pytest.mark.parametrize("model,conditioned", [("fcn-3", False), ("cnn", False), ("fcn-3", True)])
def test_zero_initialised_synthesizers_leave_lower_stages_untouched_at_step_0(model: str, conditioned: bool) -> None:
    x, y = _batch()
    torch.manual_seed(0)
    stages = build_stages(model, (1, 28, 28), 10)
    dni = DNI.build(stages, x[:2], conditioned=conditioned, num_classes=10)
    before = copy.deepcopy(dni.stages.state_dict())
    dni.step(x, y)
    after = dni.stages.state_dict()
    last = len(stages) - 1
    for name, tensor in before.items():
        stage = int(name.split(".")[0])
        if "running" in name or "num_batches" in name:
            continue  # BN statistics move with any forward pass in train mode
        if stage < last:
            assert torch.equal(after[name], tensor), f"{name} moved under a zero synthetic gradient"
    assert not torch.equal(after[f"{last}.weight"] if f"{last}.weight" in after else after[f"{last}.1.weight"],
                           before[f"{last}.weight"] if f"{last}.weight" in before else before[f"{last}.1.weight"])


def test_bootstrap_target_is_next_synthetic_gradient_backpropagated_through_next_stage() -> None:
    x, y = _batch()
    torch.manual_seed(0)
    stages = build_stages("fcn-3", (1, 28, 28), 10)
    dni = DNI.build(stages, x[:2], synth_hidden=0)
    for iface in dni.interfaces:  # non-zero synthesizers, so the targets are not trivially zero
        nn.init.normal_(iface.synthesizer.net[-1].weight, std=0.1)
    captured = {}
    original = dni.interfaces[0].update

    def spy(prediction: torch.Tensor, target: torch.Tensor) -> float:
        captured["target"] = target.clone()
        return original(prediction, target)

    dni.interfaces[0].update = spy
    # The expected target, computed by hand before the step changes anything.
    stage0, stage1 = copy.deepcopy(dni.stages[0]), copy.deepcopy(dni.stages[1])
    iface1 = copy.deepcopy(dni.interfaces[1])
    h0 = stage0(x).detach().requires_grad_(True)
    h1 = stage1(h0)
    g1 = iface1.stage_gradient(iface1.predict(h1))
    (expected,) = torch.autograd.grad(h1, h0, g1)
    dni.step(x, y)
    torch.testing.assert_close(captured["target"], expected, rtol=1e-5, atol=1e-8)


def test_last_interface_sees_the_true_loss_gradient() -> None:
    x, y = _batch()
    torch.manual_seed(0)
    stages = build_stages("mlp", (1, 28, 28), 10)
    dni = DNI.build(stages, x[:2])
    expected = true_gradient([copy.deepcopy(stages[1])], stages[0](x).detach(), y)
    captured = {}
    original = dni.interfaces[0].update
    dni.interfaces[0].update = lambda p, t: captured.setdefault("t", t.clone()) is not None and original(p, t)
    dni.step(x, y)
    torch.testing.assert_close(captured["t"], expected)


def test_backprop_targets_are_true_gradients_even_with_synthesizers_above() -> None:
    x, y = _batch()
    torch.manual_seed(0)
    stages = build_stages("fcn-3", (1, 28, 28), 10)
    dni = DNI.build(stages, x[:2], target="backprop", synth_hidden=0)
    upper = [copy.deepcopy(s) for s in stages[1:]]
    expected = true_gradient(upper, copy.deepcopy(stages[0])(x).detach(), y)
    captured = {}
    original = dni.interfaces[0].update
    dni.interfaces[0].update = lambda p, t: captured.setdefault("t", t.clone()) is not None and original(p, t)
    dni.step(x, y)
    torch.testing.assert_close(captured["t"], expected, rtol=1e-5, atol=1e-8)


def test_cdni_synthesizer_output_depends_on_the_label() -> None:
    x, y = _batch()
    stages = build_stages("fcn-3", (1, 28, 28), 10)
    dni = DNI.build(stages, x[:2], conditioned=True, num_classes=10)
    for _ in range(5):
        dni.step(x, y)
    h = stages[0](x).detach()
    synth = dni.interfaces[0].synthesizer.eval()
    a = synth(h, F.one_hot(y, 10).float())
    b = synth(h, F.one_hot((y + 1) % 10, 10).float())
    assert not torch.allclose(a, b)


def test_eval_network_is_the_plain_composition() -> None:
    x, y = _batch()
    stages = build_stages("cnn", (1, 28, 28), 10)
    dni = DNI.build(stages, x[:2], conditioned=True, num_classes=10)
    for _ in range(3):
        dni.step(x, y)
    net = dni.network().eval()
    with torch.no_grad():
        h = x
        for s in stages:
            h = s.eval()(h)
        torch.testing.assert_close(net(x), h)
    assert all(not any(p is q for q in net.parameters()) for i in dni.interfaces for p in i.model.parameters())


def test_one_backprop_step_changes_every_stage() -> None:
    x, y = _batch()
    stages = build_stages("fcn-3", (1, 28, 28), 10)
    bp = Backprop(stages)
    before = [p.clone() for p in bp.stages.parameters()]
    stats = bp.step(x, y)
    assert stats["train_loss"] > 0
    assert all(not torch.equal(a, b) for a, b in zip(before, bp.stages.parameters(), strict=True))


@pytest.mark.parametrize("method", ["backprop", "dni", "cdni"])
def test_update_prob_zero_never_changes_a_stage(method: str) -> None:
    x, y = _batch()
    stages = build_stages("fcn-3", (1, 28, 28), 10)
    if method == "backprop":
        rule = Backprop(stages, update_prob=0.0)
    else:
        rule = DNI.build(stages, x[:2], conditioned=method == "cdni", num_classes=10, update_prob=0.0)
    before = [p.clone() for p in rule.stages.parameters()]
    for _ in range(3):
        rule.step(x, y)
    assert all(torch.equal(a, b) for a, b in zip(before, rule.stages.parameters(), strict=True))


@pytest.mark.parametrize("method", ["backprop", "dni"])
def test_update_prob_one_equals_the_plain_method(method: str) -> None:
    x, y = _batch()
    results = []
    for p in (1.0, None):
        torch.manual_seed(0)
        stages = build_stages("fcn-3", (1, 28, 28), 10)
        kwargs = {} if p is None else {"update_prob": p}
        rule = Backprop(stages, **kwargs) if method == "backprop" else DNI.build(stages, x[:2], **kwargs)
        for _ in range(3):
            rule.step(x, y)
        results.append([t.clone() for t in rule.stages.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_update_prob_half_updates_some_steps_and_skips_others() -> None:
    x, y = _batch()
    stages = build_stages("fcn-3", (1, 28, 28), 10)
    rule = Backprop(stages, update_prob=0.5, seed=3)
    changed = []
    for _ in range(20):
        before = stages[0][1].weight.clone()
        rule.step(x, y)
        changed.append(not torch.equal(before, stages[0][1].weight))
    assert 0 < sum(changed) < 20


def test_non_finite_loss_raises_divergence_naming_the_stage() -> None:
    x, y = _batch()
    stages = build_stages("mlp", (1, 28, 28), 10)
    dni = DNI.build(stages, x[:2])
    x_bad = x.clone()
    x_bad[0, 0, 0, 0] = float("nan")
    # NaN input -> NaN activation -> the synthesizer above stage 1 predicts NaN first.
    with pytest.raises(DivergenceError, match="synthetic gradient at stage 1, step 0"):
        dni.step(x_bad, y)
    bp = Backprop(build_stages("mlp", (1, 28, 28), 10))
    with pytest.raises(DivergenceError, match="loss at stage 2"):
        bp.step(x_bad, y)


@pytest.mark.parametrize("bad", [[float("nan")], [float("inf")], [-float("inf")], [float("inf"), -float("inf")],
                                 [3e38, 3e38]])
def test_check_finite_catches_every_non_finite_tensor(bad: list[float]) -> None:
    t = torch.tensor([1.0, -2.0, *bad])
    with pytest.raises(DivergenceError, match="synthetic gradient at stage 3, step 7"):
        check_finite(t, "synthetic gradient", 2, 7)
    check_finite(torch.tensor([1.0, -2.0, 3e38]), "loss", 0, 0)  # large but finite: no error


def test_diagnostics_report_agreement_with_the_true_gradient() -> None:
    x, y = _batch()
    torch.manual_seed(0)
    stages = build_stages("fcn-3", (1, 28, 28), 10)
    dni = _oracle_dni(stages, y)
    stats = dni.step(x, y, diagnose=True)
    assert stats["grad_cosine"] == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)
    assert stats["grad_rel_error"] == pytest.approx([0.0, 0.0, 0.0], abs=1e-4)


def test_complete_unlock_trains_input_synthesizers_toward_the_real_activation() -> None:
    x, y = _batch(64)
    torch.manual_seed(0)
    stages = build_stages("fcn-2", (1, 28, 28), 10, width=32)
    dni = DNI.build(stages, x[:2], unlock="complete", synth_width=32, input_width=64, synth_lr=1e-3)
    losses = [dni.step(x, y)["input_loss"] for _ in range(60)]
    assert all(late < 0.5 * early for early, late in zip(losses[0], losses[-1], strict=True))


def test_complete_unlock_stages_do_not_use_the_activation_from_below() -> None:
    # Stage 2's update depends only on x (through its synthetic input), not on stage 1's output:
    # perturbing stage 1 leaves stage 2's parameters after one step unchanged.
    x, y = _batch()
    results = []
    for perturb in (False, True):
        torch.manual_seed(0)
        stages = build_stages("fcn-2", (1, 28, 28), 10, width=32)
        dni = DNI.build(stages, x[:2], unlock="complete", synth_width=32, input_width=32)
        if perturb:
            with torch.no_grad():
                stages[0][1].weight.mul_(3.0)
        dni.step(x, y)
        results.append([p.clone() for p in stages[1].parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_complete_unlock_keeps_bn_statistics_of_the_real_network() -> None:
    x, y = _batch()
    torch.manual_seed(0)
    stages = build_stages("fcn-2", (1, 28, 28), 10, width=32)
    dni = DNI.build(stages, x[:2], unlock="complete", synth_width=32, input_width=32)
    dni.step(x, y)
    assert int(stages[1][1].num_batches_tracked) == 1  # one real forward pass, not two


def test_synthesizer_learns_whenever_the_stage_above_updates() -> None:
    # With update_prob < 1, a target exists whenever the stage above runs its backward pass; the
    # synthesizer below must train on it even if its own stage skipped that step.
    x, y = _batch()
    stages = build_stages("fcn-2", (1, 28, 28), 10, width=32)
    dni = DNI.build(stages, x[:2], synth_hidden=0, update_prob=0.5, seed=1)
    trained = 0
    for _ in range(40):
        # The draw the stage above is about to make (each stage draws from its own generator).
        above = dni.stage_rules[1].generator.get_state()
        draw = torch.rand(1, generator=torch.Generator().set_state(above))
        stats = dni.step(x, y)
        above_updated = bool(draw < 0.5)
        assert (stats["synth_loss"][0] is not None) == above_updated
        trained += above_updated
    assert 0 < trained < 40


@pytest.mark.parametrize("conditioned", [False, True])
def test_build_gives_a_float64_model_synthesizers_of_its_precision(conditioned: bool) -> None:
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Linear(20, 16), nn.ReLU()).double(), nn.Linear(16, 3).double()]
    x, y = torch.randn(32, 20, dtype=torch.float64), torch.randint(0, 3, (32,))
    dni = DNI.build(stages, x[:2], conditioned=conditioned, num_classes=3)
    assert all(p.dtype == torch.float64 for i in dni.interfaces for p in i.model.parameters())
    before = stages[0][0].weight.detach().clone()
    for _ in range(3):
        stats = dni.step(x, y, diagnose=True)
    assert stats["synth_loss"][0] is not None and stats["grad_cosine"][0] is not None
    assert not torch.equal(before, stages[0][0].weight)


class _TupleStage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 8, batch_first=True)

    def forward(self, h: torch.Tensor) -> tuple:
        return self.lstm(h)  # (output, (h, c)): not one activation


def test_a_stage_that_returns_a_tuple_is_a_config_error_that_says_what_to_keep() -> None:
    from synthgrad.errors import ConfigError

    stages = [_TupleStage(), nn.Sequential(nn.Flatten(), nn.Linear(40, 3))]
    x, y = torch.randn(8, 5, 4), torch.randint(0, 3, (8,))
    with pytest.raises(ConfigError, match="stage 1 returned a tuple.*keep output"):
        DNI.build(stages, x[:2])
    from synthgrad.synthesizers import make_synthesizer

    dni = DNI(stages, [BackwardInterface(make_synthesizer((5, 8), 0, None, 0), adam(1e-3))])
    with pytest.raises(ConfigError, match="stage 1 returned a tuple"):
        dni.step(x, y)


def test_lower_optimizer_with_true_gradient_synthesizers_gives_backprops_update_at_the_same_rates() -> None:
    x, y = _batch()
    torch.manual_seed(0)
    stages = build_stages("fcn-3", (1, 28, 28), 10)
    bp = Backprop(copy.deepcopy(stages), lr=1e-3, lower_optimizer=adam(3e-3))
    interfaces = []
    for k in range(len(stages) - 1):
        synth = OracleSynthesizer(stages[k + 1:])
        synth.labels = y
        interfaces.append(BackwardInterface(synth, adam(1e-3)))
    dni = DNI(stages, interfaces, lr=1e-3, lower_optimizer=adam(3e-3))
    assert [o.param_groups[0]["lr"] for o in dni.optimizers] == [3e-3] * (len(stages) - 1) + [1e-3]
    for _ in range(3):
        bp.step(x, y)
        dni.step(x, y)
    for p_bp, p_dni in zip(bp.stages.parameters(), dni.stages.parameters(), strict=True):
        torch.testing.assert_close(p_dni, p_bp, rtol=1e-5, atol=1e-6)


def test_build_lower_lr_sets_the_lower_stages_rate_and_the_schedule_scales_it() -> None:
    x, _ = _batch()
    stages = build_stages("fcn-3", (1, 28, 28), 10)
    dni = DNI.build(stages, x[:2], conditioned=True, num_classes=10, lr=1e-3, lower_lr=2e-3)
    assert [o.param_groups[0]["lr"] for o in dni.optimizers] == [2e-3] * (len(stages) - 1) + [1e-3]
    dni.set_lr_factor(0.5)
    assert [o.param_groups[0]["lr"] for o in dni.optimizers] == [1e-3] * (len(stages) - 1) + [5e-4]
    default = DNI.build(build_stages("fcn-3", (1, 28, 28), 10), x[:2], lr=1e-3)
    assert all(o.param_groups[0]["lr"] == 1e-3 for o in default.optimizers)


@pytest.mark.parametrize("bad", [{"lower_lr": 0.0}, {"lower_lr": 1e-3, "optimizer": adam(1e-3)}])
def test_build_lower_lr_refuses_what_it_cannot_honour(bad: dict) -> None:
    x, _ = _batch()
    with pytest.raises(ConfigError, match="lower_lr"):
        DNI.build(build_stages("mlp", (1, 28, 28), 10), x[:2], **bad)


class _SequenceFirst(nn.Module):
    """A GRU without batch_first: given [T, B, D] (the input transposed inside), it returns [T, B, H]."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(4, 8)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.gru(h.transpose(0, 1))[0]


def test_a_stage_whose_output_is_not_batch_first_is_refused_at_build() -> None:
    from synthgrad.errors import ConfigError

    stages = [_SequenceFirst(), nn.Sequential(nn.Flatten(), nn.Linear(24, 3))]
    with pytest.raises(ConfigError, match=r"stage 1 maps a batch of 2 to an output of shape \[3, 2, 8\].*batch_first"):
        DNI.build(stages, torch.randn(2, 3, 4))
