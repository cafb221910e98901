"""How much of the true gradient at each boundary a synthesizer can predict, with and without the label.

A DNI synthesizer sees h; a cDNI one sees h and the label y. The best any synthesizer can do
is E[g | h] (or E[g | h, y]), where g is the per-example gradient dL/dh. For a network whose
readout is a good classifier of h, E[g | h] is small: at the last boundary g = W^T (p - onehot(y)),
and E[g | h] = W^T (p - P(y | h)) vanishes when the readout's p is calibrated. So the signal an
unconditioned synthesizer can pass down shrinks as the network trains, whatever its size.

This benchmark measures that ceiling on a network trained with plain backprop (so the numbers do
not depend on any DNI setting): after 0, 1, 5 and 20 epochs it collects (h, g, y) at every boundary
on training examples, fits predictors on them, and scores them on test-set examples:

- linear on h (closed-form least squares), the best a linear DNI synthesizer can do;
- 2 x 1024 MLP on h (Linear + BN + ReLU, then a zero Linear; Adam), the paper's DNI synthesizer;
- linear on [h, onehot(y)] (closed form), the cDNI linear synthesizer.

Scores: R^2 (the fraction of the gradient's variance explained) and the cosine similarity of the
predicted and true gradient of a batch of 128, flattened (the `grad_cosine` of metrics.jsonl).

    python benchmarks/predictability.py                 # fcn-3; writes benchmarks/results/predictability.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from synthgrad import Backprop
from synthgrad.config import lr_factor
from synthgrad.data import batches, epoch_order, load
from synthgrad.diagnostics import frozen_batchnorm_stats
from synthgrad.models import build_stages
from synthgrad.synthesizers import VectorSynthesizer
from synthgrad.trainer import evaluate

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def collect(stages: nn.ModuleList, x: torch.Tensor, y: torch.Tensor, batch: int = 128
            ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Per boundary k: activations H_k [N, D_k] and per-example gradients G_k = B * dL/dh_k [N, D_k]; labels [N].

    Whole batches of `batch` (N: the largest multiple of it) in train mode (BN on batch statistics, as in
    training), running statistics frozen.
    """
    hs: list[list[torch.Tensor]] = [[] for _ in stages[:-1]]
    gs: list[list[torch.Tensor]] = [[] for _ in stages[:-1]]
    stages.train()
    with frozen_batchnorm_stats(list(stages)):
        for xb, yb in batches(x, y, batch):
            out, inner = xb, []
            for k, s in enumerate(stages):
                out = s(out)
                if k < len(stages) - 1:
                    inner.append(out)
            grads = torch.autograd.grad(F.cross_entropy(out, yb), inner)
            for k, (h, g) in enumerate(zip(inner, grads, strict=True)):
                hs[k].append(h.detach().flatten(1))
                gs[k].append(g.flatten(1) * len(yb))  # per-example units, as a synthesizer predicts them
    n = len(y) - len(y) % batch
    return [torch.cat(h) for h in hs], [torch.cat(g) for g in gs], y[:n]


def least_squares(features: torch.Tensor, targets: torch.Tensor, ridge: float = 1e-3
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [F, D] and bias [D] minimising ||features @ W + b - targets||^2 + ridge * N * ||W||^2."""
    mu_x, mu_y = features.mean(0), targets.mean(0)
    xc, yc = (features - mu_x).double(), (targets - mu_y).double()
    gram = xc.T @ xc + ridge * len(xc) * torch.eye(xc.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(gram, xc.T @ yc).float()  # [F, D]
    return w, mu_y - mu_x @ w


def fit_mlp(h: torch.Tensor, g: torch.Tensor, epochs: int, width: int = 1024, seed: int = 0) -> nn.Module:
    """The paper's DNI synthesizer (VectorSynthesizer, 2 hidden layers of `width`), fitted by MSE with Adam."""
    torch.manual_seed(seed)
    net = VectorSynthesizer(h.shape[1], hidden_layers=2, width=width)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for epoch in range(epochs):
        for group in opt.param_groups:  # cosine decay over the fit, per epoch
            group["lr"] = 1e-3 * lr_factor("cosine", epoch, epochs)
        for hb, gb in batches(h, g, 128, epoch_order(len(h), seed, epoch)):
            loss = F.mse_loss(net(hb), gb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval()


def score(pred: torch.Tensor, true: torch.Tensor, batch: int = 128) -> tuple[float, float]:
    """(R^2, mean batch cosine) of predictions [N, D] against true gradients [N, D]."""
    r2 = 1 - ((pred - true) ** 2).sum().item() / ((true - true.mean(0)) ** 2).sum().item()
    cosines = [F.cosine_similarity(pred[i:i + batch].flatten(), true[i:i + batch].flatten(), dim=0).item()
               for i in range(0, len(true) - batch + 1, batch)]
    return r2, sum(cosines) / len(cosines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fcn-3")
    p.add_argument("--epochs", default="0,1,5,20", help="backprop epochs after which to measure")
    p.add_argument("--fit-examples", type=int, default=20000, help="training examples the predictors fit")
    p.add_argument("--mlp-epochs", type=int, default=10, help="epochs of the 2 x 1024 MLP fit (0: skip it)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", type=Path, default=RESULTS / "predictability.md")
    a = p.parse_args()
    try:
        marks = sorted({int(e) for e in a.epochs.split(",")})
    except ValueError:
        raise SystemExit(f"--epochs takes comma-separated whole numbers, e.g. 0,1,5,20; got {a.epochs!r}") from None
    torch.set_num_threads(a.threads)
    ds = load("mnist", a.data_dir)
    torch.manual_seed(a.seed)
    rule = Backprop(build_stages(a.model, ds.input_shape, ds.num_classes), lr=1e-3)
    fit_x, fit_y = ds.train_x[:a.fit_examples], ds.train_y[:a.fit_examples]
    rows: list[str] = []
    t_start, epoch = time.time(), 0
    for mark in marks:
        while epoch < mark:
            rule.train()
            for xb, yb in batches(ds.train_x, ds.train_y, 128, epoch_order(len(ds.train_x), a.seed, epoch)):
                rule.step(xb, yb)
            epoch += 1
        acc, _ = evaluate(rule.network(), ds.test_x, ds.test_y)
        h_fit, g_fit, y_fit = collect(rule.stages, fit_x, fit_y)
        h_test, g_test, y_test = collect(rule.stages, ds.test_x, ds.test_y)
        onehot_fit = F.one_hot(y_fit, ds.num_classes).float()
        onehot_test = F.one_hot(y_test, ds.num_classes).float()
        for k in range(len(h_fit)):
            w, b = least_squares(h_fit[k], g_fit[k])
            lin = score(h_test[k] @ w + b, g_test[k])
            hy_fit, hy_test = torch.cat([h_fit[k], onehot_fit], 1), torch.cat([h_test[k], onehot_test], 1)
            w, b = least_squares(hy_fit, g_fit[k])
            cond = score(hy_test @ w + b, g_test[k])
            mlp = None
            if a.mlp_epochs:
                net = fit_mlp(h_fit[k], g_fit[k], a.mlp_epochs, seed=a.seed)
                with torch.no_grad():
                    mlp = score(net(h_test[k]), g_test[k])
            cells = [f"{lin[0]:.3f}", f"{lin[1]:.3f}"] + ([f"{mlp[0]:.3f}", f"{mlp[1]:.3f}"] if mlp else ["-", "-"])
            cells += [f"{cond[0]:.3f}", f"{cond[1]:.3f}"]
            row = f"| {mark} | {100 * acc:.2f} | h{k + 1} ({h_fit[k].shape[1]}) | " + " | ".join(cells) + " |"
            rows.append(row)
            print(row, flush=True)
    minutes = (time.time() - t_start) / 60
    write_report(a, rows, minutes)


def write_report(a: argparse.Namespace, rows: list[str], minutes: float) -> None:
    cmd = "python benchmarks/predictability.py " + " ".join(sys.argv[1:])
    lines = [
        "# How predictable is the gradient at a boundary? (DNI vs cDNI synthesizers)", "",
        f"- command: `{cmd.strip()}` ({minutes:.1f} min)",
        f"- date: {date.today().isoformat()}",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {a.threads} thread(s)",
        f"- network: `{a.model}` trained with plain backprop (Adam, constant lr 1e-3, batch 128, seed {a.seed}); "
        "after each number of epochs the per-example gradient g = B dL/dh at each boundary is collected on "
        f"{a.fit_examples:,} training examples (fit) and the 10,000 test examples (score)",
        "- R^2: fraction of the gradient's variance (around its mean) that the predictor explains on test examples; "
        "cosine: mean over batches of 128 of the cosine of predicted and true batch gradients, flattened",
        f"- predictors: linear in h (least squares); the paper's DNI synthesizer, 2 x 1024 MLP in h "
        f"({a.mlp_epochs} epochs of Adam); linear in [h, onehot(y)], the cDNI synthesizer (least squares)",
        "",
        "| epochs of backprop | test acc. % | boundary (dims) | DNI linear R^2 | cosine | DNI 2x1024 R^2 | cosine "
        "| cDNI linear R^2 | cosine |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows, "",
    ]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
