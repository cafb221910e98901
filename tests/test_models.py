"""The model registry and the partition of layers into stages."""

from __future__ import annotations

import pytest
import torch

from synthgrad import models
from synthgrad.errors import ConfigError


@pytest.mark.parametrize("name,n_stages", [("mlp", 2), ("fcn-1", 2), ("fcn-3", 4), ("fcn-6", 7), ("cnn", 3),
                                          ("cnn-deep", 4), ("cifar-cnn", 4)])
def test_registry_builds_stages_that_compose_to_logits(name: str, n_stages: int) -> None:
    stages = models.build_stages(name, (1, 28, 28), 10)
    assert len(stages) == n_stages
    out = models.compose(stages)(torch.randn(4, 1, 28, 28))
    assert out.shape == (4, 10)


def test_original_architectures() -> None:
    mlp = models.build_stages("mlp", (1, 28, 28), 10)
    assert [m.weight.shape for m in models.compose(mlp).modules() if isinstance(m, torch.nn.Linear)] == [
        (256, 784), (10, 256)]
    cnn = models.build_stages("cnn", (1, 28, 28), 10)
    convs = [m for m in models.compose(cnn).modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(16, (5, 5)), (32, (5, 5))]


def test_paper_cifar_cnn() -> None:
    # Jaderberg et al. 2017, CIFAR-10: three 5x5 convolutions of 128 channels with BN, ReLU and a 3x3 max-pool of
    # stride 2 after each (32 -> 16 -> 8 -> 4), then a linear readout.
    net = models.compose(models.build_stages("cifar-cnn", (3, 32, 32), 10))
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    pools = [m for m in net.modules() if isinstance(m, torch.nn.MaxPool2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (3, 128, (5, 5)), (128, 128, (5, 5)), (128, 128, (5, 5))]
    assert [(p.kernel_size, p.stride) for p in pools] == [(3, 2)] * 3
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 3
    linear = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [m.weight.shape for m in linear] == [(10, 128 * 4 * 4)]
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name,shape", [("mlp", (3, 32, 32)), ("fcn-3", (1, 9, 9)), ("cnn", (3, 32, 32)),
                                        ("cnn-deep", (2, 16, 12)), ("cifar-cnn", (1, 28, 28))])
def test_every_model_takes_its_input_shape_and_classes(name: str, shape: tuple) -> None:
    assert models.check_input(name, shape, 7) == len(models.build_layers(name, shape, 7))
    assert models.compose(models.build_stages(name, shape, 7))(torch.randn(2, *shape)).shape == (2, 7)


def test_too_small_an_image_is_refused_with_the_model_named() -> None:
    with pytest.raises(ConfigError, match=r"model cnn cannot take inputs of shape \[1, 2, 2\]"):
        models.check_input("cnn", (1, 2, 2), 10)


@pytest.mark.parametrize("name", ["fcn-0", "fcn-x", "resnet", ""])
def test_unknown_model_lists_the_choices(name: str) -> None:
    with pytest.raises(ConfigError, match="choose one of"):
        models.get_spec(name)


def test_partition_balances_cost_and_keeps_order() -> None:
    layers = models.build_layers("fcn-4", (1, 28, 28), 10, width=1024)
    stages = models.partition(layers, 2, (1, 28, 28))
    assert len(stages) == 2
    costs = models.layer_costs(layers, (1, 28, 28))
    # 784*1024 + 1024^2 | 1024^2 + 1024^2 + 1024*10: the balanced cut is after layer 2.
    assert len(stages[0]) == 2 and sum(costs[:2]) <= sum(costs)
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(models.compose(stages).eval()(x), models.compose(layers).eval()(x))


def test_cut_bounds_minimise_the_busiest_stage() -> None:
    # Oracle: every cut of [1, 5, 1, 1, 1] into 2, written out; after layer 2 the busier stage holds 6.
    assert models.cut_bounds([1, 5, 1, 1, 1], 2) == (0, 2, 5)
    assert models.cut_bounds([4, 4, 4], 3) == (0, 1, 2, 3)
    assert models.cut_bounds([3, 1], 1) == (0, 2)
    with pytest.raises(ConfigError, match="cannot cut 2 layers into 3 stages"):
        models.cut_bounds([1, 1], 3)


def test_step_costs_charge_the_first_layer_no_input_gradient() -> None:
    layers = models.build_layers("fcn-4", (1, 28, 28), 10, width=1024)
    forward = models.layer_costs(layers, (1, 28, 28))
    assert models.step_costs(layers, (1, 28, 28)) == [2 * forward[0]] + [3 * c for c in forward[1:]]


def test_more_stages_than_layers_is_refused() -> None:
    with pytest.raises(ConfigError, match="cannot cut 2 layers into 3 stages"):
        models.build_stages("mlp", (1, 28, 28), 10, num_stages=3)


def test_check_input_leaves_the_random_stream_alone() -> None:
    torch.manual_seed(3)
    want = torch.rand(3)
    torch.manual_seed(3)
    models.check_input("fcn-2", (1, 28, 28), 10, width=8)
    assert torch.equal(torch.rand(3), want)


def test_a_models_own_method_defaults_come_before_the_methods_and_flags_win() -> None:
    from synthgrad.config import TrainConfig

    cnn = TrainConfig(model="cnn", method="dni").resolve()
    assert (cnn.synth_hidden, cnn.lr) == (0, 1e-3)  # cnn's DNI: linear synthesizer, lr 1e-3 (registry)
    mlp = TrainConfig(model="mlp", method="dni").resolve()
    assert (mlp.synth_hidden, mlp.lr) == (2, 3e-4)  # every other model: the method's defaults
    flagged = TrainConfig(model="cnn", method="dni", synth_hidden=2, lr=3e-4).resolve()
    assert (flagged.synth_hidden, flagged.lr) == (2, 3e-4)
    assert TrainConfig(model="cnn", method="cdni").resolve().synth_hidden == 0
    paper = TrainConfig(model="cnn", method="dni", preset="paper").resolve()
    assert paper.synth_hidden == 2  # the preset is the paper's synthesizer, whatever the model
