"""The model registry: every model is an ordered list of layers, grouped into stages.

A *layer* here is the finest place a model may be cut; a *stage* is a contiguous
group of layers (by default one layer per stage, as in the paper). Each entry
documents its default hyperparameters, which the CLI shows in ``synthgrad models``.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from synthgrad.errors import ConfigError


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: how to build its layers and the defaults it trains well with."""

    name: str
    description: str
    build: Callable[..., list[nn.Module]]  # (input_shape, num_classes, width) -> layers
    defaults: dict = field(default_factory=dict)  # lr, epochs, batch_size, synth_hidden, ...


def _mlp(input_shape: tuple[int, ...], num_classes: int, width: int = 256) -> list[nn.Module]:
    # The original reimplementation's MLP: 784-256-10 with ReLU.
    d = int(torch.tensor(input_shape).prod())
    return [nn.Sequential(nn.Flatten(), nn.Linear(d, width), nn.ReLU()), nn.Linear(width, num_classes)]


def _fcn(depth: int) -> Callable[..., list[nn.Module]]:
    def build(input_shape: tuple[int, ...], num_classes: int, width: int = 256) -> list[nn.Module]:
        # The paper's MNIST FCN: `depth` hidden layers of Linear + BatchNorm + ReLU, then a linear readout.
        d = int(torch.tensor(input_shape).prod())
        layers: list[nn.Module] = []
        for i in range(depth):
            block = [nn.Flatten()] if i == 0 else []
            block += [nn.Linear(d if i == 0 else width, width), nn.BatchNorm1d(width), nn.ReLU()]
            layers.append(nn.Sequential(*block))
        layers.append(nn.Linear(width, num_classes))
        return layers

    return build


def _conv_block(cin: int, cout: int, pool: bool) -> nn.Sequential:
    mods: list[nn.Module] = [nn.Conv2d(cin, cout, 5, padding=2), nn.BatchNorm2d(cout), nn.ReLU()]
    if pool:
        mods.append(nn.MaxPool2d(2))
    return nn.Sequential(*mods)


def _cnn(input_shape: tuple[int, ...], num_classes: int, width: int = 16) -> list[nn.Module]:
    # The original CNN: conv5x5(16)-BN-ReLU-pool, conv5x5(32)-BN-ReLU-pool, linear.
    c, h, w = input_shape
    return [_conv_block(c, width, True), _conv_block(width, 2 * width, True),
            nn.Sequential(nn.Flatten(), nn.Linear(2 * width * (h // 4) * (w // 4), num_classes))]


def _cnn_deep(input_shape: tuple[int, ...], num_classes: int, width: int = 64) -> list[nn.Module]:
    # Paper-style deeper CNN: three conv5x5(64)-BN-ReLU layers (pool after the last two), linear.
    c, h, w = input_shape
    return [_conv_block(c, width, False), _conv_block(width, width, True),
            _conv_block(width, width, True),
            nn.Sequential(nn.Flatten(), nn.Linear(width * (h // 4) * (w // 4), num_classes))]


_COMMON = {"epochs": 10, "batch_size": 128}
REGISTRY: dict[str, ModelSpec] = {
    "mlp": ModelSpec("mlp", "original MLP 784-256-10, ReLU", _mlp,
                     {**_COMMON, "lr": 1e-3, "width": 256}),
    "cnn": ModelSpec("cnn", "original CNN: 2x conv5x5 (16, 32) + BN + ReLU + pool, linear", _cnn,
                     {**_COMMON, "lr": 1e-3, "width": 16}),
    "cnn-deep": ModelSpec("cnn-deep", "paper-style CNN: 3x conv5x5(64) + BN + ReLU, linear",
                          _cnn_deep, {**_COMMON, "lr": 1e-3, "width": 64}),
}
FCN_PATTERN = re.compile(r"^fcn-(\d+)$")
FCN_DEFAULTS = {**_COMMON, "lr": 1e-3, "width": 256}


def model_names() -> list[str]:
    """Registered names; `fcn-N` stands for every N >= 1."""
    return ["mlp", "fcn-N", "cnn", "cnn-deep"]


def get_spec(name: str) -> ModelSpec:
    """Look a model up by name; `fcn-N` with any N >= 1."""
    if name in REGISTRY:
        return REGISTRY[name]
    m = FCN_PATTERN.match(name)
    if m and int(m.group(1)) >= 1:
        n = int(m.group(1))
        return ModelSpec(name, f"paper FCN: {n} hidden layers Linear(width)+BN+ReLU, linear", _fcn(n),
                         dict(FCN_DEFAULTS))
    raise ConfigError(f"unknown model {name!r}; choose one of: mlp, cnn, cnn-deep, fcn-N (N >= 1, e.g. fcn-3)")


def build_layers(name: str, input_shape: tuple[int, ...], num_classes: int,
                 width: int | None = None) -> list[nn.Module]:
    """Build a model's layers (the finest cut). Initialise under torch.manual_seed for reproducibility."""
    spec = get_spec(name)
    if len(input_shape) != 3 and name.startswith("cnn"):
        raise ConfigError(f"model {name} needs image inputs [C, H, W], got shape {input_shape}")
    return spec.build(input_shape, num_classes, width or spec.defaults["width"])


def layer_costs(layers: list[nn.Module], input_shape: tuple[int, ...]) -> list[float]:
    """Multiply-accumulates per example of each layer, measured by one dummy forward pass."""
    costs, x = [], torch.zeros(2, *input_shape)
    for layer in layers:
        total = 0.0
        handles = []

        def hook(mod: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
            nonlocal total
            if isinstance(mod, nn.Conv2d):
                total += mod.weight.numel() * out.shape[-1] * out.shape[-2]
            elif isinstance(mod, nn.Linear):
                total += mod.weight.numel()

        for mod in layer.modules():
            handles.append(mod.register_forward_hook(hook))
        was_training = layer.training
        layer.eval()
        with torch.no_grad():
            x = layer(x)
        layer.train(was_training)
        for h in handles:
            h.remove()
        costs.append(max(total, 1.0))
    return costs


def step_costs(layers: list[nn.Module], input_shape: tuple[int, ...]) -> list[float]:
    """Multiply-accumulates per example of each layer's training step (forward and backward)."""
    # A training step costs forward + backward = 3x the forward MACs (backward computes the gradient
    # of the input and of the weights), except the first layer, which needs no gradient of the network
    # input: 2x. Balancing forward MACs alone leaves the upper stage ~30% busier on an FCN.
    return [c * (2 if i == 0 else 3) for i, c in enumerate(layer_costs(layers, input_shape))]


def cut_bounds(costs: list[float], num_stages: int) -> tuple[int, ...]:
    """Where to cut layers of these step costs into `num_stages` contiguous stages, minimising the most
    expensive stage: (0, first layer of stage 2, ..., len(costs))."""
    if not 1 <= num_stages <= len(costs):
        raise ConfigError(f"cannot cut {len(costs)} layers into {num_stages} stages; "
                          f"use --stages between 1 and {len(costs)}")
    best_cuts, best_max = (0, len(costs)), float("inf")
    for cuts in itertools.combinations(range(1, len(costs)), num_stages - 1):
        bounds = (0, *cuts, len(costs))
        worst = max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds))
        if worst < best_max:
            best_cuts, best_max = bounds, worst
    return best_cuts


def partition(layers: list[nn.Module], num_stages: int, input_shape: tuple[int, ...]) -> list[nn.Module]:
    """Group layers into `num_stages` contiguous stages, minimising the most expensive stage's training step."""
    if num_stages == len(layers):
        return list(layers)  # one layer a stage: no costs to measure
    bounds = cut_bounds(step_costs(layers, input_shape), num_stages)  # refuses an impossible num_stages
    return [layers[a] if b - a == 1 else nn.Sequential(*layers[a:b])
            for a, b in itertools.pairwise(bounds)]


def build_stages(name: str, input_shape: tuple[int, ...], num_classes: int,
                 num_stages: int | None = None, width: int | None = None) -> list[nn.Module]:
    """A registered model as a list of stages (one per layer unless num_stages says otherwise)."""
    layers = build_layers(name, input_shape, num_classes, width)
    return partition(layers, num_stages or len(layers), input_shape)


def compose(stages: list[nn.Module]) -> nn.Sequential:
    """The plain network: the stages run one after the other (no synthesizers)."""
    return nn.Sequential(*stages)


from synthgrad import zoo  # noqa: E402  (user-like architectures beside the paper's; zoo imports nothing from here)

REGISTRY.update({name: ModelSpec(name, *entry) for name, entry in zoo.SPECS.items()})
