"""What trust-scaled stages, or a local loss, cost a short run: the test suite's user model, the option off and on.

The model and its custom synthesizers are `tests/usermodel.py`'s (an MLP on synthetic data, 2,048 examples,
custom low-rank cDNI synthesizers), as `tests/test_engine.py` trains them: batch 32, Adam 1e-3, stages built
from each seed. Each cell trains with `sg.DNI` in one process and, for the shorter budget, with the
asynchronous `sg.Pipeline`; it prints the test accuracy of each seed.

    python benchmarks/trust_short_run.py        # writes benchmarks/results/trust-short-run.md (about 6 min)
    python benchmarks/trust_short_run.py --growth    # trust-short-run-growth.md: the activations' RMS growth
    python benchmarks/trust_short_run.py --option local   # local-short-run.md: the local loss off and on
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
from datetime import date
from pathlib import Path

import torch

import synthgrad as sg
from synthgrad.batching import batches, epoch_order
from synthgrad.health import rms
from synthgrad.rules import activation_shapes

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "tests"))
import usermodel as um  # noqa: E402  (the tests' user model, not a package)

OPTIONS = {  # --option: the interfaces' keywords with it off, and on (cDNI's default local loss is on)
    "trust": ({"trust": False}, {"trust": True}),
    "local": ({"local_loss": False}, {"local_loss": True}),
}


def single_process(stages_n: int, opts: dict, epochs: int, seed: int, x: torch.Tensor, y: torch.Tensor,
                   growth: list[float] | None = None) -> float:
    """Test accuracy after `epochs`; growth, if given, receives each boundary's largest RMS over its first."""
    torch.manual_seed(seed)
    stages = um.stages(stages_n)
    make = um.Interfaces(True, **opts)
    interfaces = [make(k, s) for k, s in enumerate(activation_shapes(stages, x[:2])[:-1])]
    rule = sg.DNI(stages, interfaces, lr=1e-3, conditioned=True, num_classes=um.NUM_CLASSES)
    sizes: list[list[float]] = [[] for _ in stages[:-1]]
    for k, stage in enumerate(stages[:-1]):  # the RMS of each boundary's activation at every training step
        stage.register_forward_hook(lambda m, _i, out, k=k: sizes[k].append(rms(out)) if m.training else None)
    for epoch in range(epochs):
        for xb, yb in batches(x, y, 32, epoch_order(len(x), seed, epoch)):
            rule.step(xb, yb, diagnose=False)
    if growth is not None:
        growth.extend(max(r) / r[0] for r in sizes)
    return um.accuracy(rule.network())


def pipeline(stages_n: int, opts: dict, epochs: int, seed: int, x: torch.Tensor, y: torch.Tensor) -> float:
    pipe = sg.Pipeline(um.stage2 if stages_n == 2 else um.stage3, stages_n, method="cdni",
                       num_classes=um.NUM_CLASSES, interface=um.Interfaces(True, **opts), lr=1e-3, seed=seed)
    res = pipe.fit((x, y), epochs=epochs, batch_size=32, evaluate=um.accuracy, log_every=64)
    return [r for r in res.metrics if r["kind"] == "epoch"][-1]["test_accuracy"]


def growth_rows(a: argparse.Namespace, x: torch.Tensor, y: torch.Tensor) -> list[str]:
    """Trust off, one process: each boundary's largest RMS growth, per budget, number of stages and seed."""
    rows = []
    for epochs in a.epochs:
        for n in (2, 3):
            per_seed = []
            for s in a.seeds:
                g: list[float] = []
                single_process(n, OPTIONS["trust"][0], epochs, s, x, y, g)
                per_seed.append(" / ".join(f"{v:.2f}x" for v in g))
            rows.append(f"| {epochs * 64} | {n} | {', '.join(per_seed)} |")
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", type=int, nargs="+", default=[4, 16], help="budgets in epochs of 64 steps")
    p.add_argument("--growth", action="store_true",
                   help="instead: how far each boundary's activation RMS grows without trust "
                        "(writes trust-short-run-growth.md, about 1 min)")
    p.add_argument("--option", choices=list(OPTIONS), default="trust",
                   help="what to compare: trust-scaled stages (trust-short-run.md) or the local loss "
                        "(local-short-run.md)")
    a = p.parse_args()
    torch.set_num_threads(1)
    x, y = um.data(2048)
    head = [f"- command: `python benchmarks/trust_short_run.py {shlex.join(sys.argv[1:])}`",
            f"- date: {date.today().isoformat()}; machine: {platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}, 1 thread per process"]
    if a.growth:
        out = ["# How far the user model's boundary activations grow without trust", "", *head,
               "- model: `tests/usermodel.py`, cDNI with its custom low-rank synthesizers, `sg.DNI` in one process, "
               "trust off; each boundary's activation RMS at its largest over its first step's (boundaries from "
               f"the lowest, separated by /; per seed: {', '.join(map(str, a.seeds))})", "",
               "| steps | stages | largest RMS growth |", "|---|---|---|", *growth_rows(a, x, y)]
        (RESULTS / "trust-short-run-growth.md").write_text("\n".join(out) + "\n")
        return
    rows = []
    for engine, train, budgets in (("`sg.DNI`, one process", single_process, a.epochs),
                                   ("`sg.Pipeline`, asynchronous", pipeline, a.epochs[:1])):
        for epochs in budgets:
            for n in (2, 3):
                cells = [", ".join(f"{train(n, opts, epochs, s, x, y):.3f}" for s in a.seeds)
                         for opts in OPTIONS[a.option]]
                rows.append(f"| {engine} | {epochs * 64} | {n} | {cells[0]} | {cells[1]} |")
                print(rows[-1], flush=True)
    what = {"trust": "Trust-scaled stages", "local": "A local loss mixed into the synthetic gradient"}[a.option]
    keyword = {"trust": "`trust`", "local": "`local_loss`"}[a.option]
    out = [f"# {what} on a short run: the test suite's user model", "", *head,
           "- model: `tests/usermodel.py` (backprop reaches about 0.83 in 256 steps; 3 stages with the lower ones "
           f"frozen, 0.61), cDNI with its custom low-rank synthesizers, {keyword} set on every interface; "
           f"test accuracy per seed ({', '.join(map(str, a.seeds))})", "",
           f"| engine | steps | stages | {a.option} off | {a.option} on |", "|---|---|---|---|---|", *rows]
    (RESULTS / f"{a.option}-short-run.md").write_text("\n".join(out) + "\n")

if __name__ == "__main__":
    main()
