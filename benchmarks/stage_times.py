"""Where a 2-stage DNI pipeline's time can go: each stage's step timed alone, and two processes side by side.

    python benchmarks/stage_times.py --width 1024

In one process with 1 thread it times, interleaved over --rounds rounds (median reported): a backprop
step of the whole model, stage 1's DNI step (forward, backward with its synthesizer's prediction, update),
stage 1's synthesizer regression (predict again, MSE to a target, update) and stage 2's step (the true
loss, with the gradient at its input). The balanced-pipeline bound is backprop / max(stage 1 + regression,
stage 2). Then it runs the backprop timing alone and in two processes at once, to see whether the two
cores slow each other down (shared cache and memory bandwidth) at this width.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from synthgrad.config import TrainConfig
from synthgrad.stage import stage_step
from synthgrad.trainer import build_rule


def step_times(width: int, batch: int, steps: int, rounds: int, synth_hidden: int = 1,
               synth_width: int = 64) -> dict[str, float]:
    """Median milliseconds per step of each part, the parts taking turns within every round."""
    torch.manual_seed(0)
    cfg = TrainConfig(model="fcn-4", width=width, stages=2, method="dni", synth_hidden=synth_hidden,
                      synth_width=synth_width, batch_size=batch).resolve()
    rule = build_rule(cfg, (1, 28, 28), 10).train()
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    h, target = torch.randn(batch, width), torch.randn(batch, width) * 1e-3  # stage 1's output; a dL/dh
    interface = rule.interfaces[0]
    network = torch.nn.Sequential(*build_rule(cfg, (1, 28, 28), 10).stages)
    optimizer = torch.optim.Adam(network.parameters(), 1e-3, fused=True)

    def backprop() -> None:
        F.cross_entropy(network(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    parts = {
        "backprop step, whole model": backprop,
        "stage 1 step (DNI)": lambda: stage_step(
            rule.stages[0], rule.optimizers[0], x, index=0, step=1, input_grad=False,
            output_grad=lambda out: interface.stage_gradient(interface.predict(out), 1)),
        "stage 1 synthesizer regression": lambda: interface.update(interface.predict(h), target),
        "stage 2 step": lambda: stage_step(rule.stages[1], rule.optimizers[1], h, index=1, step=1, labels=y),
    }
    times: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(rounds):
        for name, fn in parts.items():
            for _ in range(3):  # warm-up
                fn()
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            times[name].append((time.perf_counter() - t0) / steps * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def backprop_rate(width: int, batch: int, steps: int) -> float:
    """samples/s of backprop steps in this process (1 thread), for the side-by-side test."""
    ms = step_times(width, batch, steps, 1)["backprop step, whole model"]
    return batch / ms * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--synth-hidden", type=int, default=1,
                   help="synthesizer hidden layers (1 of --synth-width 64: the pipeline benchmark's; 0: linear)")
    p.add_argument("--synth-width", type=int, default=64)
    p.add_argument("--rate-only", action="store_true", help=argparse.SUPPRESS)  # the side-by-side child
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.rate_only:
        print(backprop_rate(a.width, a.batch_size, a.steps))
        return 0
    t = step_times(a.width, a.batch_size, a.steps, a.rounds, a.synth_hidden, a.synth_width)
    print(f"fcn-4, width {a.width}, batch {a.batch_size}, 1 thread; median ms per step over {a.rounds} rounds")
    for name, ms in t.items():
        print(f"  {name:34s} {ms:7.2f}")
    upper = max(t["stage 1 step (DNI)"] + t["stage 1 synthesizer regression"], t["stage 2 step"])
    print(f"  balanced-pipeline bound: {t['backprop step, whole model'] / upper:.2f}x backprop")
    child = [sys.executable, __file__, "--rate-only", "--width", str(a.width), "--batch-size", str(a.batch_size),
             "--steps", str(a.steps)]
    alone = float(subprocess.run(child, capture_output=True, text=True, check=True).stdout)
    procs = [subprocess.Popen(child, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    pair = [float(proc.communicate()[0]) for proc in procs]
    print(f"backprop samples/s alone {alone:,.0f}; two processes at once {pair[0]:,.0f} and {pair[1]:,.0f} "
          f"({sum(pair) / (2 * alone):.0%} of the solo speed each, on average)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
