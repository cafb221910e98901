"""Cutting a model into stages: by count, or balanced by the measured cost of a training step.

A *layer* is the finest place a model may be cut; a *stage* is a contiguous group of
layers. Library code: it takes plain modules and tensors, and its errors speak of arguments.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import torch
from torch import nn

from synthgrad.errors import ConfigError
from synthgrad.stage import check_unshared

BALANCES = ("cost", "count")


def _sample_batch(layers: Sequence[nn.Module], sample: torch.Tensor | tuple[int, ...]) -> torch.Tensor:
    """A batch to measure with: `sample` itself, or a zero batch of 2 examples of shape `sample`."""
    if isinstance(sample, torch.Tensor):
        return sample
    param = next((p for layer in layers for p in layer.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    return torch.zeros(2, *sample, device=device)  # 2: BatchNorm in training mode needs two examples


def layer_costs(layers: Sequence[nn.Module], sample: torch.Tensor | tuple[int, ...]) -> list[float]:
    """Multiply-accumulates per example of each layer's forward pass, measured by one forward pass.

    `sample` is an input batch, or the shape of one example (a zero batch is used). Linear and
    convolution layers are counted (the rest is cheap next to them); a layer without either counts 1.
    """
    x = _sample_batch(layers, sample)
    costs = []
    for layer in layers:
        total = 0.0

        def hook(mod: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
            nonlocal total
            if isinstance(mod, nn.modules.conv._ConvNd):
                total += mod.weight.numel() * math.prod(out.shape[2:])  # per output position
            elif isinstance(mod, nn.Linear):
                total += mod.weight.numel() * math.prod(out.shape[1:-1])  # per position of [B, ..., D]

        handles = [mod.register_forward_hook(hook) for mod in layer.modules()]
        was_training = layer.training
        layer.eval()  # no BatchNorm statistics updated by a measurement
        try:
            with torch.no_grad():
                x = layer(x)
        finally:
            layer.train(was_training)
            for h in handles:
                h.remove()
        costs.append(max(total, 1.0))
    return costs


def step_costs(layers: Sequence[nn.Module], sample: torch.Tensor | tuple[int, ...]) -> list[float]:
    """Multiply-accumulates per example of each layer's training step (forward and backward)."""
    # A training step costs forward + backward = 3x the forward MACs (backward computes the gradient
    # of the input and of the weights), except the first layer, which needs no gradient of the network
    # input: 2x. Balancing forward MACs alone leaves the upper stage ~30% busier on an FCN.
    return [c * (2 if i == 0 else 3) for i, c in enumerate(layer_costs(layers, sample))]


def _check_count(num_layers: int, num_stages: int) -> None:
    if not 1 <= num_stages <= num_layers:
        raise ConfigError(f"cannot cut {num_layers} layers into {num_stages} stages; "
                          f"num_stages must be between 1 and {num_layers}")


def cut_bounds(costs: Sequence[float], num_stages: int, trainable: Sequence[bool] | None = None,
               joined: Sequence[int] = ()) -> tuple[int, ...]:
    """Where to cut layers of these costs into `num_stages` contiguous stages: (0, first layer of stage 2,
    ..., len(costs)).

    The cut minimises the most expensive stage, then the next most expensive, and so on (the stages'
    costs sorted from the largest, compared in order): among cuts with the same busiest stage, the rest
    are as even as they can be. Remaining ties go to the earliest cut. trainable: which layers hold
    parameters; when given, every stage holds at least one of them (a stage with nothing to train has
    no use for a synthetic gradient), or ConfigError when there are fewer of them than stages. joined: bounds
    never cut at (j: between layers j - 1 and j), where one layer is used on both sides (`shared_bounds`).
    """
    _check_count(len(costs), num_stages)
    n = len(costs)
    can = list(trainable) if trainable is not None else [True] * n
    if len(can) != n:
        raise ValueError(f"trainable has {len(can)} entries for {n} layers")
    if sum(can) < num_stages:
        raise ConfigError(f"only {sum(can)} of the {n} layers have parameters, too few for {num_stages} stages "
                          f"(each stage needs something to train): cut into at most {max(sum(can), 1)}")
    no_cut = set(joined)
    prefix = [0.0, *itertools.accumulate(costs)]
    owns = [0, *itertools.accumulate(int(c) for c in can)]  # owns[j] - owns[i]: trainable layers in [i, j)

    # best[(i, k)]: the best way to cut layers i.. into k stages, as (costs sorted from the largest,
    # first cut). Inserting one more stage's cost into two sorted cost lists keeps their order, so the
    # best cut of i.. starts with some stage [i, j) followed by the best cut of j..: a dynamic programme
    # of O(n^2 K) steps instead of the C(n - 1, K - 1) cuts a search would try.
    @functools.cache
    def best(i: int, k: int) -> tuple[tuple[float, ...], int] | None:
        if k == 1:
            return ((prefix[n] - prefix[i],), n) if owns[n] > owns[i] else None
        found = None
        for j in range(i + 1, n - k + 2):  # stage [i, j), then k - 1 stages over j..
            rest = best(j, k - 1)
            if rest is None or owns[j] == owns[i] or j in no_cut:
                continue
            key = tuple(sorted((prefix[j] - prefix[i], *rest[0]), reverse=True))
            if found is None or key < found[0]:  # strict: the earliest cut keeps a tie
                found = (key, j)
        return found

    bounds, i = [0], 0
    for k in range(num_stages, 0, -1):
        step = best(i, k)
        if step is None:  # enough trainable layers, but the layers used twice leave too few places to cut
            raise ConfigError(f"cannot cut into {num_stages} stages without splitting a layer that is used twice "
                              "(tied weights) across stages: cut into fewer stages, or untie the weights")
        i = step[1]
        bounds.append(i)
    return tuple(bounds)


def even_bounds(num_layers: int, num_stages: int) -> tuple[int, ...]:
    """Cut `num_layers` layers into `num_stages` stages of as even a count as possible (the first
    stages take one more layer when it does not divide)."""
    _check_count(num_layers, num_stages)
    size, extra = divmod(num_layers, num_stages)
    bounds = [0]
    for k in range(num_stages):
        bounds.append(bounds[-1] + size + (1 if k < extra else 0))
    return tuple(bounds)


class Group(nn.Sequential):
    """Consecutive layers that a cut put into one stage (an nn.Sequential that `uncut` takes apart again)."""


def group(layers: Sequence[nn.Module], bounds: Sequence[int]) -> list[nn.Module]:
    """The stages between consecutive bounds: a lone layer as it is, several as a Group."""
    return [layers[a] if b - a == 1 else Group(*layers[a:b]) for a, b in itertools.pairwise(bounds)]


def uncut(stages: Sequence[nn.Module]) -> nn.Sequential:
    """The layers of `stages` as one nn.Sequential, whatever the cut: the Groups a cut made are taken apart.

    Its state_dict's keys name layers, not stages ("3.weight", not "1.0.weight"), so a network trained in
    2 stages loads into the same model uncut, or cut into 4. The modules are shared, not copied."""
    layers: list[nn.Module] = []
    for stage in stages:
        layers.extend(stage if isinstance(stage, Group) else [stage])
    return nn.Sequential(*layers)


def shared_bounds(layers: Sequence[nn.Module]) -> list[int]:
    """The bounds that would put one parameter into two stages: j for every cut between layers j - 1 and j
    that lies between two layers holding the same parameter (a module used twice, tied weights)."""
    first: dict[int, int] = {}
    joined: set[int] = set()
    for j, layer in enumerate(layers):
        for p in layer.parameters():
            i = first.setdefault(id(p), j)
            joined.update(range(i + 1, j + 1))
    return sorted(joined)


def partition(layers: Sequence[nn.Module], num_stages: int,
              sample: torch.Tensor | tuple[int, ...]) -> list[nn.Module]:
    """Group layers into `num_stages` contiguous stages, minimising the most expensive stage's training step."""
    trainable = [any(True for _ in layer.parameters()) for layer in layers]
    if num_stages == len(layers) and all(trainable):
        return list(layers)  # one layer a stage: no costs to measure
    bounds = cut_bounds(step_costs(layers, sample), num_stages, trainable, shared_bounds(layers))
    return group(layers, bounds)  # cut_bounds refuses impossible counts


def cut(model: nn.Sequential | Sequence[nn.Module], num_stages: int, sample: torch.Tensor | None = None,
        balance: str = "cost") -> list[nn.Module]:
    """Cut a model into `num_stages` stages that compose to exactly the same computation.

    model: an ``nn.Sequential`` or a list of layers; the cut falls between its top-level entries
        (wrap layers in an ``nn.Sequential`` to keep them together).
    num_stages: how many stages, between 1 and the number of layers.
    sample: an input batch (a few examples suffice); needed by ``balance="cost"``.
    balance: ``"cost"`` minimises the most expensive stage's training step, in multiply-accumulates
        measured on `sample`, then evens out the others, and keeps a layer with parameters in every
        stage (a Flatten or an activation joins a neighbour); ``"count"`` gives every stage the same
        number of layers (within one).

    The stages share their modules (and so their parameters) with `model`: nothing is copied.
    Pass the result to ``DNI.build`` or ``Backprop``.
    """
    if isinstance(model, nn.Module) and not isinstance(model, nn.Sequential | nn.ModuleList):
        raise ConfigError(f"sg.cut cannot see inside {type(model).__name__}: its order of layers is in its forward(). "
                          "Give an nn.Sequential or a list of the layers in the order they run (for example "
                          "[model.features, nn.Flatten(), model.head]), or write the stages yourself: any list of "
                          "nn.Modules that chain")
    layers = list(model)
    if not layers:
        raise ConfigError("cannot cut an empty model: give an nn.Sequential or a list of at least one layer")
    if not all(isinstance(layer, nn.Module) for layer in layers):
        raise ConfigError("every layer of the model must be an nn.Module; got "
                          + ", ".join(sorted({type(x).__name__ for x in layers if not isinstance(x, nn.Module)})))
    if balance not in BALANCES:
        raise ConfigError(f"balance must be one of {', '.join(BALANCES)}, got {balance!r}")
    if balance == "count":
        stages = group(layers, even_bounds(len(layers), num_stages))
    elif sample is not None:
        stages = partition(layers, num_stages, sample)
    else:
        _check_count(len(layers), num_stages)
        if num_stages != len(layers):
            raise ConfigError("balance='cost' measures each layer on an input: pass sample=x[:2] (a small batch), "
                              "or use balance='count'")
        stages = layers
    check_unshared(stages)  # a layer used twice must not end up in two stages
    return stages
