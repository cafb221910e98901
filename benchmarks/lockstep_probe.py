"""Lockstep against asynchronous: the same 2-stage cDNI pipeline, with and without waiting for the targets.

    python benchmarks/lockstep_probe.py --model resmlp --width 512 --steps 186 --lr 1e-3

Trains sg.Pipeline twice on MNIST from the same initialisation, once in lockstep (each stage waits for
its target: what DNI.step computes) and once asynchronously (targets a step or two late), and prints the
test accuracy of both. One thread per stage process.
"""

from __future__ import annotations

import argparse
import functools

import torch

import synthgrad as sg
from synthgrad.data import load
from synthgrad.defaults import DefaultInterfaces
from synthgrad.models import build_stages


def make_stage(model: str, width: int, k: int) -> torch.nn.Module:
    """Stage k of the registry model cut in 2 (the same initialisation in every process)."""
    torch.manual_seed(0)
    return build_stages(model, (1, 28, 28), 10, 2, width)[k]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resmlp")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--steps", type=int, default=186)
    p.add_argument("--lr", type=float, default=1e-3, help="the stages' Adam learning rate")
    p.add_argument("--center", action="store_true", help="centre the synthetic gradients over the batch")
    a = p.parse_args()
    ds = load("mnist")
    x_test, y_test = ds.test_x[:5000], ds.test_y[:5000]
    interfaces = DefaultInterfaces(True, 10, rank=64, lr=1e-3, center=a.center)
    for lockstep in (True, False):
        pipe = sg.Pipeline(functools.partial(make_stage, a.model, a.width), 2, method="cdni", num_classes=10,
                           interface=interfaces, lockstep=lockstep, lr=a.lr, threads=1,
                           schedule=sg.cosine_schedule(len(ds.train_x) // 128))
        res = pipe.fit((ds.train_x, ds.train_y), epochs=1, batch_size=128, max_steps=a.steps, log_every=1000)
        with torch.no_grad():
            acc = (res.network(x_test).argmax(1) == y_test).float().mean().item()
        print(f"{'lockstep' if lockstep else 'asynchronous'}: test accuracy {acc:.4f} after {a.steps} steps",
              flush=True)


if __name__ == "__main__":
    main()
