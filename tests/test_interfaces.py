"""Interfaces: regression toward targets, gradient units, scale and warm-up, trust factor, projection."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from synthgrad import BackwardInterface, ForwardInterface, VectorSynthesizer, adam, true_gradient
from synthgrad.stage import StageRule


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


class _FixedMap(nn.Module):
    """A synthesizer that predicts h @ A whatever it is taught (its one parameter is unused)."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.register_buffer("a", a)
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return h @ self.a + 0 * self.dummy


def _taught(iface: BackwardInterface, c: float, steps: int, batch: int = 16) -> BackwardInterface:
    """`iface` after `steps` targets t = c p of its own predictions on random h (batch-mean units)."""
    dim = iface.model.a.shape[0]
    for _ in range(steps):
        p = iface.predict(torch.randn(batch, dim))
        iface.update(p, c * p.detach() / batch)
    return iface


@pytest.mark.parametrize("c,expected", [(0.5, 0.5), (0.25, 0.25), (2.0, 1.0), (-1.0, 0.0)])
def test_trust_factor_is_the_least_squares_scalar_clamped(c: float, expected: float) -> None:
    # Oracle: targets t = c p exactly give E[p.t] / E[p.p] = c on every batch, clamped to [0, 1].
    torch.manual_seed(0)
    iface = BackwardInterface(_FixedMap(torch.randn(6, 6)), adam(1e-3), trust=True)
    assert float(iface.trust_factor) == 1.0  # no evidence yet
    for _ in range(5):
        h = torch.randn(16, 6)
        p = iface.predict(h)
        iface.update(p, c * p.detach() / 16)  # targets arrive in batch-mean units
    assert float(iface.trust_factor) == pytest.approx(expected, abs=1e-12)
    torch.testing.assert_close(iface.stage_gradient(p), p.detach() / 16)  # the gradient is left as it is


def test_a_stage_below_a_trusting_interface_moves_at_its_scheduled_rate_times_the_trust_factor() -> None:
    # Oracle: targets t = 0.25 p give alpha = 0.25; the stage's learning rate is then 0.25 x schedule x initial,
    # set afresh at each step (no compounding), and the interface's own rate follows the schedule alone.
    torch.manual_seed(0)
    iface = _taught(BackwardInterface(_FixedMap(torch.randn(6, 6)), adam(1e-3), trust=True), 0.25, steps=3)
    stage = nn.Linear(6, 6)
    rule = StageRule(0, stage, torch.optim.SGD(stage.parameters(), lr=0.1), interface=iface)
    rule.set_lr_factor(0.5)
    for step in range(2):
        rule.step(torch.randn(16, 6), torch.zeros(16, dtype=torch.long), step)
        assert rule.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 * 0.25)
        assert iface.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5)
    iface.trust = False  # off: the stage keeps the schedule's rate
    rule.step(torch.randn(16, 6), torch.zeros(16, dtype=torch.long), 2)
    assert rule.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 * 0.25)  # untouched, not reset
    rule.set_lr_factor(0.5)
    assert rule.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5)


def test_trust_reaches_the_interfaces_from_the_command_line_and_is_off_by_default(tmp_path) -> None:
    from synthgrad import DNI
    from synthgrad.cli import build_parser, config_from_args
    from synthgrad.models import build_stages

    for flags, expected in (([], False), (["--synth-trust"], True)):
        cfg = config_from_args(build_parser().parse_args(
            ["train", "--model", "fcn-3", "--method", "cdni", "--run-dir", str(tmp_path), *flags])).resolve()
        assert cfg.synth_trust is expected
        rule = DNI.build(build_stages("fcn-3", (1, 28, 28), 10), torch.randn(2, 1, 28, 28), conditioned=True,
                         num_classes=10, synth_trust=cfg.synth_trust)
        assert [i.trust for i in rule.interfaces] == [expected] * 3


def test_trust_shrinks_a_synthesizer_that_predicts_noise_to_about_zero() -> None:
    # The prediction is a fixed random map of h; the targets a different function of h: no agreement on average.
    torch.manual_seed(0)
    iface = BackwardInterface(_FixedMap(torch.randn(32, 32)), adam(1e-3), trust=True)
    w = torch.randn(32, 32)
    for _ in range(500):
        h = torch.randn(64, 32)
        iface.update(iface.predict(h), (h @ w) / 64)
    assert abs(float(iface.trust_factor)) < 0.05
    # The stage below (plain SGD) moves under 5% of what it moves with the same gradient untrusted.
    moved = {}
    for trust in (True, False):
        iface.trust = trust
        torch.manual_seed(1)
        stage = nn.Linear(32, 32)
        before = stage.weight.detach().clone()
        rule = StageRule(0, stage, torch.optim.SGD(stage.parameters(), lr=0.1), interface=iface)
        rule.step(torch.randn(64, 32), torch.zeros(64, dtype=torch.long), 0)
        moved[trust] = (stage.weight.detach() - before).norm()
    assert moved[False] > 0 and moved[True] < 0.05 * moved[False]


def test_trust_state_is_checkpointed() -> None:
    torch.manual_seed(0)
    a = _taught(BackwardInterface(_FixedMap(torch.randn(4, 4)), adam(1e-3), trust=True), 0.3, steps=3, batch=8)
    b = BackwardInterface(_FixedMap(torch.randn(4, 4)), adam(1e-3), trust=True)
    b.load_state_dict(a.state_dict())
    assert float(b.trust_factor) == pytest.approx(0.3) and torch.equal(a.fit, b.fit)
    legacy = {k: v for k, v in a.state_dict().items() if k != "fit"}  # a checkpoint from before the trust factor
    c = BackwardInterface(_FixedMap(torch.randn(4, 4)), adam(1e-3), trust=True)
    c.load_state_dict(legacy)
    assert float(c.trust_factor) == 1.0


def test_projection_removes_the_component_along_h_per_example() -> None:
    torch.manual_seed(0)
    raw = BackwardInterface(_FixedMap(torch.randn(5, 5)), adam(1e-3))
    proj = BackwardInterface(raw.model, adam(1e-3), project=True)
    h = torch.randn(7, 5)
    p, q = raw.predict(h), proj.predict(h)
    torch.testing.assert_close((q * h).sum(1), torch.zeros(7), atol=1e-5, rtol=0)
    coef = (p * h).sum(1, keepdim=True) / (h * h).sum(1, keepdim=True)
    torch.testing.assert_close(q + coef * h, p)  # only the component along h went


def test_projection_keeps_the_true_gradient_of_a_stage_that_normalises_its_input() -> None:
    # LayerNorm(c h) = LayerNorm(h): the true gradient at h is orthogonal to h, so projecting it changes nothing.
    torch.manual_seed(0)
    upper = nn.Sequential(nn.LayerNorm(12, eps=1e-12), nn.Linear(12, 3))  # eps 0: exactly scale-invariant
    h, y = torch.randn(9, 12), torch.randint(0, 3, (9,))

    class Oracle(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dummy = nn.Parameter(torch.zeros(()))

        def forward(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
            return true_gradient([upper], h, y) * h.shape[0] + 0 * self.dummy

    iface = BackwardInterface(Oracle(), adam(1e-3), project=True)
    torch.testing.assert_close(iface.stage_gradient(iface.predict(h)), true_gradient([upper], h, y),
                               atol=1e-7, rtol=1e-4)


def test_trusted_true_gradient_synthesizers_still_give_backprops_update() -> None:
    # Oracle: with synthesizers that output the true gradient, the trust factor is 1 and DNI is backprop
    # (SGD, whose step follows the gradient's scale).
    import copy

    from synthgrad import DNI, Backprop
    from synthgrad.interfaces import sgd
    from synthgrad.models import build_stages

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g)
    torch.manual_seed(0)
    stages = build_stages("fcn-3", (1, 28, 28), 10)
    bp = Backprop(copy.deepcopy(stages), optimizer=sgd(0.1))

    class Oracle(nn.Module):
        def __init__(self, upper: list[nn.Module]):
            super().__init__()
            self.upper, self.dummy = upper, nn.Parameter(torch.zeros(()))

        def forward(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
            return true_gradient(self.upper, h, y) * h.shape[0] + 0 * self.dummy

    ifaces = [BackwardInterface(Oracle(list(stages[k + 1:])), adam(1e-3), trust=True)
              for k in range(len(stages) - 1)]
    dni = DNI(stages, ifaces, optimizer=sgd(0.1))
    for _ in range(3):
        bp.step(x, y)
        dni.step(x, y)
    assert all(float(i.trust_factor) == pytest.approx(1.0, abs=1e-6) for i in ifaces)
    for a, b in zip(bp.stages.parameters(), dni.stages.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_update_every_regresses_onto_every_other_target_only() -> None:
    import synthgrad as sg

    x, y = torch.randn(32, 20), torch.randint(0, 3, (32,))
    stages = [torch.nn.Linear(20, 16), torch.nn.Linear(16, 3)]
    dni = sg.DNI.build(stages, x[:2], synth_hidden=0, synth_every=2)
    losses = [dni.step(x, y, diagnose=False)["synth_loss"][0] for _ in range(5)]
    assert [v is not None for v in losses] == [True, False, True, False, True]
    state = dni.interfaces[0].state_dict()
    assert state["targets_seen"] == 5


def test_center_removes_the_batch_mean_of_the_applied_gradient_only() -> None:
    torch.manual_seed(0)
    iface = BackwardInterface(_FixedMap(torch.randn(5, 5)), adam(1e-3), center=True)
    h = torch.randn(8, 5)
    p = iface.predict(h)
    applied = iface.stage_gradient(p)
    torch.testing.assert_close(applied, (p.detach() - p.detach().mean(0)) / 8)  # oracle: per feature
    torch.testing.assert_close(applied.sum(0), torch.zeros(5), atol=1e-6, rtol=0)
    same = iface.predict(torch.ones(8, 5))  # every example alike: nothing distinguishes them, nothing is applied
    assert iface.stage_gradient(same).abs().max() < 1e-6
    # The regression still sees the whole prediction: its loss against a shifted target is not centred away.
    assert iface.update(p, (p.detach() + 1.0) / 8) == pytest.approx(1.0, rel=1e-5)


def test_a_batch_of_one_is_not_centred_to_nothing() -> None:
    # One example is its own batch mean: centring would apply a zero gradient and the stage would never learn.
    iface = BackwardInterface(_FixedMap(torch.randn(5, 5)), adam(1e-3), center=True)
    p = iface.predict(torch.randn(1, 5))
    torch.testing.assert_close(iface.stage_gradient(p), p.detach())  # oracle: batch-mean units, B = 1


@pytest.mark.parametrize("shape,kind", [((32,), "VectorSynthesizer"), ((4, 7, 7), "ConvSynthesizer"),
                                        ((6, 8), "TokenSynthesizer")])
def test_default_interface_is_a_centred_linear_synthesizer_starting_at_zero(shape: tuple[int, ...], kind: str) -> None:
    from synthgrad.defaults import DEFAULT_SYNTH_LR, default_interface

    iface = default_interface(shape, conditioned=True, num_classes=10)
    assert type(iface.synthesizer).__name__ == "ClassifierGradient"  # cDNI: plus a local classifier's gradient
    base = iface.synthesizer.base
    assert type(base).__name__ == kind and iface.centers(conditioned=False) and not iface.trust
    assert iface.optimizer.param_groups[0]["lr"] == DEFAULT_SYNTH_LR
    linear = [m for m in base.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    # No hidden layer: one linear map (and, for feature maps, the label's per-class bias, a Linear too).
    assert len(linear) == (2 if kind == "ConvSynthesizer" else 1)
    if kind == "TokenSynthesizer":
        assert base.positions == shape[0]
    assert type(default_interface(shape).synthesizer).__name__ == kind  # DNI: no classifier term
    h, ctx = torch.randn(3, *shape), torch.eye(10)[[0, 1, 2]]
    assert torch.count_nonzero(iface.predict(h, ctx)) == 0
    with pytest.raises(ValueError, match="num_classes"):
        default_interface(shape, conditioned=True)


def test_synth_center_reaches_every_default_interface_from_the_command_line() -> None:
    import synthgrad as sg
    from synthgrad.cli import build_parser, config_from_args
    from synthgrad.trainer import build_rule

    argv = ["train", "--model", "fcn-3", "--width", "32", "--method", "cdni"]
    on = config_from_args(build_parser().parse_args(argv))  # cDNI's default
    off = config_from_args(build_parser().parse_args([*argv, "--no-synth-center"]))
    dni = config_from_args(build_parser().parse_args([*argv[:-1], "dni"]))
    assert (on.synth_center, off.synth_center, dni.synth_center) == (True, False, False)
    assert all(i.centers(conditioned=True) for i in build_rule(on, (1, 28, 28), 10).interfaces)
    assert not any(i.centers(conditioned=True) for i in build_rule(off, (1, 28, 28), 10).interfaces)
    assert not any(i.centers(conditioned=False) for i in build_rule(dni, (1, 28, 28), 10).interfaces)
    x = torch.randn(4, 20)
    stages = [torch.nn.Linear(20, 16), torch.nn.Linear(16, 3)]
    assert sg.DNI.build(stages, x[:2], synth_center=True).interfaces[0].centers(conditioned=False)
    off_build = sg.DNI.build(stages, x[:2], conditioned=True, num_classes=3, synth_center=False)
    assert not off_build.interfaces[0].centers(conditioned=True)


def test_dni_build_defaults_are_the_papers_for_dni_and_fast_and_centred_for_cdni() -> None:
    import synthgrad as sg
    from synthgrad.defaults import CDNI_SYNTH_LR, DNI_SYNTH_LR

    x = torch.randn(4, 20)
    stages = [torch.nn.Linear(20, 16), torch.nn.Linear(16, 3)]
    (dni,) = sg.DNI.build(stages, x[:2]).interfaces
    (cdni,) = sg.DNI.build(stages, x[:2], conditioned=True, num_classes=3).interfaces
    assert (dni.optimizer.param_groups[0]["lr"], dni.centers(conditioned=False)) == (DNI_SYNTH_LR, False)
    assert (cdni.optimizer.param_groups[0]["lr"], cdni.centers(conditioned=True)) == (CDNI_SYNTH_LR, True)
    assert (DNI_SYNTH_LR, CDNI_SYNTH_LR) == (1e-4, 1e-3)


def test_a_custom_interface_is_centred_by_default_when_its_synthesizer_sees_the_label() -> None:
    """center=None: a user's cDNI synthesizer gets the library's centring; DNI (no context) is left alone."""
    iface = BackwardInterface(nn.Linear(5, 5), adam(1e-3))
    p = torch.randn(8, 5) + 3.0  # a large shared component
    torch.testing.assert_close(iface.stage_gradient(p, conditioned=True), (p - p.mean(0)) / 8)
    torch.testing.assert_close(iface.stage_gradient(p), p / 8)
    assert BackwardInterface(nn.Linear(5, 5), adam(1e-3), center=False).stage_gradient(p, conditioned=True).equal(p / 8)


class _Constant(nn.Module):
    """A custom synthesizer that predicts the same gradient for every example (all batch mean)."""

    def __init__(self, dim: int):
        super().__init__()
        self.bias = nn.Parameter(torch.ones(dim))

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.bias.expand_as(h)


def test_a_custom_cdni_synthesizer_that_predicts_only_a_batch_mean_leaves_its_stage_in_place() -> None:
    import synthgrad as sg

    torch.manual_seed(0)
    stages = [nn.Linear(6, 5), nn.Linear(5, 3)]
    before = stages[0].weight.detach().clone()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    sg.DNI(stages, [BackwardInterface(_Constant(5), sg.sgd(0.1), local_loss=False)], optimizer=sg.sgd(0.1),
           conditioned=True, num_classes=3).step(x, y)
    torch.testing.assert_close(stages[0].weight.detach(), before)  # centred to zero: nothing applied
    sg.DNI(stages, [BackwardInterface(_Constant(5), sg.sgd(0.1))], optimizer=sg.sgd(0.1)).step(x, y)
    assert not torch.allclose(stages[0].weight.detach(), before)  # DNI applies it


def _labels(b: int, k: int = 4) -> torch.Tensor:
    return torch.eye(k)[torch.arange(b) % k]  # one-hot [B, K]


def test_a_custom_cdni_synthesizer_gets_the_classifier_term_at_its_first_prediction() -> None:
    from synthgrad import ClassifierGradient

    torch.manual_seed(0)
    mine = VectorSynthesizer(6, hidden_layers=0, context_dim=4)
    iface = BackwardInterface(mine, adam(1e-3))
    h = torch.randn(8, 6)
    rng = torch.get_rng_state()
    p = iface.predict(h, _labels(8))
    assert isinstance(iface.synthesizer, ClassifierGradient) and iface.synthesizer.base is mine
    assert torch.equal(torch.get_rng_state(), rng)  # the run's random stream did not move
    torch.testing.assert_close(p, mine(h, _labels(8)))  # U starts at zero: the custom prediction, unchanged
    groups = iface.optimizer.param_groups
    assert len(groups) == 2 and groups[1]["lr"] == groups[0]["lr"] == 1e-3
    for _ in range(3):  # the term learns, through the interface's own regression
        iface.update(iface.predict(h, _labels(8)), torch.randn(8, 6) / 8)
    assert iface.synthesizer.error_map.weight.abs().sum() > 0
    # The same V wherever the term is added (a pipeline's stage process and DNI.step agree).
    first, second = (BackwardInterface(VectorSynthesizer(6, hidden_layers=0, context_dim=4), adam(1e-3))
                     for _ in range(2))
    torch.randn(5)  # a different global random state
    first.predict(h, _labels(8))
    torch.randn(5)
    second.predict(h, _labels(8))
    assert torch.equal(first.synthesizer.logits.weight, second.synthesizer.logits.weight)


def test_classifier_false_or_dni_leaves_a_custom_synthesizer_alone() -> None:
    from synthgrad.errors import ConfigError

    mine = VectorSynthesizer(6, hidden_layers=0, context_dim=4)
    off = BackwardInterface(mine, adam(1e-3), classifier=False)
    off.predict(torch.randn(8, 6), _labels(8))
    assert off.synthesizer is mine and len(off.optimizer.param_groups) == 1
    dni = BackwardInterface(VectorSynthesizer(6, hidden_layers=0), adam(1e-3))
    dni.predict(torch.randn(8, 6))
    assert isinstance(dni.synthesizer, VectorSynthesizer)
    forced = BackwardInterface(VectorSynthesizer(6, hidden_layers=0), adam(1e-3), classifier=True)
    with pytest.raises(ConfigError, match="ClassifierGradient"):
        forced.predict(torch.randn(8, 6))


def test_a_checkpoint_with_the_classifier_term_loads_into_a_fresh_interface() -> None:
    torch.manual_seed(0)
    h = torch.randn(8, 6)
    iface = BackwardInterface(VectorSynthesizer(6, hidden_layers=0, context_dim=4), adam(1e-3))
    for _ in range(3):
        iface.update(iface.predict(h, _labels(8)), torch.randn(8, 6) / 8)
    state = iface.state_dict()
    fresh = BackwardInterface(VectorSynthesizer(6, hidden_layers=0, context_dim=4), adam(1e-3))
    fresh.load_state_dict(state)  # before any prediction: the term is added from the checkpoint's shapes
    torch.testing.assert_close(fresh.predict(h, _labels(8)), iface.predict(h, _labels(8)))
    assert fresh.optimizer.state_dict()["state"].keys() == iface.optimizer.state_dict()["state"].keys()


def test_the_classifier_term_refuses_an_activation_of_another_size_and_says_what_to_do() -> None:
    from synthgrad import ClassifierGradient

    s = ClassifierGradient(VectorSynthesizer(6, hidden_layers=0, context_dim=4), (6,), 4)
    with pytest.raises(ValueError, match="classifier=False"):
        s(torch.randn(8, 7), _labels(8))


@pytest.mark.parametrize("model,stages,expected", [
    ("resmlp", None, True), ("vit-mini", None, True), ("cnn-deep", None, True),  # the library's default
    ("mlp", None, False), ("fcn-3", None, False), ("fcn-6", None, False), ("cnn", None, False),  # the README's rows
    ("resmlp", 2, False),  # the pipeline: its timings were measured without the term
])
def test_the_classifier_term_reaches_the_command_line_where_it_is_the_default(model: str, stages: int | None,
                                                                              expected: bool) -> None:
    from synthgrad import ClassifierGradient
    from synthgrad.config import TrainConfig
    from synthgrad.trainer import build_rule

    cfg = TrainConfig(model=model, method="cdni", stages=stages).resolve()
    assert cfg.synth_classifier is expected
    assert TrainConfig(model=model, method="dni", stages=stages).resolve().synth_classifier is False
    if stages is None and model in ("resmlp", "mlp"):
        rule = build_rule(cfg, (1, 28, 28), 10)
        assert all(isinstance(i.synthesizer, ClassifierGradient) is expected for i in rule.interfaces)
        assert all(i.classifier is expected for i in rule.interfaces)  # nothing is added later either
