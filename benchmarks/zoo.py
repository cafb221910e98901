"""The zoo benchmark: backprop, cDNI, DNI and the frozen floor on user-like models, at the library's defaults.

For every (model, dataset, K stages, method, seed) one run trains through the public API only
(`sg.DNI.build(stages, sample, conditioned=..., num_classes=...)` with no tuning arguments, or
`sg.Backprop(stages)`), batch 128, cosine schedule, and records final and best test accuracy, the
accuracy after each epoch, and every --diagnose-every steps each interface's cosine to the true
gradient and each boundary's activation RMS (plus, with --probe, the synthetic gradient's norm against
the true and the bootstrapped target's, its component along h, and each stage's relative step size).
`frozen` is the floor: the lower stages frozen at their initialisation, only the last stage trained.

Each run is one JSON file under --runs-root (outside the checkout), reused when it exists, so a
stopped benchmark continues where it stopped. `--variant NAME` runs a candidate rule (benchmarks/zoo_variants.py)
in place of the library's defaults; backprop and frozen runs do not depend on it and are shared.
`library` runs whatever the library's defaults are when it runs: cDNI's changed on 2026-11-30 (synthesizer
lr 1e-3, centred), and the cDNI runs made before that were moved to RUNS_ROOT/library-until-2026-11-30
(the old default is the variant `lin`).

    python benchmarks/zoo.py --epochs 3 --seeds 0 --models resmlp --datasets mnist   # a quick screen
    python benchmarks/zoo.py --jobs 2                                               # the full table
    python benchmarks/zoo.py --models mixer-mini gru-rows plain-cnn tanh-mlp       # held-out models
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import date
from multiprocessing import get_context
from pathlib import Path

import holdout
import torch
import torch.nn.functional as F
from torch import nn
from zoo_variants import TOKENS, StepHook, build_variant, parse_variant

import synthgrad as sg
from synthgrad import zoo
from synthgrad.config import lr_factor
from synthgrad.data import batches, epoch_order, load
from synthgrad.diagnostics import parameter_agreement
from synthgrad.errors import DivergenceError
from synthgrad.models import build_layers
from synthgrad.trainer import evaluate

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
METHODS = ("backprop", "cdni", "dni", "frozen", "dgl")
SHARED = ("backprop", "frozen", "dgl")  # runs that no variant changes
DNI_GAP = {"mnist": 3.0, "fashion-mnist": 5.0}  # the DNI targets, points below backprop
CDNI_GAP = 1.0


@dataclass(frozen=True)
class Run:
    model: str
    dataset: str
    stages: int
    method: str
    seed: int
    epochs: int
    variant: str = "library"
    backprop_lr: float = 1e-3  # backprop runs' Adam learning rate (--backprop-lr); no other method reads it

    @property
    def key(self) -> str:
        variant = "base" if self.method in SHARED else self.variant
        if self.method == "backprop" and self.backprop_lr != 1e-3:  # the default keeps the keys runs were saved by
            variant = f"base-lr{self.backprop_lr:g}"
        k = "kall" if self.method == "backprop" else f"k{self.stages}"  # backprop is the same network for any K
        return f"{variant}/{self.dataset}-{self.model}-{k}-{self.method}-s{self.seed}-e{self.epochs}"


def mean_share(v: torch.Tensor) -> float:
    """B |mean_B v|^2 / |v|^2 for v [B, D]: 1 when every example holds the same vector, ~1/B for noise."""
    return (v.shape[0] * v.mean(0).pow(2).sum() / v.pow(2).sum().clamp_min(1e-30)).item()


class Probe:
    """Diagnostics sampled on some steps: activation RMS per boundary and, for DNI, the synthetic gradient's
    geometry (wrapping each interface's predict and update, which the rule calls as usual)."""

    def __init__(self, rule: sg.StepRule, detail: bool):
        self.rule, self.detail, self.on = rule, detail, False
        self.labels: torch.Tensor | None = None
        self.rms: dict[int, float] = {}
        self.inputs: dict[int, torch.Tensor] = {}  # each lower stage's input on the sampled step
        self.geometry: dict[int, dict] = {}
        for k, stage in enumerate(rule.stages[:-1]):
            stage.register_forward_hook(self._hook(k))
        if detail:
            for k, iface in enumerate(rule.interfaces):
                iface.predict = self._predict(k, iface.predict)
                iface.update = self._update(k, iface.update)

    def _hook(self, k: int) -> Callable:
        def hook(_m: nn.Module, inp: tuple, out: torch.Tensor) -> None:
            if self.on and k not in self.rms:  # the first call: the step's own forward pass
                self.rms[k] = out.detach().pow(2).mean().sqrt().item()
                self.inputs[k] = inp[0].detach()
        return hook

    def _predict(self, k: int, predict: Callable) -> Callable:
        def wrapped(h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
            p = predict(h, context)
            if self.on and k not in self.geometry:
                g = sg.true_gradient(self.rule.stages[k + 1:], h, self.labels, self.rule.loss_fn)  # batch-mean
                pd, b = p.detach().flatten(1).double() / p.shape[0], p.shape[0]  # [B, D], batch-mean units
                gd, hd = g.flatten(1).double(), h.detach().flatten(1).double()
                unit_h = hd / hd.norm(dim=1, keepdim=True).clamp_min(1e-12)
                along = lambda v: ((v * unit_h).sum(1).pow(2).sum() / v.pow(2).sum().clamp_min(1e-30)).item()  # noqa: E731
                self.geometry[k] = {
                    "p_over_true": (pd.norm() / gd.norm().clamp_min(1e-30)).item(),
                    "p_along_h": along(pd), "true_along_h": along(gd),  # share of |v|^2 along h, per example
                    "ls_alpha_true": ((pd * gd).sum() / pd.pow(2).sum().clamp_min(1e-30)).item(),
                    "true_norm": gd.norm().item() * b, "p_norm": pd.norm().item() * b,  # per-example units
                    "param_cos": self._param_cosine(k, p.detach() / b, g),
                    # share of |v|^2 in the batch mean (the part every example shares): B |mean v|^2 / |v|^2
                    "p_mean_share": mean_share(pd), "true_mean_share": mean_share(gd), "h_mean_share": mean_share(hd),
                }
            return p
        return wrapped

    def _param_cosine(self, k: int, p: torch.Tensor, g: torch.Tensor) -> float | None:
        """Cosine of stage k's parameter gradients under the synthetic and the true gradient at its output:
        what its update follows, where per-example noise that the batch sum cancels no longer counts."""
        if k not in self.inputs:
            return None
        agreement = parameter_agreement(self.rule.stages[k], self.inputs[k], p, g)
        return None if agreement is None else agreement[0]

    def _update(self, k: int, update: Callable) -> Callable:
        def wrapped(prediction: torch.Tensor, target_grad: torch.Tensor) -> float:
            if self.on and k in self.geometry and "p_over_target" not in self.geometry[k]:
                p = prediction.detach().double() / prediction.shape[0]
                t = target_grad.detach().double()
                self.geometry[k].update({
                    "p_over_target": (p.norm() / t.norm().clamp_min(1e-30)).item(),
                    "cos_target": F.cosine_similarity(p.flatten(), t.flatten(), dim=0).item(),
                    "ls_alpha_target": ((p * t).sum() / p.pow(2).sum().clamp_min(1e-30)).item()})
            return update(prediction, target_grad)
        return wrapped

    def start(self, labels: torch.Tensor) -> None:
        self.on, self.labels, self.rms, self.geometry = True, labels, {}, {}

    def stop(self) -> dict:
        self.on = False
        out: dict = {"rms": [self.rms.get(k) for k in range(len(self.rule.stages) - 1)]}
        if self.detail:
            out["geometry"] = [self.geometry.get(k) for k in range(len(self.rule.interfaces))]
        return out


TRAIN_EVAL = 6000  # training examples evaluated after every epoch (eval mode, as the test set)


def build_rule(run: Run, stages: list[nn.Module], sample: torch.Tensor,
               num_classes: int) -> tuple[sg.StepRule, StepHook | None]:
    if run.method == "backprop":
        return sg.Backprop(stages, lr=run.backprop_lr), None
    if run.method == "dgl":
        return sg.DGL.build(stages, sample, num_classes), None
    if run.method == "frozen":
        for s in stages[:-1]:
            s.requires_grad_(False)  # BatchNorm statistics still track the data, as in DNI
        return sg.Backprop(stages), None
    return build_variant(run.variant, stages, sample, run.method == "cdni", num_classes)


def train(run: Run, diagnose_every: int, probe_detail: bool, data_dir: str | None) -> dict:
    """One run, start to end; returns its record."""
    torch.set_num_threads(1)
    ds = load(run.dataset, data_dir)
    torch.manual_seed(run.seed)
    blocks = (holdout.build_blocks(run.model, ds.input_shape, ds.num_classes) if run.model in holdout.SPECS
              else build_layers(run.model, ds.input_shape, ds.num_classes))
    stages = zoo.group_blocks(blocks, run.stages)
    rule, hook = build_rule(run, stages, ds.train_x[:2], ds.num_classes)
    probe = Probe(rule, probe_detail and isinstance(rule, sg.DNI))
    params = [[p for p in s.parameters() if p.requires_grad] for s in rule.stages]
    steps_per_epoch = len(ds.train_x) // 128
    total, step, t0 = run.epochs * steps_per_epoch, 0, time.time()
    record: dict = {**asdict(run), "accuracy": [], "diagnostics": []}
    for epoch in range(run.epochs):
        rule.train()
        for xb, yb in batches(ds.train_x, ds.train_y, 128, epoch_order(len(ds.train_x), run.seed, epoch)):
            rule.set_lr_factor(lr_factor("cosine", step, total))
            if hook is not None:
                hook()
            diag = step % diagnose_every == 0 or step == total - 1
            if diag:
                probe.start(yb)
                before = [torch.cat([p.detach().flatten() for p in ps]) if ps else None for ps in params]
            stats = rule.step(xb, yb, diagnose=diag and isinstance(rule, sg.DNI))
            if diag:
                entry = {"step": step, "train_loss": stats["train_loss"], **probe.stop()}
                if "grad_cosine" in stats:
                    entry["cosine"], entry["synth_loss"] = stats["grad_cosine"], stats["synth_loss"]
                    entry["trust"] = [float(i.trust_factor) for i in rule.interfaces]
                    entry["agreement"] = [float(i.agreement) for i in rule.interfaces]
                    for key in ("applied_cosine", "mix_synthetic", "mix_local",  # since the eighth session
                                "param_cosine", "param_rel_error", "applied_rel_error"):  # since the tenth
                        entry[key] = stats.get(key)
                if probe_detail:  # each stage's step relative to its parameters' norm
                    entry["rel_step"] = [None if b is None else
                                         ((torch.cat([p.detach().flatten() for p in ps]) - b).norm() / b.norm()).item()
                                         for b, ps in zip(before, params, strict=True)]
                    entry["param_norm"] = [None if b is None else b.norm().item() for b in before]
                record["diagnostics"].append(entry)
            if not math.isfinite(stats["train_loss"]):
                raise FloatingPointError(f"{run.key}: non-finite loss at step {step}")
            step += 1
        acc, _ = evaluate(rule.network(), ds.test_x, ds.test_y)
        record["accuracy"].append(100 * acc)
        # Since the eleventh session: the same measure on a fixed tenth of the training set, so a gap to backprop
        # can be told apart as fitting (train accuracy short too) or generalising (train accuracy level or ahead).
        train_acc, _ = evaluate(rule.network(), ds.train_x[:TRAIN_EVAL], ds.train_y[:TRAIN_EVAL])
        record.setdefault("train_accuracy", []).append(100 * train_acc)
        print(f"{run.key}: epoch {epoch + 1}/{run.epochs} {100 * acc:.2f}% (train {100 * train_acc:.2f}%, "
              f"{time.time() - t0:.0f} s)", flush=True)
    record.update(final=record["accuracy"][-1], best=max(record["accuracy"]), time_s=time.time() - t0,
                  steps=total, date=date.today().isoformat())
    return record


def run_and_save(run: Run, root: Path, diagnose_every: int, probe_detail: bool, data_dir: str | None) -> dict:
    path = root / f"{run.key}.json"
    if path.exists():
        return json.loads(path.read_text())
    try:
        rec = train(run, diagnose_every, probe_detail, data_dir)
    except (FloatingPointError, DivergenceError) as e:  # a diverged run is a result too: at chance
        print(e, flush=True)
        rec = {**asdict(run), "accuracy": [], "diagnostics": [], "final": 10.0, "best": 10.0, "diverged": str(e)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec) + "\n")
    tmp.replace(path)
    return rec


# ----------------------------------------------------------------------------- report

def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def fmt(xs: list[float]) -> str:
    if not xs:
        return "-"
    m, s = mean_std(xs)
    return f"{m:.2f} ± {s:.2f}" if len(xs) > 1 else f"{m:.2f}"


def summarise(records: dict[Run, dict], runs: list[Run]) -> tuple[list[str], list[dict]]:
    """Markdown rows and JSON rows: one per (dataset, model, K), with each target met or not."""
    cells = sorted({(r.dataset, r.model, r.stages) for r in runs}, key=lambda c: (c[0] != "mnist", c[1], c[2]))
    rows, out = [], []
    for ds, model, k in cells:
        acc = {m: [records[r]["final"] for r in runs if (r.dataset, r.model, r.stages, r.method) == (ds, model, k, m)
                   and r in records] for m in METHODS}
        cos = [records[r]["diagnostics"][-1].get("cosine") for r in runs
               if (r.dataset, r.model, r.stages) == (ds, model, k) and r.method == "dni" and r in records
               and records[r]["diagnostics"]]
        bp = statistics.mean(acc["backprop"]) if acc["backprop"] else None
        floor = statistics.mean(acc["frozen"]) if acc["frozen"] else None
        verdict = {}
        for m, gap in (("cdni", CDNI_GAP), ("dni", DNI_GAP[ds])):
            if acc[m] and bp is not None:
                mean = statistics.mean(acc[m])
                ok = mean >= bp - gap and (floor is None or min(acc[m]) > floor)
                verdict[m] = {"gap": mean - bp, "met": ok}
        row = {"dataset": ds, "model": model, "stages": k, **{m: acc[m] for m in METHODS}, "verdict": verdict}
        out.append(row)
        v = {m: f"{x['gap']:+.2f} {'met' if x['met'] else 'NOT met'}" for m, x in verdict.items()}
        last_cos = ", ".join(f"{c:.2f}" for c in cos[0]) if cos and cos[0] else "-"
        rows.append(f"| {ds} | {model} | {k} | {fmt(acc['backprop'])} | {fmt(acc['frozen'])} | {fmt(acc['cdni'])} | "
                    f"{v.get('cdni', '-')} | {fmt(acc['dni'])} | {v.get('dni', '-')} | {last_cos} |")
    return rows, out


def report(records: dict[Run, dict], runs: list[Run], name: str, argv: list[str], variant: str) -> None:
    rows, js = summarise(records, runs)
    seeds = sorted({r.seed for r in runs})
    epochs = sorted({r.epochs for r in runs})
    lines = [
        f"# Zoo benchmark: {variant}", "",
        f"- command: `python benchmarks/zoo.py {' '.join(argv)}`",
        f"- date: {date.today().isoformat()}",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread per run",
        f"- seeds {seeds}, epochs {epochs}, batch 128, cosine schedule; test accuracy (%) after the last epoch, "
        "mean ± std over seeds; gap = mean - backprop's mean",
        f"- targets: cDNI gap >= -{CDNI_GAP}; DNI gap >= -3 (MNIST) / -5 (Fashion-MNIST); every seed above the "
        "frozen floor's mean",
        "- last column: DNI's cosine to the true gradient per interface at the last step (first seed)", "",
        "| dataset | model | K | backprop | frozen floor | cDNI | cDNI gap | DNI | DNI gap | DNI cosine (last) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    summary = {"command": argv, "variant": variant, "date": date.today().isoformat(), "rows": js}
    (RESULTS / f"{name}.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("\n".join(lines))


def ablation(records: dict[Run, dict], runs: list[Run], name: str, argv: list[str], variants: list[str]) -> None:
    """One row per (dataset, model, K, method), one column per variant: accuracy and gap to backprop; the
    floor and backprop beside them; '<' marks a mean at or below the frozen floor."""
    def accs(field: str = "final", **kw: object) -> list[float]:
        """`field` of every recorded run matching kw: "final" (test accuracy) or "train" (training accuracy,
        recorded since the eleventh session; runs without it are left out)."""
        found = {r.key: (records[r]["final"] if field == "final" else records[r].get("train_accuracy", [None])[-1])
                 for r in runs if r in records and all(getattr(r, k) == v for k, v in kw.items())}
        return [x for x in found.values() if x is not None]  # one per run file: backprop's is shared by every K

    def drift(**kw: object) -> str:  # the largest activation RMS over the run, relative to its value at step 0
        out = []
        for r in runs:
            if r in records and all(getattr(r, k) == v for k, v in kw.items()) and records[r]["diagnostics"]:
                d = records[r]["diagnostics"]
                out.append(max(max(e["rms"][i] for e in d) / d[0]["rms"][i] for i in range(len(d[0]["rms"]))))
        return f"{max(out):.1f}x" if out else "-"

    cells = sorted({(r.dataset, r.model, r.stages, r.method) for r in runs if r.method not in SHARED},
                   key=lambda c: (c[0] != "mnist", c[1], c[2], c[3]))
    head = "| dataset | model | K | method | backprop | floor | " + " | ".join(variants) + " |"
    lines = [f"# Zoo ablation: {', '.join(variants)}", "",
             f"- command: `python benchmarks/zoo.py {' '.join(argv)}`",
             f"- date: {date.today().isoformat()}",
             f"- machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread per run",
             "- each cell: test accuracy (%) after the last epoch (mean over seeds), its gap to backprop, and the "
             "largest growth of a boundary's activation RMS over the run; '<' marks a result at or below the frozen "
             "floor", "- variants: " + "; ".join(f"{k}: {v}" for k, v in TOKENS.items()), "",
             head, "|" + "---|" * (6 + len(variants))]
    js = []
    for ds, model, k, method in cells:
        bp = accs(dataset=ds, model=model, method="backprop")
        fl = accs(dataset=ds, model=model, stages=k, method="frozen")
        row, cols = {"dataset": ds, "model": model, "stages": k, "method": method, "backprop": bp, "floor": fl}, []
        for v in variants:
            xs = accs(dataset=ds, model=model, stages=k, method=method, variant=v)
            row[v] = xs
            if not xs:
                cols.append("-")
                continue
            m = statistics.mean(xs)
            gap = f" ({m - statistics.mean(bp):+.2f})" if bp else ""
            below = "<" if fl and m <= statistics.mean(fl) else ""
            cols.append(f"{below}{m:.2f}{gap} {drift(dataset=ds, model=model, stages=k, method=method, variant=v)}")
        js.append(row)
        lines.append(f"| {ds} | {model} | {k} | {method} | {fmt(bp)} | {fmt(fl)} | " + " | ".join(cols) + " |")
    # The same, one row per variant: reads better with many variants. '*' marks the best in a column.
    for method in sorted({c[3] for c in cells}):
        cols = [c for c in cells if c[3] == method]
        names = " | ".join(f"{m} K={k}" + ("" if ds == "mnist" else f" ({ds})") for ds, m, k, _ in cols)
        lines += ["", f"### {method}: one row per variant", "",
                  f"| variant | {names} | mean gap |",
                  "|---|" + "---|" * (len(cols) + 1)]
        baselines = [("backprop", {"method": "backprop"}), ("frozen floor", {"method": "frozen"})]
        if any(r.method == "dgl" for r in runs):
            baselines.append(("DGL (baseline: the auxiliary classifiers alone)", {"method": "dgl"}))
        for label, kw in baselines:
            vals = [accs(dataset=ds, model=m, **({"stages": k} if label != "backprop" else {}), **kw)
                    for ds, m, k, _ in cols]
            lines.append(f"| {label} | " + " | ".join(f"{statistics.mean(v):.2f}" if v else "-" for v in vals) + " | |")
        table = {v: [accs(dataset=ds, model=m, stages=k, method=method, variant=v) for ds, m, k, _ in cols]
                 for v in variants}
        best = [max((statistics.mean(table[v][i]) for v in variants if table[v][i]), default=None)
                for i in range(len(cols))]
        for v in variants:
            out, gaps = [], []
            for i, (ds, m, _k, _) in enumerate(cols):
                xs, bp = table[v][i], accs(dataset=ds, model=m, method="backprop")
                if not xs:
                    out.append("-")
                    continue
                mean = statistics.mean(xs)
                if bp:
                    gaps.append(mean - statistics.mean(bp))
                out.append(f"{mean:.2f}{'*' if mean == best[i] else ''}")
            full = len(gaps) == len(cols)
            lines.append(f"| {v} | " + " | ".join(out) + f" | {statistics.mean(gaps):+.2f} |" if full else
                         f"| {v} | " + " | ".join(out) + " | - |")
        # Training accuracy beside it: a gap that is there on the training set too is one of fitting, not of
        # generalising.
        train = {label: [accs("train", dataset=ds, model=m, **({"stages": k} if label != "backprop" else {}), **kw)
                         for ds, m, k, _ in cols] for label, kw in baselines[:2]}
        train.update({v: [accs("train", dataset=ds, model=m, stages=k, method=method, variant=v)
                          for ds, m, k, _ in cols] for v in variants})
        if any(x for vals in train.values() for x in vals):
            lines += ["", f"{method}: training accuracy after the last epoch ({TRAIN_EVAL:,} training examples, eval "
                      "mode), mean over seeds; '-' where the runs predate its recording", "",
                      f"| variant | {names} |", "|---|" + "---|" * len(cols)]
            lines += [f"| {label} | " + " | ".join(f"{statistics.mean(x):.2f}" if x else "-" for x in vals) + " |"
                      for label, vals in train.items()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    summary = {"command": argv, "variants": variants, "date": date.today().isoformat(), "rows": js}
    (RESULTS / f"{name}.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("\n".join(lines))


def diagnostics(records: dict[Run, dict], runs: list[Run], name: str, argv: list[str],
                steps: tuple[int, ...] = (100, 300)) -> None:
    """Per DNI/cDNI run with probes: at steps 100, 300 and the last, per interface (lowest first): cosine to the
    true gradient (activation and parameter space), |p| / |true|, the share of |p|^2 and of |true|^2 along h,
    boundary RMS relative to step 0, and each lower stage's step size relative to backprop's at the same step."""
    base = {(r.dataset, r.model): records[r] for r in runs if r.method == "backprop" and r in records}
    seen, lines = set(), [
        "# Zoo diagnostics", "", f"- command: `python benchmarks/zoo.py {' '.join(argv)}`",
        f"- date: {date.today().isoformat()}",
        f"- per interface, lowest first; steps {' / '.join(map(str, steps))} / last", "",
        "| run | step | cos | param cos | p/true | p along h | true along h | p batch-mean share "
        "| true batch-mean share | RMS / RMS(0) | step / backprop's |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]

    def cells(xs: list) -> str:
        return ", ".join("-" if x is None else f"{x:.2f}" for x in xs)

    for r in runs:
        if r.key in seen or r not in records or r.method in SHARED or r.method == "backprop":
            continue
        seen.add(r.key)
        diag = [d for d in records[r]["diagnostics"] if "geometry" in d]
        if not diag:
            continue
        bp = {d["step"]: d for d in base.get((r.dataset, r.model), {}).get("diagnostics", [])}
        for d in [x for x in diag if x["step"] in steps] + [diag[-1]]:
            g = [x or {} for x in d["geometry"]]
            ratio = [None if d.get("rel_step", [None])[i] is None or d["step"] not in bp
                     or not bp[d["step"]].get("rel_step") else d["rel_step"][i] / bp[d["step"]]["rel_step"][i]
                     for i in range(len(g))]
            rms = [x / y for x, y in zip(d["rms"], diag[0]["rms"], strict=True)]
            lines.append(f"| {r.key} | {d['step']} | {cells(d.get('cosine', []))} | "
                         f"{cells([x.get('param_cos') for x in g])} | {cells([x.get('p_over_true') for x in g])} | "
                         f"{cells([x.get('p_along_h') for x in g])} | {cells([x.get('true_along_h') for x in g])} | "
                         f"{cells([x.get('p_mean_share') for x in g])} | "
                         f"{cells([x.get('true_mean_share') for x in g])} | {cells(rms)} | {cells(ratio)} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(zoo.SPECS),
                   help="zoo models, or the held-out ones that no default was chosen on (benchmarks/holdout.py: "
                        f"{', '.join(holdout.SPECS)})")
    p.add_argument("--datasets", nargs="+", default=["mnist", "fashion-mnist"])
    p.add_argument("--stages", nargs="+", type=int, default=[2, 4])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--variant", nargs="+", default=["library"],
                   help="library (DNI.build), default (defaults.default_interface), or '+'-joined tokens: "
                   + "; ".join(f"{k}: {v}" for k, v in TOKENS.items())
                   + ". Several: an ablation table, one column per variant")
    p.add_argument("--backprop-lr", type=float, default=1e-3,
                   help="backprop's Adam learning rate: is a gain from a higher rate for the lower stages one that "
                        "backprop would get too?")
    p.add_argument("--diagnose-every", type=int, default=100)
    p.add_argument("--probe", action="store_true", help="also record the synthetic gradient's geometry and step sizes")
    p.add_argument("--jobs", type=int, default=1, choices=[1, 2])
    p.add_argument("--runs-root", default="/work/runs-zoo")
    p.add_argument("--report", default="zoo", help="write benchmarks/results/REPORT.md and .json")
    p.add_argument("--no-run", action="store_true", help="only rebuild the report from the runs already done")
    p.add_argument("--diagnostics", action="store_true",
                   help="report the probes (--probe runs) instead of accuracies: cosines, norms, drift, step sizes")
    p.add_argument("--data-dir", default=None)
    argv = sys.argv[1:] if argv is None else argv
    a = p.parse_args(argv)
    try:
        for v in a.variant:
            parse_variant(v)
    except ValueError as e:
        p.error(str(e))
    root = Path(a.runs_root)
    runs = [Run(m, d, k, meth, s, a.epochs, v, a.backprop_lr) for v in a.variant for d in a.datasets for m in a.models
            for k in a.stages for meth in a.methods for s in a.seeds]
    unique = list({r.key: r for r in runs}.values())
    todo = [r for r in unique if not (root / f"{r.key}.json").exists()]
    if not a.no_run and todo:
        print(f"{len(todo)} runs to do, {len(unique) - len(todo)} done", flush=True)
        args = (root, a.diagnose_every, a.probe, a.data_dir)
        if a.jobs == 1:
            for r in todo:
                run_and_save(r, *args)
        else:
            with ProcessPoolExecutor(a.jobs, mp_context=get_context("spawn")) as pool:
                for f in [pool.submit(run_and_save, r, *args) for r in todo]:
                    f.result()
    records = {r: json.loads((root / f"{r.key}.json").read_text()) for r in runs if (root / f"{r.key}.json").exists()}
    if a.diagnostics:
        diagnostics(records, runs, a.report, argv)
    elif len(a.variant) == 1:
        report(records, runs, a.report, argv, a.variant[0])
    else:
        ablation(records, runs, a.report, argv, a.variant)


if __name__ == "__main__":
    main()
