"""A user's model and a user's synthesizer, through the public API only: do cDNI's defaults reach it?

The model is written here (a tanh MLP with dropout, no normalisation: like nothing in the zoo or the
paper's tables), cut with `sg.cut`, and every interface holds a synthesizer defined here, not the library's:
a Linear on [h, one-hot label], zero-initialised, as the README shows. Each variant trains for --epochs on
MNIST (`sg.load_dataset`) from the same initialisation and prints its test accuracy:

- backprop;
- cDNI with `sg.BackwardInterface(synth, sg.adam(1e-3))`: centring, the classifier term and the local loss left
  to the defaults (all three on for cDNI);
- the same with `local_loss=False` (the behaviour before the local loss, seventh session);
- the same with `classifier=False, local_loss=False` (the behaviour from 2026-11-30 to 2026-12-01);
- the same with `center=False, classifier=False, local_loss=False` (the behaviour before 2026-11-30);
- the defaults with `trust=True`: each stage moves at its learning rate times its interface's trust factor;
- the defaults with `sg.DNI(..., lower_optimizer=sg.adam(2e-3))`: the stages below an interface at twice the last
  stage's rate (zoo-notes.md, section 15).

    python benchmarks/custom_synth.py --stages 4 --epochs 3     # writes benchmarks/results/custom-synth.md
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
from torch import nn

import synthgrad as sg

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


class MySynthesizer(nn.Module):
    """The README's custom synthesizer: a Linear on [h, one-hot label], predicting zero at first."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(dim + num_classes, dim)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc(torch.cat([h, context], dim=1))


def model(num_classes: int, width: int = 256) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(784, width), nn.Tanh(), nn.Dropout(0.1)]
    for _ in range(3):
        layers += [nn.Linear(width, width), nn.Tanh(), nn.Dropout(0.1)]
    return nn.Sequential(*layers, nn.Linear(width, num_classes))


# cDNI variant -> what is given to BackwardInterface beside the synthesizer and its optimizer (nothing: the default).
# (custom-synth.md and custom-synth-trust.md predate the local loss: their rows are the local_loss=False ones.)
VARIANTS: dict[str, dict] = {"cdni, the defaults": {}, "cdni, local_loss=False": {"local_loss": False},
                             "cdni, classifier=False": {"classifier": False, "local_loss": False},
                             "cdni, center=False, classifier=False": {"center": False, "classifier": False,
                                                                      "local_loss": False},
                             "cdni, trust=True": {"trust": True}, "cdni, lower_optimizer=adam(2e-3)": {}}
LOWER = {"cdni, lower_optimizer=adam(2e-3)": sg.adam(2e-3)}  # variant -> the lower stages' optimizer factory


def train(variant: str, ds: sg.Dataset, stages_n: int, epochs: int, seed: int) -> float:
    torch.manual_seed(seed)
    stages = sg.cut(model(ds.num_classes), stages_n, sample=ds.train_x[:2], balance="count")
    steps = epochs * (len(ds.train_x) // 128)
    if variant == "backprop":
        rule: sg.StepRule = sg.Backprop(stages, schedule=sg.cosine_schedule(steps))
    else:
        interfaces = [sg.BackwardInterface(MySynthesizer(256, ds.num_classes), sg.adam(1e-3), **VARIANTS[variant])
                      for _ in range(stages_n - 1)]
        rule = sg.DNI(stages, interfaces, conditioned=True, num_classes=ds.num_classes,
                      schedule=sg.cosine_schedule(steps), lower_optimizer=LOWER.get(variant))
    return fit(rule, ds, epochs, seed)


def fit(rule: sg.StepRule, ds: sg.Dataset, epochs: int, seed: int,
        on_step: Callable[[dict], None] | None = None) -> float:
    """Train `rule` for `epochs` of batches of 128 (the last short batch dropped), shuffled from `seed`, and
    return the plain network's test accuracy (%). on_step: called with each step's stats."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        rule.train()
        order = torch.randperm(len(ds.train_x), generator=g)
        for i in range(0, len(order) - 127, 128):
            idx = order[i:i + 128]
            stats = rule.step(ds.train_x[idx], ds.train_y[idx])
            if on_step is not None:
                on_step(stats)
    net = rule.network()
    with torch.no_grad():
        return (net(ds.test_x).argmax(1) == ds.test_y).float().mean().item() * 100


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variants", nargs="+", choices=["backprop", *VARIANTS], default=["backprop", *VARIANTS],
                   help="which to run (default: all)")
    p.add_argument("--out", default="custom-synth", help="report name in benchmarks/results")
    a = p.parse_args()
    torch.set_num_threads(1)
    ds = sg.load_dataset("mnist")
    rows = []
    for v in a.variants:
        accs = [train(v, ds, a.stages, a.epochs, s) for s in a.seeds]
        rows.append(f"| {v} | " + ", ".join(f"{x:.2f}" for x in accs) + " |")
        print(rows[-1], flush=True)
    lines = ["# A custom cDNI synthesizer on a user's model, through the public API", "",
             f"- command: `python benchmarks/custom_synth.py {shlex.join(sys.argv[1:])}`",
             f"- date: {date.today().isoformat()}; machine: {platform.machine()}, {os.cpu_count()} cores, "
             f"torch {torch.__version__}, 1 thread",
             f"- model: tanh MLP 784-256x4-10 with dropout 0.1, no normalisation, `sg.cut` into {a.stages} stages; "
             f"synthesizer: the README's MySynthesizer (Linear on [h, label]), Adam 1e-3; {a.epochs} epochs, "
             "batch 128, cosine schedule, stages Adam 1e-3", "",
             "| variant | test accuracy (%), per seed |", "|---|---|", *rows]
    (RESULTS / f"{a.out}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
