"""Step cost of DNI and cDNI against backprop, per synthesizer size, measured side by side.

Every variant trains on the same batch in one process; the variants take turns (round
robin, several rounds), and each figure is the median of its rounds, so slow drifts of
the shared machine hit all variants alike. Ratios are to backprop on the same model.

    python benchmarks/cost.py                 # writes benchmarks/results/cost.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

from synthgrad import DNI, Backprop, StepRule
from synthgrad.defaults import default_interface
from synthgrad.models import build_stages
from synthgrad.rules import activation_shapes

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"

# (label, method, synth_hidden, synth_width[, DNI.build arguments]); width None = the default (1024 vector,
# 64 conv channels);
# synth_hidden "default": the interfaces of defaults.default_interface (linear synthesizers, centred; issue 17).
# cDNI's synthesizers carry the classifier term by default (since 2026-11-30, evening; cost.md predates it), and
# its stages mix in a local loss (since the seventh session; cost-classifier.md predates it).
VARIANTS = [
    ("backprop", "backprop", None, None),
    ("cdni default", "cdni", "default", None),
    ("dni default", "dni", "default", None),
    ("cdni linear", "cdni", 0, None),
    ("cdni linear, no classifier term", "cdni", 0, None, {"synth_classifier": False}),
    ("cdni linear, no local loss", "cdni", 0, None, {"synth_local": False}),
    ("cdni linear, every 2nd target", "cdni", 0, None, {"synth_every": 2}),
    ("cdni rank 64, label embedded", "cdni", 0, None, {"synth_rank": 64}),
    ("cdni rank 32, label embedded", "cdni", 0, None, {"synth_rank": 32}),
    ("cdni rank 64, every 2nd target", "cdni", 0, None, {"synth_rank": 64, "synth_every": 2}),
    ("dni linear", "dni", 0, None),
    ("dni 1x256", "dni", 1, 256),
    ("dni 2x256", "dni", 2, 256),
    ("dni 2x1024 (paper)", "dni", 2, 1024),
]
CONV_VARIANTS = [
    ("backprop", "backprop", None, None),
    ("cdni default_interface", "cdni", "default", None),
    ("dni default_interface (linear, centred)", "dni", "default", None),
    ("dni, DNI.build's default", "dni", None, None),
    ("cdni linear (one 5x5 conv)", "cdni", 0, None),
    ("cdni linear (one 5x5 conv), no classifier term", "cdni", 0, None, {"synth_classifier": False}),
    ("cdni linear (one 5x5 conv), no local loss", "cdni", 0, None, {"synth_local": False}),
    ("dni linear (one 5x5 conv)", "dni", 0, None),
    ("dni 1x16ch", "dni", 1, 16),
    ("dni 2x64ch", "dni", 2, 64),
]

TOKEN_VARIANTS = [  # token activations [N, D]: the mean-token term is cDNI's default since the eighth session
    ("backprop", "backprop", None, None),
    ("cdni linear", "cdni", 0, None),
    ("cdni linear, no mean-token term", "cdni", 0, None, {"synth_mean_token": False}),
    ("cdni linear, no local loss", "cdni", 0, None, {"synth_local": False}),
    ("dni 2x256", "dni", 2, 256),
]


def make(model: str, method: str, hidden: int | str | None, width: int | None, x: torch.Tensor,
         num_stages: int | None = None, **kw) -> StepRule:
    torch.manual_seed(0)
    stages = build_stages(model, (1, 28, 28), 10, num_stages)
    if method == "backprop":
        return Backprop(stages)
    if hidden == "default":
        shapes = activation_shapes(stages, x[:2])[:-1]
        return DNI(stages, [default_interface(s, method == "cdni", 10) for s in shapes],
                   conditioned=method == "cdni", num_classes=10)
    return DNI.build(stages, x[:2], conditioned=method == "cdni", num_classes=10, synth_hidden=hidden,
                     synth_width=width, **kw)


def measure(model: str, batch: int, steps: int, rounds: int,
            num_stages: int | None = None) -> list[tuple[str, float, float]]:
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    torch.manual_seed(0)
    rank = len(activation_shapes(build_stages(model, (1, 28, 28), 10), x[:2])[0])  # 3: feature maps; 2: tokens
    variants = CONV_VARIANTS if rank == 3 else TOKEN_VARIANTS if rank == 2 else VARIANTS
    rules = [(v[0], make(model, *v[1:4], x, num_stages, **(v[4] if len(v) > 4 else {}))) for v in variants]
    times: dict[str, list[float]] = {label: [] for label, _ in rules}
    for rule in (r for _, r in rules):  # warm-up
        for _ in range(3):
            rule.step(x, y)
    for _ in range(rounds):
        for label, rule in rules:
            t0 = time.perf_counter()
            for _ in range(steps):
                rule.step(x, y)
            times[label].append((time.perf_counter() - t0) / steps)
    base = statistics.median(times["backprop"])
    return [(label, 1000 * statistics.median(ts), statistics.median(ts) / base) for label, ts in times.items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mlp", "fcn-3", "cnn"])
    p.add_argument("--out", default="cost.md", help="file name under benchmarks/results")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stages", type=int, default=None, help="cut each model into this many stages (by cost); "
                   "default: one stage per layer of the registry (the zoo's models: one per block, 4)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    lines = [
        "# Step cost per synthesizer size", "",
        f"- command: `python benchmarks/cost.py {' '.join(sys.argv[1:])}`",
        f"- date: {date.today().isoformat()}",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{a.threads} thread(s), batch {a.batch_size}, stages {a.stages or 'one per layer'}",
        f"- median over {a.rounds} interleaved rounds of {a.steps} steps; ratio = step time / backprop step time",
        "",
        "| model | variant | ms/step | × backprop |",
        "|---|---|---|---|",
    ]
    for model in a.models:
        for label, ms, ratio in measure(model, a.batch_size, a.steps, a.rounds, a.stages):
            lines.append(f"| {model} | {label} | {ms:.1f} | {ratio:.2f} |")
            print(lines[-1], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / a.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
