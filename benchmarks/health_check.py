"""Do the health warnings fire where a stage does not learn, and stay quiet where it does?

Trains unseen user models (`benchmarks/user_trial.py`'s, and `custom_synth.py`'s tanh MLP with the README's
synthesizer) cut into K stages, at `DNI.build`'s defaults, with the library's health sampling every 100
steps, and records per interface, over the last 10 samples: the median relative error of the synthesizer's
prediction and of what its stage applied (the prediction centred, scaled and mixed with the local loss's
gradient), the health warnings the run gave (they judge the applied gradient), and the ones a judge of the
prediction alone would have given (the rule before the eighth session), beside the test accuracy and the
frozen floor of user-trial.md.

    python benchmarks/health_check.py --epochs 2 --jobs 2    # writes benchmarks/results/health-check.md
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shlex
import statistics
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from multiprocessing import get_context
from pathlib import Path

import torch

import synthgrad as sg
from synthgrad.health import Health, HealthWarning, rms

sys.path.insert(0, str(Path(__file__).resolve().parent))
from custom_synth import MySynthesizer, fit  # noqa: E402  (sibling benchmarks: the same models and loop)
from custom_synth import model as tanh_mlp  # noqa: E402
from user_trial import MODELS, build  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
METHODS = ("cdni", "cdni, no local loss", "dni", "backprop")


def boundary_rms(stages: list[torch.nn.Module], x: torch.Tensor) -> list[float]:
    """The RMS of each boundary's activation on x, the stages in eval mode (copies: training is left alone)."""
    out, h = [], x
    with torch.no_grad():
        for s in copy.deepcopy(stages)[:-1]:
            h = s.eval()(h)
            out.append(rms(h))
    return out


class QuietHealth(Health):
    """The library's judge, recording what it would warn about instead of warning."""

    def _warn(self, key: str, message: str) -> None:
        self.warned.add(key)


def run(name: str, method: str, stages_n: int, epochs: int, seed: int) -> dict:
    """Train one cell and return its accuracy, the median errors of the last window and the warnings."""
    torch.set_num_threads(1)
    ds = sg.load_dataset("mnist")
    torch.manual_seed(seed)
    net = tanh_mlp(ds.num_classes) if name == "tanh-mlp" else build(name, ds.num_classes)
    stages = sg.cut(net, stages_n, sample=ds.train_x[:2])
    schedule = sg.cosine_schedule(epochs * (len(ds.train_x) // 128))
    conditioned = method.startswith("cdni")
    local = False if "no local" in method else None
    start = boundary_rms(stages, ds.train_x[:512])
    if method == "backprop":  # for scale: how much the activations grow with true gradients
        rule: sg.StepRule = sg.Backprop(stages, schedule=schedule)
    elif name == "tanh-mlp":  # the README's custom synthesizer, first-class: the same interface options
        width = stages[0](ds.train_x[:2]).shape[1]
        interfaces = [sg.BackwardInterface(MySynthesizer(width, ds.num_classes), sg.adam(1e-3), local_loss=local)
                      for _ in stages[:-1]]
        rule = sg.DNI(stages, interfaces, conditioned=conditioned, num_classes=ds.num_classes, schedule=schedule)
    else:
        rule = sg.DNI.build(stages, sample=ds.train_x[:2], conditioned=conditioned, num_classes=ds.num_classes,
                            synth_local=local if conditioned else None, schedule=schedule)
    prediction_judge = QuietHealth()  # the same schedule, fed the prediction's error instead of the applied one's
    pred_err: list[list[float]] = [[] for _ in stages[:-1]]
    applied_err: list[list[float]] = [[] for _ in stages[:-1]]
    param_cos: list[list[float]] = [[] for _ in stages[:-1]]
    param_err: list[list[float]] = [[] for _ in stages[:-1]]

    def sample(stats: dict) -> None:
        if "grad_rel_error" not in stats:
            return
        for k in range(len(pred_err)):
            pred_err[k].append(stats["grad_rel_error"][k])
            applied_err[k].append(stats["applied_rel_error"][k])
            if stats["param_cosine"][k] is not None:
                param_cos[k].append(stats["param_cosine"][k])
                param_err[k].append(stats["param_rel_error"][k])
        prediction_judge.observe(rule.steps - 1, stats["grad_rel_error"], stats["act_rms"], conditioned)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", HealthWarning)
        acc = fit(rule, ds, epochs, seed, on_step=sample)
    given = [str(w.message) for w in caught if issubclass(w.category, HealthWarning)]
    useless = [int(m.split("stage ")[1].split()[0]) for m in given if "no better than nothing" in m]
    runaway = [int(m.split("stage ")[1].split()[0]) for m in given if "has grown" in m]
    growth = [end / first for end, first in zip(boundary_rms(stages, ds.train_x[:512]), start, strict=True)]
    return {"acc": acc, "pred": [statistics.median(e[-10:]) for e in pred_err if e],
            "applied": [statistics.median(e[-10:]) for e in applied_err if e], "growth": growth,
            "param_cos": [statistics.median(e[-10:]) for e in param_cos if e],
            "param_cos_all": [statistics.median(e[5:]) for e in param_cos if len(e) > 5],
            "param_err": [statistics.median(e[-10:]) for e in param_err if e],
            "useless": useless, "runaway": runaway,
            "useless_by_prediction": sorted(int(w.split("-")[1]) + 1 for w in prediction_judge.warned
                                            if w.startswith("useless"))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=[*MODELS, "tanh-mlp"], default=[*MODELS, "tanh-mlp"])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, choices=[1, 2], help="runs at a time, one thread each")
    p.add_argument("--out", default="health-check", help="report name in benchmarks/results")
    a = p.parse_args()
    # The README's synthesizer reads the label: DNI (no label) cannot run it.
    cells = [(name, m) for name in a.models for m in a.methods if not (name == "tanh-mlp" and m == "dni")]
    args = [(name, m, a.stages, a.epochs, a.seed) for name, m in cells]
    if a.jobs == 1:
        results = [run(*x) for x in args]
    else:
        with ProcessPoolExecutor(a.jobs, mp_context=get_context("spawn")) as pool:
            results = list(pool.map(run, *zip(*args, strict=True)))

    def fmt(xs: list[float]) -> str:
        return ", ".join(f"{x:.2f}" for x in xs) or "-"

    def stages(xs: list[int]) -> str:
        return ", ".join(map(str, xs)) or "none"

    rows = []
    for (name, m), r in zip(cells, results, strict=True):
        rows.append(f"| {name} | {m} | {r['acc']:.2f} | {fmt(r['pred'])} | {fmt(r['applied'])} | "
                    f"{stages(r['useless'])} | {stages(r['useless_by_prediction'])} | {stages(r['runaway'])} | "
                    f"{fmt(r['growth'])} | {fmt(r['param_cos'])} | {fmt(r['param_cos_all'])} | "
                    f"{fmt(r['param_err'])} |")
        print(rows[-1], flush=True)
    lines = ["# Health warnings on unseen user models: what the stage applies, against what the synthesizer predicts",
             "", f"- command: `python benchmarks/health_check.py {shlex.join(sys.argv[1:])}`",
             f"- date: {date.today().isoformat()}; machine: {platform.machine()}, {os.cpu_count()} cores, "
             f"torch {torch.__version__}, 1 thread per run, {a.jobs} at a time",
             f"- MNIST, {a.stages} stages, {a.epochs} epochs, seed {a.seed}, batch 128, Adam 1e-3 with a cosine "
             "schedule, `DNI.build`'s defaults (tanh-mlp: the README's MySynthesizer); health sampled every 100 "
             "steps, judged from step 500 over windows of 10 samples",
             "- relative error |g - true| / |true| per interface (interface k above stage k), median of the last "
             "10 samples: of the synthesizer's prediction, and of the gradient its stage applied; >= 1 is no "
             "better than nothing",
             "- warned: the stages named by the run's \"no better than nothing\" warnings (they judge the applied "
             "gradient); by prediction: those a judge of the prediction alone would have named; runaway: the "
             "boundaries named by activation-growth warnings; boundary RMS: on the first 512 training images, the "
             "stages in eval mode, after training over before (backprop: for scale)",
             "- parameter cosine: of the stage's parameter gradient under the gradient it applied against under the "
             "true one (what its update followed), median of the last 10 samples, and of every sample from step 500; "
             "parameter error: the relative error of that parameter gradient, median of the last 10 samples", "",
             "| model | method | test accuracy (%) | prediction's error | applied error | warned | by prediction "
             "| runaway | boundary RMS, end / start | parameter cosine, last 10 | parameter cosine, from step 500 "
             "| parameter error |", "|---|---|---|---|---|---|---|---|---|---|---|---|", *rows]
    (RESULTS / f"{a.out}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
