"""A zoo of small, user-like architectures (residual, normalised, attention, recurrent) as lists of blocks.

The paper's models (models.py) were tuned with synthetic gradients in mind; these are not. Each is
written the way a user would write it (PyTorch's default initialisation, standard blocks) and is
an ordered list of four *blocks*, its natural cut points: `group_blocks` makes 2 or 4 stages of
them. Every builder takes (input_shape, num_classes, width) like the builders in models.py and is
sized so that 10 epochs of MNIST backprop take a minute or two on one CPU core.

Boundary activations: [B, D] (resmlp), [B, C, H, W] (resnet-mini), [B, N, D] tokens (vit-mini)
and [B, T, H] sequences (lstm-rows).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import nn


class PreNormResidual(nn.Module):
    """x + MLP(LayerNorm(x)): a pre-norm residual MLP block on [B, D] (or [B, N, D])."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class BasicBlock(nn.Module):
    """ResNet's basic block: relu(BN(conv3x3(relu(BN(conv3x3(x))))) + shortcut(x)), [B, C, H, W]."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:  # projection shortcut: 1x1 conv + BN
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class PatchEmbed(nn.Module):
    """Images [B, C, H, W] -> tokens [B, N, D]: non-overlapping patches, a linear map, learned positions."""

    def __init__(self, input_shape: tuple[int, ...], patch: int, dim: int):
        super().__init__()
        c, h, w = input_shape
        self.proj = nn.Conv2d(c, dim, patch, patch)  # a linear map of each patch
        self.pos = nn.Parameter(torch.randn(1, (h // patch) * (w // patch), dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2) + self.pos  # [B, D, H', W'] -> [B, N, D]


class MeanTokens(nn.Module):
    """[B, N, D] -> [B, D]: the mean over tokens (positions)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1)


class Rows(nn.Module):
    """Images [B, C, H, W] -> a sequence of rows [B, H, C * W]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return x.permute(0, 2, 1, 3).reshape(b, h, c * w)


class LSTMLayer(nn.Module):
    """One LSTM layer over a whole sequence: [B, T, in] -> its outputs [B, T, hidden] (state dropped)."""

    def __init__(self, inp: int, hidden: int):
        super().__init__()
        self.lstm = nn.LSTM(inp, hidden, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(x)[0]


class LastStep(nn.Module):
    """[B, T, H] -> [B, H]: the output at the last time step."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, -1]


def _flat_dim(input_shape: tuple[int, ...]) -> int:
    return int(torch.tensor(input_shape).prod())


def resmlp(input_shape: tuple[int, ...], num_classes: int, width: int = 128) -> list[nn.Module]:
    """Pre-norm residual MLP: a linear embedding, four residual blocks (MLP ratio 4), LayerNorm, readout."""
    blocks = [PreNormResidual(width, 4 * width) for _ in range(4)]
    return [nn.Sequential(nn.Flatten(), nn.Linear(_flat_dim(input_shape), width), blocks[0]), blocks[1], blocks[2],
            nn.Sequential(blocks[3], nn.LayerNorm(width), nn.Linear(width, num_classes))]


def resnet_mini(input_shape: tuple[int, ...], num_classes: int, width: int = 8) -> list[nn.Module]:
    """ResNet-style CNN: a strided 3x3 stem, four basic blocks (two of them downsampling), pool, readout."""
    c = input_shape[0]
    stem = nn.Sequential(nn.Conv2d(c, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
    return [nn.Sequential(stem, BasicBlock(width, width)),  # [B, w, H/2, W/2]
            BasicBlock(width, 2 * width, 2),  # [B, 2w, H/4, W/4]
            BasicBlock(2 * width, 2 * width),
            nn.Sequential(BasicBlock(2 * width, 4 * width, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4 * width, num_classes))]


def vit_mini(input_shape: tuple[int, ...], num_classes: int, width: int = 32) -> list[nn.Module]:
    """A small ViT: 7x7 patches, four pre-norm transformer blocks (4 heads, MLP ratio 2), mean-pooled tokens."""
    def layer() -> nn.Module:
        return nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, activation="gelu", batch_first=True,
                                          norm_first=True)

    patch = 7 if input_shape[1] % 7 == 0 and input_shape[2] % 7 == 0 else 4
    return [nn.Sequential(PatchEmbed(input_shape, patch, width), layer()), layer(), layer(),
            nn.Sequential(layer(), nn.LayerNorm(width), MeanTokens(), nn.Linear(width, num_classes))]


def lstm_rows(input_shape: tuple[int, ...], num_classes: int, width: int = 32) -> list[nn.Module]:
    """A 4-layer LSTM sequence classifier reading the image row by row; the readout sees the last output."""
    c, _, w = input_shape
    return [nn.Sequential(Rows(), LSTMLayer(c * w, width)), LSTMLayer(width, width), LSTMLayer(width, width),
            nn.Sequential(LSTMLayer(width, width), LastStep(), nn.Linear(width, num_classes))]


def group_blocks(blocks: list[nn.Module], num_stages: int) -> list[nn.Module]:
    """Group blocks into `num_stages` contiguous stages of (nearly) equal block counts, lower stages smaller."""
    n = len(blocks)
    if not 1 <= num_stages <= n:
        raise ValueError(f"cannot group {n} blocks into {num_stages} stages; use 1..{n}")
    bounds = [round(i * n / num_stages) for i in range(num_stages + 1)]
    return [blocks[a] if b - a == 1 else nn.Sequential(*blocks[a:b]) for a, b in itertools.pairwise(bounds)]


Builder = Callable[..., list[nn.Module]]
_COMMON = {"epochs": 10, "batch_size": 128, "lr": 1e-3}
# name -> (description, builder, defaults): models.py wraps these into its registry's ModelSpecs.
SPECS: dict[str, tuple[str, Builder, dict]] = {
    "resmlp": ("zoo: pre-norm residual MLP, 4 blocks (LayerNorm, GELU)", resmlp, {**_COMMON, "width": 128}),
    "resnet-mini": ("zoo: ResNet-style CNN, stem + 4 basic blocks (BatchNorm, skips)", resnet_mini,
                    {**_COMMON, "width": 8}),
    "vit-mini": ("zoo: ViT on 7x7 patches, 4 pre-norm transformer blocks (LayerNorm)", vit_mini,
                 {**_COMMON, "width": 32}),
    "lstm-rows": ("zoo: 4-layer LSTM over image rows, readout on the last step", lstm_rows,
                  {**_COMMON, "width": 32}),
}
