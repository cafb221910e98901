"""sg.cut and its helpers: the stages compute exactly the uncut model; the balanced cut minimises the busiest stage."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import synthgrad as sg
from synthgrad import cutting
from synthgrad.errors import ConfigError


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 100), nn.ReLU(), nn.Linear(100, 100), nn.BatchNorm1d(100), nn.ReLU(),
                         nn.Linear(100, 100), nn.Tanh(), nn.Linear(100, 10))


@pytest.mark.parametrize("balance,k", [("cost", 1), ("cost", 2), ("cost", 3), ("cost", 5), ("count", 1),
                                       ("count", 3), ("count", 8)])
def test_stages_compose_to_exactly_the_uncut_model(balance: str, k: int) -> None:
    model = _model()
    x = torch.randn(16, 10)
    stages = sg.cut(model, k, sample=x[:2], balance=balance)
    assert len(stages) == k
    # the same modules, in the same order: nothing copied, nothing lost
    assert [id(m) for s in stages for m in (s if isinstance(s, nn.Sequential) else [s])] == [id(m) for m in model]
    for mode in ("train", "eval"):
        getattr(model, mode)()
        want = model(x)
        h = x
        for s in stages:
            h = s(h)
        assert torch.equal(h, want), mode
    # and the same gradients
    model.train()
    model(x).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    h = x
    for s in stages:
        h = s(h)
    h.square().sum().backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters(), strict=True))


def test_balanced_cut_minimises_the_busiest_stage_hand_checked() -> None:
    # Linear MACs per example: 10*100 = 1,000; 100*100 = 10,000; 10,000; 100*10 = 1,000.
    # Step costs (2x forward for the first layer, which needs no input gradient, 3x for the rest):
    # 2,000 | 30,000 | 30,000 | 3,000. Cuts into 2: after layer 1 -> max(2,000, 63,000) = 63,000;
    # after 2 -> max(32,000, 33,000) = 33,000; after 3 -> max(62,000, 3,000) = 62,000. Best: after layer 2.
    layers = [nn.Linear(10, 100), nn.Linear(100, 100), nn.Linear(100, 100), nn.Linear(100, 10)]
    assert cutting.step_costs(layers, (10,)) == [2000, 30000, 30000, 3000]
    assert cutting.cut_bounds([2000, 30000, 30000, 3000], 2) == (0, 2, 4)
    stages = sg.cut(layers, 2, sample=torch.zeros(2, 10))
    assert [len(s) for s in stages] == [2, 2]


def test_cut_bounds_against_brute_force() -> None:
    costs = [5.0, 1.0, 7.0, 2.0, 2.0, 9.0, 1.0]
    for k in range(1, len(costs) + 1):
        best = min(max(sum(costs[a:b]) for a, b in itertools.pairwise((0, *c, len(costs))))
                   for c in itertools.combinations(range(1, len(costs)), k - 1))
        bounds = cutting.cut_bounds(costs, k)
        assert max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds)) == best


def test_cut_bounds_against_brute_force_with_parameter_free_layers_and_ties() -> None:
    # The oracle tries every cut: the stages' costs sorted from the largest are compared in order (the
    # busiest stage first, then the next), each stage holds a trainable layer, and the earliest cut wins a tie.
    def brute(costs: list[float], k: int, trainable: list[bool]) -> tuple[int, ...] | None:
        best = None
        for c in itertools.combinations(range(1, len(costs)), k - 1):
            bounds = (0, *c, len(costs))
            if all(any(trainable[a:b]) for a, b in itertools.pairwise(bounds)):
                key = sorted((sum(costs[a:b]) for a, b in itertools.pairwise(bounds)), reverse=True)
                if best is None or key < best[0]:
                    best = (key, bounds)
        return best and best[1]

    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        n = int(torch.randint(1, 9, (), generator=gen))
        costs = [float(c) for c in torch.tensor([1, 1, 2, 3, 5, 8])[torch.randint(0, 6, (n,), generator=gen)]]
        trainable = (torch.rand(n, generator=gen) < 0.7).tolist()
        for k in range(1, sum(trainable) + 1):
            assert cutting.cut_bounds(costs, k, trainable) == brute(costs, k, trainable), (costs, trainable, k)


def test_a_deep_model_cuts_at_once() -> None:
    # 240 layers into 8 stages: a search over every cut would try C(239, 7) ~ 10^12 of them.
    assert cutting.cut_bounds([1.0] * 240, 8) == tuple(range(0, 241, 30))


def test_a_parameter_free_layer_is_never_a_stage_of_its_own() -> None:
    # Flatten costs nothing and the first Linear most: balancing the busiest stage alone used to leave Flatten
    # as stage 0 (a "stage" with nothing to train, its boundary the input itself), and a lone BatchNorm next.
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.BatchNorm1d(300), nn.SiLU(),
                          nn.Linear(300, 300), nn.BatchNorm1d(300), nn.SiLU(),
                          nn.Linear(300, 300), nn.BatchNorm1d(300), nn.SiLU(), nn.Linear(300, 10))
    stages = sg.cut(model, 4, sample=torch.zeros(2, 1, 28, 28))
    assert all(any(True for _ in s.parameters()) for s in stages)
    assert isinstance(stages[0], nn.Sequential) and [type(m) for m in stages[0]] == [nn.Flatten, nn.Linear]
    # after the busiest stage (the first Linear), the other three share the rest evenly: a Linear(300, 300) each
    assert [sum(isinstance(m, nn.Linear) and m.in_features == 300 for m in s) for s in stages[1:]] == [1, 1, 1]
    with pytest.raises(ConfigError, match="only 4 of the 8 layers have parameters.*at most 4"):
        sg.cut(nn.Sequential(*[m for m in model if not isinstance(m, nn.BatchNorm1d)]), 5,
               sample=torch.zeros(2, 1, 28, 28))


def test_a_stage_without_parameters_is_refused_with_what_to_do() -> None:
    with pytest.raises(ConfigError, match=r"stage 1 \(Flatten\) has no parameters.*join it to a neighbouring stage"):
        sg.DNI.build([nn.Flatten(), nn.Linear(4, 3)], sample=torch.zeros(2, 2, 2), conditioned=True, num_classes=3)
    with pytest.raises(ConfigError, match="stage 2 \\(ReLU\\) has no parameters"):
        sg.Backprop([nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)])


def test_count_cut_is_even() -> None:
    assert cutting.even_bounds(8, 3) == (0, 3, 6, 8)
    assert cutting.even_bounds(4, 4) == (0, 1, 2, 3, 4)
    assert [len(s) if isinstance(s, nn.Sequential) else 1 for s in sg.cut(_model(), 3, balance="count")] == [3, 3, 2]


def test_costs_of_convolutions_and_sequences() -> None:
    # Conv1d: weight numel x output positions; a Linear on [B, T, D]: weight numel x T.
    conv = nn.Conv1d(4, 8, 3, padding=1)  # 8*4*3 = 96 weights, 20 positions
    lin = nn.Linear(8, 5)  # applied to [B, 20, 8] after a transpose
    layers = [conv, nn.Sequential(_Transpose(), lin)]
    assert cutting.layer_costs(layers, (4, 20)) == [96 * 20, 40 * 20]


class _Transpose(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


@pytest.mark.parametrize("call,message", [
    (lambda m: sg.cut(m, 0, balance="count"), "cannot cut 8 layers into 0 stages; num_stages must be between 1 and 8"),
    (lambda m: sg.cut(m, 9, sample=torch.zeros(2, 10)), "cannot cut 8 layers into 9 stages"),
    (lambda m: sg.cut(m, 2), "pass sample=x"),
    (lambda m: sg.cut(m, 2, balance="flops"), "balance must be one of cost, count"),
    (lambda m: sg.cut([], 1), "cannot cut an empty model"),
    (lambda m: sg.cut([nn.Linear(2, 2), "relu"], 1), "must be an nn.Module; got str"),
    (lambda m: sg.cut(_Transpose(), 1), "cannot see inside _Transpose: its order of layers is in its forward()"),
])
def test_errors_speak_of_arguments(call, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        call(_model())
    assert message in str(e.value) and "--stages" not in str(e.value)


def test_cost_measurement_leaves_batchnorm_statistics_alone() -> None:
    model = _model()
    before = model[3].running_mean.clone()
    sg.cut(model, 2, sample=torch.randn(4, 10) * 10)
    assert torch.equal(model[3].running_mean, before) and model.training


def test_cut_stages_train_with_dni() -> None:
    # The public path end to end: a user's nn.Sequential, cut by cost, trained decoupled.
    model = _model()
    x, y = torch.randn(64, 10), torch.randint(0, 10, (64,))
    dni = sg.DNI.build(sg.cut(model, 3, sample=x[:2]), sample=x[:2], conditioned=True, num_classes=10)
    stats = dni.step(x, y)
    assert len(stats["synth_loss"]) == 2


def test_a_layer_used_twice_is_never_split_across_stages_by_cut_and_refused_by_every_rule() -> None:
    shared = nn.Linear(8, 8)  # used twice: tied weights, which decoupled stages would step twice or copy apart
    layers = [nn.Linear(4, 8), nn.ReLU(), shared, nn.ReLU(), shared, nn.Linear(8, 3)]
    message = r"stages 1 and 2 share a parameter \('2.weight' in stage 1, '\d.weight' in stage 2\).*untie"
    with pytest.raises(ConfigError, match=message):
        sg.cut(nn.Sequential(*layers), 2, balance="count")
    stages = [nn.Sequential(*layers[:4]), nn.Sequential(*layers[4:])]
    x = torch.randn(2, 4)
    for build in (lambda: sg.Backprop(stages), lambda: sg.DNI.build(stages, sample=x),
                  lambda: sg.DGL.build(stages, sample=x, num_classes=3)):
        with pytest.raises(ConfigError, match=message):
            build()
    for k in (2, 3):  # cut by cost, sg.cut never splits the two uses
        stages = sg.cut(nn.Sequential(*layers), k, sample=x)
        assert sum(any(m is shared for m in s.modules()) for s in stages) == 1
        assert torch.equal(sg.uncut(stages)(x), nn.Sequential(*layers)(x))
    with pytest.raises(ConfigError, match="cannot cut into 4 stages without splitting a layer that is used twice"):
        sg.cut(nn.Sequential(*layers), 4, sample=x)
