"""Held-out models: architectures that no default was chosen on, to check the defaults on models we have not seen.

The library's zoo (synthgrad.zoo) is where issue 17's defaults were found; these four are only ever used
to check them afterwards (`python benchmarks/zoo.py --models mixer-mini gru-rows plain-cnn tanh-mlp`). Like
the zoo's, each is written the way a user would write it (PyTorch's default initialisation) as four blocks,
its natural cut points, and trains in a minute or two on one core:

- mixer-mini: an MLP-Mixer on 7x7 patches (token-mixing and channel-mixing MLPs, LayerNorm): [B, N, D] tokens;
- gru-rows: four GRU layers over image rows: [B, T, H] sequences;
- plain-cnn: a VGG-like CNN with no normalisation and no skips (ReLU, max-pooling): [B, C, H, W] feature maps;
- tanh-mlp: four tanh layers of 256 with dropout, no normalisation: [B, D] vectors.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from synthgrad.zoo import LastStep, MeanTokens, PatchEmbed, Rows


class MixerBlock(nn.Module):
    """x + TokenMLP(LN(x)) over positions, then + ChannelMLP(LN(x)) over features: [B, N, D] -> [B, N, D]."""

    def __init__(self, tokens: int, dim: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.tokens = nn.Sequential(nn.Linear(tokens, 2 * tokens), nn.GELU(), nn.Linear(2 * tokens, tokens))
        self.channels = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)  # mix along N, per feature
        return x + self.channels(self.norm2(x))


class GRULayer(nn.Module):
    """One GRU layer over a whole sequence: [B, T, in] -> its outputs [B, T, hidden]."""

    def __init__(self, inp: int, hidden: int):
        super().__init__()
        self.gru = nn.GRU(inp, hidden, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gru(x)[0]


def mixer_mini(input_shape: tuple[int, ...], num_classes: int, width: int = 32) -> list[nn.Module]:
    patch = 7 if input_shape[1] % 7 == 0 else 4
    tokens = (input_shape[1] // patch) * (input_shape[2] // patch)
    return [nn.Sequential(PatchEmbed(input_shape, patch, width), MixerBlock(tokens, width)),
            MixerBlock(tokens, width), MixerBlock(tokens, width),
            nn.Sequential(MixerBlock(tokens, width), nn.LayerNorm(width), MeanTokens(), nn.Linear(width, num_classes))]


def gru_rows(input_shape: tuple[int, ...], num_classes: int, width: int = 32) -> list[nn.Module]:
    c, _, w = input_shape
    return [nn.Sequential(Rows(), GRULayer(c * w, width)), GRULayer(width, width), GRULayer(width, width),
            nn.Sequential(GRULayer(width, width), LastStep(), nn.Linear(width, num_classes))]


def plain_cnn(input_shape: tuple[int, ...], num_classes: int, width: int = 16) -> list[nn.Module]:
    c = input_shape[0]

    def conv(cin: int, cout: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU())

    return [nn.Sequential(conv(c, width), nn.MaxPool2d(2)),  # [B, w, H/2, W/2]
            nn.Sequential(conv(width, 2 * width), nn.MaxPool2d(2)),  # [B, 2w, H/4, W/4]
            conv(2 * width, 2 * width),
            nn.Sequential(conv(2 * width, 2 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(2 * width, num_classes))]


def tanh_mlp(input_shape: tuple[int, ...], num_classes: int, width: int = 256) -> list[nn.Module]:
    def layer(inp: int) -> nn.Module:
        return nn.Sequential(nn.Linear(inp, width), nn.Tanh(), nn.Dropout(0.1))

    return [nn.Sequential(nn.Flatten(), layer(math.prod(input_shape))), layer(width), layer(width),
            nn.Sequential(layer(width), nn.Linear(width, num_classes))]


SPECS: dict[str, Callable[..., list[nn.Module]]] = {
    "mixer-mini": mixer_mini, "gru-rows": gru_rows, "plain-cnn": plain_cnn, "tanh-mlp": tanh_mlp,
}


def build_blocks(name: str, input_shape: tuple[int, ...], num_classes: int) -> list[nn.Module]:
    """The four blocks of held-out model `name` at its default width."""
    return SPECS[name](tuple(input_shape), num_classes)
