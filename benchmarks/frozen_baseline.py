"""The floor under DNI: train only the last stage, with every lower stage frozen at its initialisation.

A DNI stage whose synthetic gradient is orthogonal to the true one learns nothing useful; the
network's accuracy then comes from its last stage (trained on the true loss) reading features
that the lower stages never learnt. This trains exactly that network (same model, seed, data
order, batch, Adam and cosine schedule as `synthgrad train`; BatchNorm statistics of the frozen
stages still track the data, as in DNI) and prints its test accuracy per epoch, so a DNI result
can be read against it.

    python benchmarks/frozen_baseline.py --model cnn --epochs 20
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from synthgrad.config import lr_factor
from synthgrad.data import batches, epoch_order, load
from synthgrad.models import build_stages
from synthgrad.trainer import evaluate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cnn")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    ds = load(a.dataset, a.data_dir)
    torch.manual_seed(a.seed)  # the same initialisation as `synthgrad train --seed`
    stages = build_stages(a.model, ds.input_shape, ds.num_classes)
    for s in stages[:-1]:
        s.requires_grad_(False)
    net = torch.nn.Sequential(*stages)
    opt = torch.optim.Adam(stages[-1].parameters(), lr=a.lr)
    steps_per_epoch = len(ds.train_x) // a.batch_size
    total, step, t0 = a.epochs * steps_per_epoch, 0, time.time()
    for epoch in range(a.epochs):
        net.train()
        for xb, yb in batches(ds.train_x, ds.train_y, a.batch_size, epoch_order(len(ds.train_x), a.seed, epoch)):
            for group in opt.param_groups:  # cosine decay to 0 over the run, per step
                group["lr"] = a.lr * lr_factor("cosine", step, total)
            loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        acc, _ = evaluate(net, ds.test_x, ds.test_y)
        print(f"epoch {epoch + 1}: test accuracy {100 * acc:.2f}% "
              f"({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
