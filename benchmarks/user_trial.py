"""Unseen user models through the public API: `sg.cut` on a plain nn.Sequential, then `sg.DNI.build` (cDNI).

Three architectures that no default was chosen on and that are in neither the zoo nor benchmarks/holdout.py,
written as a user would write them (PyTorch's default initialisation, one flat nn.Sequential) and cut by
`sg.cut(model, K, sample=...)` with its default cost balance:

- bn-mlp: Linear + BatchNorm1d + SiLU (+ dropout) x 4 on the flattened image (vectors [B, 300]);
- convnext: a 4x4 patchify convolution, then 4 ConvNeXt-style blocks (7x7 depthwise convolution, GroupNorm(1),
  a pointwise MLP with GELU, residual), global pooling, LayerNorm, a Linear (feature maps [B, 48, 7, 7]);
- cls-transformer: 7x7 patches, a class token and learned positions, 4 pre-norm nn.TransformerEncoderLayer
  (dropout 0.1), read out from the class token (tokens [B, 17, 48]).

Each trains on MNIST (`sg.load_dataset`) from the same initialisation, batches of 128, Adam 1e-3, a cosine
schedule: backprop; the lower stages frozen at initialisation (the floor: only the last stage trains);
cDNI at `DNI.build`'s defaults; the same with `synth_trust=True`; and the same with `synth_local=False` (without the
local loss that cDNI mixes in by default since the seventh session). On request (--methods): cDNI with its lower
stages at Adam 2e-3 (`DNI.build(lower_lr=2e-3)`), and backprop at 2e-3, which tells whether a gain of the first is
one that backprop gets from the higher rate too; DNI (no label) at `DNI.build`'s defaults, or with every synthesizer
of 2 hidden layers x 64 (the paper's size on feature maps) or 1 x 16 (`synth_hidden`, `synth_width`).

    python benchmarks/user_trial.py --epochs 2      # writes benchmarks/results/user-trial.md (about 25 min a seed)
    python benchmarks/user_trial.py --methods cdni  # one method (the runs of the others do not change with cDNI's)
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from multiprocessing import get_context
from pathlib import Path

import torch
from torch import nn

import synthgrad as sg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from custom_synth import fit  # noqa: E402  (a sibling benchmark: the same training loop)

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
METHODS = ("backprop", "frozen", "cdni", "cdni, trust", "cdni, no local loss", "cdni, lower lr 2e-3",
           "backprop, lr 2e-3", "dni", "dni, synth 2x64", "dni, synth 1x16")


class Patches(nn.Module):
    """[B, 1, 28, 28] -> 16 tokens of 7x7 pixels embedded to `dim`: [B, 16, dim]."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(1, dim, 7, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).flatten(2).transpose(1, 2)


class ClassToken(nn.Module):
    """Prepends a learned class token and adds learned positions: [B, N, dim] -> [B, N + 1, dim]."""

    def __init__(self, dim: int, tokens: int):
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.token.expand(len(x), -1, -1), x], 1) + self.pos


class FirstToken(nn.Module):
    """[B, N, dim] -> the class token [B, dim]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


class ConvNeXtBlock(nn.Module):
    """x + PW(GroupNorm(DW(x))): a 7x7 depthwise convolution, then a 4x pointwise MLP with GELU: [B, C, H, W]."""

    def __init__(self, channels: int):
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.GroupNorm(1, channels)
        self.pw = nn.Sequential(nn.Conv2d(channels, 4 * channels, 1), nn.GELU(), nn.Conv2d(4 * channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pw(self.norm(self.dw(x)))


def build(name: str, num_classes: int) -> nn.Sequential:
    if name == "bn-mlp":
        layers: list[nn.Module] = [nn.Flatten()]
        for i in range(4):
            layers += [nn.Linear(784 if i == 0 else 300, 300), nn.BatchNorm1d(300), nn.SiLU()]
            layers += [nn.Dropout(0.2)] if i < 2 else []
        return nn.Sequential(*layers, nn.Linear(300, num_classes))
    if name == "convnext":
        return nn.Sequential(nn.Conv2d(1, 48, 4, 4), nn.GroupNorm(1, 48), *[ConvNeXtBlock(48) for _ in range(4)],
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(48), nn.Linear(48, num_classes))
    if name == "cls-transformer":
        blocks = [nn.TransformerEncoderLayer(48, 4, 96, dropout=0.1, batch_first=True, norm_first=True)
                  for _ in range(4)]
        return nn.Sequential(Patches(48), ClassToken(48, 16), *blocks, nn.LayerNorm(48), FirstToken(),
                             nn.Linear(48, num_classes))
    raise ValueError(f"unknown model {name!r}")


MODELS = ("bn-mlp", "convnext", "cls-transformer")


def train(name: str, method: str, ds: sg.Dataset | None, stages_n: int, epochs: int, seed: int) -> float:
    """Test accuracy (%) of `name` cut into `stages_n` stages and trained by `method`; ds None: load MNIST."""
    if ds is None:  # a worker process (--jobs 2): one thread, its own copy of the data
        torch.set_num_threads(1)
        ds = sg.load_dataset("mnist")
    torch.manual_seed(seed)
    stages = sg.cut(build(name, ds.num_classes), stages_n, sample=ds.train_x[:2])
    schedule = sg.cosine_schedule(epochs * (len(ds.train_x) // 128))
    if method.startswith("backprop") or method == "frozen":
        if method == "frozen":
            for p in (p for s in stages[:-1] for p in s.parameters()):
                p.requires_grad_(False)
        rule: sg.StepRule = sg.Backprop(stages, lr=2e-3 if method == "backprop, lr 2e-3" else 1e-3,
                                        schedule=schedule)
    elif method.startswith("dni"):  # DNI's default synthesizers, or these hidden layers x width for every one
        size = {"dni, synth 2x64": (2, 64), "dni, synth 1x16": (1, 16)}.get(method, (None, None))
        rule = sg.DNI.build(stages, sample=ds.train_x[:2], synth_hidden=size[0], synth_width=size[1],
                            schedule=schedule)
    else:
        rule = sg.DNI.build(stages, sample=ds.train_x[:2], conditioned=True, num_classes=ds.num_classes,
                            synth_trust=method == "cdni, trust", synth_local=False if "no local" in method else None,
                            lower_lr=2e-3 if method == "cdni, lower lr 2e-3" else None, schedule=schedule)
    return fit(rule, ds, epochs, seed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", default="user-trial", help="report name in benchmarks/results")
    p.add_argument("--jobs", type=int, default=1, choices=[1, 2], help="runs at a time, one thread each")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS)[:4], metavar="METHOD",
                   help=f"among {', '.join(map(repr, METHODS))}; default: the first four")
    a = p.parse_args()
    torch.set_num_threads(1)
    # backprop trains the same network through the same steps whatever the cut: once per model, at the first K
    methods = [m for m in METHODS if m in a.methods]
    cells = [(name, m, k, s) for name in a.models for k in a.stages for m in methods for s in a.seeds
             if not m.startswith("backprop") or k == a.stages[0]]
    if a.jobs == 1:
        ds = sg.load_dataset("mnist")
        accs = [train(name, m, ds, k, a.epochs, s) for name, m, k, s in cells]
    else:
        with ProcessPoolExecutor(a.jobs, mp_context=get_context("spawn")) as pool:
            accs = list(pool.map(train, *zip(*[(name, m, None, k, a.epochs, s) for name, m, k, s in cells],
                                             strict=True)))
    acc = {cell: x for cell, x in zip(cells, accs, strict=True)}
    rows = []
    for name in a.models:
        for k in a.stages:
            per = [[acc[(name, m, a.stages[0] if m.startswith("backprop") else k, s)] for s in a.seeds]
                   for m in methods]
            rows.append(f"| {name} | {k} | " + " | ".join(", ".join(f"{x:.2f}" for x in c) for c in per) + " |")
            print(rows[-1], flush=True)
    lines = ["# Unseen user models through the public API: sg.cut, then cDNI at DNI.build's defaults", "",
             f"- command: `python benchmarks/user_trial.py {shlex.join(sys.argv[1:])}`",
             f"- date: {date.today().isoformat()}; machine: {platform.machine()}, {os.cpu_count()} cores, "
             f"torch {torch.__version__}, 1 thread per run, {a.jobs} at a time",
             f"- MNIST, {a.epochs} epochs, batch 128, Adam 1e-3 with a cosine schedule; models and methods: the "
             "docstring of benchmarks/user_trial.py; test accuracy (%) per seed", "",
             "| model | stages | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods), *rows]
    (RESULTS / f"{a.out}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
