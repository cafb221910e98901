"""A user's own model and synthesizers, nothing from the registry: what the engine's tests decouple.

Module-level, so that they pickle into the pipeline's processes.
"""

from __future__ import annotations

import torch
from torch import nn

import synthgrad as sg

NUM_CLASSES = 3


def data(n: int = 512, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable: the class is how many of the first two features are positive."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


class Residual(nn.Module):
    """A pre-norm residual block: h + W2 relu(W1 LN(h))."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(torch.relu(self.fc1(self.norm(h))))


def stages(num_stages: int) -> list[nn.Module]:
    """The whole model cut into 2 or 3 stages: an embedding with BatchNorm, residual blocks, a head."""
    torch.manual_seed(10)
    embed = nn.Sequential(nn.Linear(20, 32), nn.BatchNorm1d(32), nn.ReLU())
    blocks = [Residual(32), Residual(32)]
    head = nn.Sequential(nn.LayerNorm(32), nn.Linear(32, NUM_CLASSES))
    if num_stages == 2:
        return [nn.Sequential(embed, blocks[0]), nn.Sequential(blocks[1], head)]
    return [embed, nn.Sequential(*blocks), head]


def stage2(k: int) -> nn.Module:
    return stages(2)[k]


def stage3(k: int) -> nn.Module:
    return stages(3)[k]


def frozen_first(k: int) -> nn.Module:
    """stage2 with the first stage's parameters frozen (requires_grad=False), as a pretrained backbone would be."""
    stage = stage2(k)
    if k == 0:
        stage.requires_grad_(False)
    return stage


def flatten_first(k: int) -> nn.Module:
    """A 2-stage cut whose first stage has nothing to train (a Flatten), then the whole model."""
    return nn.Flatten() if k == 0 else nn.Sequential(*stages(2))


def mixup_data(n: int = 512, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """data() mixed up (Zhang et al. 2018): x = a x_i + (1 - a) x_j with soft labels y [n, 3] mixed alike."""
    x, y = data(n, seed)
    g = torch.Generator().manual_seed(seed + 1)
    a = torch.rand(n, 1, generator=g)  # [n, 1] the mixing weights
    j = torch.randperm(n, generator=g)
    onehot = torch.eye(NUM_CLASSES)[y]  # [n, 3]
    return a * x + (1 - a) * x[j], a * onehot + (1 - a) * onehot[j]


def inplace_stages(inplace: bool = True) -> list[nn.Module]:
    """3 stages whose upper two begin with an nn.ReLU(inplace=...), as a model cut after a BatchNorm is."""
    torch.manual_seed(30)
    return [nn.Sequential(nn.Linear(20, 32), nn.BatchNorm1d(32)),
            nn.Sequential(nn.ReLU(inplace=inplace), nn.Linear(32, 32)),
            nn.Sequential(nn.ReLU(inplace=inplace), nn.Linear(32, NUM_CLASSES))]


def inplace_stage(k: int) -> nn.Module:
    return inplace_stages()[k]


def token_data(n: int = 512, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Token indices [n, 12] in 0..49 (int64), the class how many of the first two are below 25."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 50, (n, 12), generator=g)
    return x, (x[:, 0] < 25).long() + (x[:, 1] < 25).long()


class MeanToken(nn.Module):
    """[B, N, D] -> [B, D]: the mean over positions."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mean(1)


def token_stage(k: int) -> nn.Module:
    """A text classifier on token indices, cut into 2 stages: an nn.Embedding reads the int64 input."""
    torch.manual_seed(20)
    embed = nn.Sequential(nn.Embedding(50, 32), nn.Linear(32, 32), nn.GELU(), MeanToken(), nn.LayerNorm(32))
    return [embed, nn.Linear(32, NUM_CLASSES)][k]


class LowRankSynthesizer(nn.Module):
    """A custom synthesizer: h -> U V h (+ a per-class bias for cDNI), the last factor zero."""

    def __init__(self, dim: int, rank: int = 8, context_dim: int = 0):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.label = nn.Linear(context_dim, dim, bias=False) if context_dim else None

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        out = self.up(self.down(h))
        if self.label is not None:
            assert context is not None
            out = out + self.label(context)
        return out


class Interfaces:
    """The interface factory: (k, shape of h_k) -> BackwardInterface with a LowRankSynthesizer."""

    def __init__(self, conditioned: bool, trust: bool = False, local_loss: bool | None = None):
        self.conditioned, self.trust, self.local_loss = conditioned, trust, local_loss

    def __call__(self, k: int, shape: tuple[int, ...]) -> sg.BackwardInterface:
        torch.manual_seed(100 + k)
        synth = LowRankSynthesizer(shape[0], context_dim=NUM_CLASSES if self.conditioned else 0)
        return sg.BackwardInterface(synth, sg.adam(1e-3), trust=self.trust, local_loss=self.local_loss)


def forward_interface(k: int, input_shape: tuple[int, ...], shape: tuple[int, ...]) -> sg.ForwardInterface:
    torch.manual_seed(200 + k)
    return sg.ForwardInterface(sg.InputSynthesizer(input_shape, shape, 1, 16), sg.adam(1e-3))


def accuracy(net: nn.Module) -> float:
    x, y = data(256, seed=7)
    with torch.no_grad():
        return (net(x).argmax(1) == y).float().mean().item()


def loader(epoch: int) -> torch.utils.data.DataLoader:
    """A DataLoader factory (built in rank 0's process), 500 examples: the last batch holds 20."""
    x, y = data(500)
    g = torch.Generator().manual_seed(epoch)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True, generator=g)


class NaNSynthesizer(nn.Module):
    """A broken synthesizer: it predicts NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()))

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return torch.full_like(h, float("nan")) + self.p


def nan_interface(k: int, shape: tuple[int, ...]) -> sg.BackwardInterface:
    return sg.BackwardInterface(NaNSynthesizer(), sg.adam(1e-3))


def auxiliary(k: int, shape: tuple[int, ...]) -> sg.AuxiliaryClassifier:
    """DGL's auxiliary classifier above stage k: a linear head, seeded."""
    torch.manual_seed(300 + k)
    return sg.AuxiliaryClassifier(nn.Linear(shape[0], NUM_CLASSES), sg.adam(1e-3))
