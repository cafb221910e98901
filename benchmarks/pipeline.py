"""Benchmark: throughput of the DNI pipeline against backprop (1 and all threads), the locked pipeline and GPipe."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from synthgrad import data, models
from synthgrad.config import TrainConfig
from synthgrad.engine.launch import free_port
from synthgrad.engine.process import pin_to_cores, set_up_stage_process
from synthgrad.metrics import read_metrics
from synthgrad.pipeline import run_pipeline
from synthgrad.trainer import build_rule, evaluate

METHODS = ["backprop-1t", "backprop-all", "locked-pipeline", "gpipe", "dni-pipeline", "dni-pipeline-linear"]
DECOUPLED = ("dni-pipeline", "dni-pipeline-linear")
LABELS = {"backprop-1t": "backprop, 1 process, 1 thread", "backprop-all": "backprop, 1 process, {n} threads",
          "locked-pipeline": "locked pipeline, {k} processes", "gpipe": "GPipe ({mb} micro-batches), {k} processes",
          "dni-pipeline": "{dm} pipeline, low-rank synthesizer, {k} processes",
          "dni-pipeline-linear": "{dm} pipeline, linear synthesizer, {k} processes"}


def make_cfg(a: argparse.Namespace, method: str, width: int, linear: bool = False, **kw) -> TrainConfig:
    """The run config of one method; `linear`: the decoupled pipeline with a linear (width x width) synthesizer."""
    return TrainConfig(model=a.model, method=method, width=width, batch_size=a.batch_size, stages=a.stages,
                       synth_hidden=0 if linear else a.synth_hidden, synth_width=a.synth_width,
                       synth_lr=a.synth_lr, epochs=1, device=a.device,
                       log_every=min(10, max(1, a.steps // 4)), seed=a.seed, **kw).resolve()


def pipeline_cfg(a: argparse.Namespace, name: str, width: int, **kw) -> TrainConfig:
    """The run config of a pipeline-engine row: the locked pipeline runs backprop, the others the DNI method."""
    method = "backprop" if name == "locked-pipeline" else a.dni_method
    return make_cfg(a, method, width, linear=name == "dni-pipeline-linear", threads=a.threads_per_stage, **kw)


@contextlib.contextmanager
def pinned(threads: int) -> Iterator[None]:
    """Run this process on its first `threads` cores, as the pipeline engine pins each stage process
    (pin_to_cores): pinning speeds up a single process too (+3% for fcn-4 width 1024, 1 thread), so every
    method gets it."""
    before = os.sched_getaffinity(0)
    pin_to_cores(0, 1, threads)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def single_process(a: argparse.Namespace, ds: data.Dataset, width: int, threads: int) -> float:
    """samples/s of single-process backprop over the same stages, timed after `warmup` steps."""
    with pinned(threads):
        return _single_process(a, ds, width, threads)


def _single_process(a: argparse.Namespace, ds: data.Dataset, width: int, threads: int) -> float:
    torch.set_num_threads(threads)
    cfg = make_cfg(a, "backprop", width)
    dev = torch.device(a.device)
    rule = build_rule(cfg, ds.input_shape, ds.num_classes).to(dev).train()
    order = data.epoch_order(len(ds.train_y), cfg.seed, 0).to(dev)
    t0 = 0.0
    for i, (xb, yb) in enumerate(data.batches(ds.train_x.to(dev), ds.train_y.to(dev), cfg.batch_size, order)):
        if i == a.warmup:
            sync(dev)
            t0 = time.perf_counter()
        if i == a.warmup + a.steps:
            break
        rule.step(xb, yb)
    sync(dev)
    return a.steps * cfg.batch_size / (time.perf_counter() - t0)


def sync(dev: torch.device) -> None:
    """Wait for the GPU's queued kernels, so that a timer measures them."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def pipeline(a: argparse.Namespace, ds: data.Dataset, width: int, name: str, tmp: Path) -> tuple[float, dict]:
    """samples/s of the pipeline engine, from the last stage's step records after the warmup steps."""
    cfg = pipeline_cfg(a, name, width, max_steps=a.warmup + a.steps)
    run = tmp / f"{name}-{width}-{time.monotonic_ns()}"
    run_pipeline(cfg, ds, run, quiet=True)
    recs = read_metrics(run / "metrics.jsonl")
    steps = [r for r in recs if r["kind"] == "step" and r["step"] >= a.warmup]
    first, last = steps[0], steps[-1]
    sps = (last["step"] - first["step"]) * cfg.batch_size / (last["wall_time_s"] - first["wall_time_s"])
    epoch = [r for r in recs if r["kind"] == "epoch"][-1]
    profile = {k: epoch.get(k) for k in ("stage_busy_s", "stage_idle_s", "stage_synth_s", "staleness",
                                         "staleness_max")}
    return sps, profile


def _gpipe_rank(rank: int, world: int, port: int, cfg_dict: dict, ds: data.Dataset, a: dict, out: str) -> None:
    """One rank of a torch.distributed.pipelining schedule over the same stages, data and lr schedule.

    a["epochs"] == 0: time a["steps"] steps after a["warmup"] (the last rank writes {"sps"}). Otherwise train
    a["epochs"] epochs; every a["eval_every"] steps (0: none) and at each epoch's end rank 0 gathers the stages
    and evaluates the composed network, as the other methods do (rank 0 writes {"epochs": [{kind, epoch, step,
    test_accuracy, wall_time_s, eval_time_s}]}, the records of metrics.jsonl).
    """
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    set_up_stage_process(rank, world, a["threads_per_stage"])  # as every stage of the pipeline engine does
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = TrainConfig.from_dict(cfg_dict)
        rule = build_rule(cfg, ds.input_shape, ds.num_classes).train()
        module = rule.stages[rank]
        stage = PipelineStage(module, rank, world, torch.device("cpu"))
        sched_cls = Schedule1F1B if a["schedule"] == "1f1b" else ScheduleGPipe
        sched = sched_cls(stage, n_microbatches=a["microbatches"], loss_fn=F.cross_entropy)
        opt = rule.optimizers[rank]
        timing = a["epochs"] == 0
        total = cfg.total_steps(len(ds.train_y)) if not timing else a["warmup"] + a["steps"]
        per_epoch = data.num_batches(len(ds.train_y), cfg.batch_size)
        records, step = [], 0

        def evaluate_here(kind: str, epoch: int) -> None:
            """Rank 0 evaluates the composed network, its time included in the wall time, as for the others."""
            t_eval = time.perf_counter()
            states = [None] * world if rank == 0 else None
            dist.gather_object(module.state_dict(), states, dst=0)
            if rank == 0:
                for st, saved in zip(rule.stages, states, strict=True):
                    st.load_state_dict(saved)
                acc, _ = evaluate(nn.Sequential(*rule.stages), ds.test_x, ds.test_y, cfg.eval_batch_size)
                now = time.perf_counter()
                records.append({"kind": kind, "epoch": epoch, "step": step, "test_accuracy": acc,
                                "wall_time_s": round(now - t0, 3), "eval_time_s": round(now - t_eval, 3)})

        dist.barrier()
        t0 = time.perf_counter()
        for epoch in range(1 if timing else a["epochs"]):
            order = data.epoch_order(len(ds.train_y), cfg.seed, epoch)
            for xb, yb in data.batches(ds.train_x, ds.train_y, cfg.batch_size, order):
                if timing and step == a["warmup"]:
                    dist.barrier()
                    t0 = time.perf_counter()
                if timing and step == total:
                    break
                if cfg.schedule != "constant":
                    rule.set_lr_factor(cfg.lr_factor(step, total))
                if rank == 0:
                    sched.step(xb)
                elif rank == world - 1:
                    sched.step(target=yb, losses=[])
                else:
                    sched.step()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if step == 0:
                    # The first step inferred the stage's shapes by a forward pass on uninitialised memory, in
                    # train mode: that poisoned the BN running statistics that evaluation uses. Start them anew.
                    for m in module.modules():
                        if isinstance(m, nn.modules.batchnorm._BatchNorm):
                            m.reset_running_stats()
                step += 1
                if not timing and a["eval_every"] and step % a["eval_every"] == 0 and step % per_epoch:
                    evaluate_here("eval", epoch)
            if not timing:
                evaluate_here("epoch", epoch)
        dist.barrier()
        if timing and rank == world - 1:
            Path(out).write_text(json.dumps({"sps": a["steps"] * cfg.batch_size / (time.perf_counter() - t0)}))
        elif not timing and rank == 0:
            Path(out).write_text(json.dumps({"epochs": records}))
    finally:
        dist.destroy_process_group()


def gpipe(a: argparse.Namespace, ds: data.Dataset, width: int, tmp: Path, epochs: int = 0) -> dict:
    """Run the GPipe baseline: {"sps"} when epochs == 0, else {"epochs": its evaluation records}."""
    import torch.multiprocessing as mp

    if a.device != "cpu":
        raise RuntimeError("the GPipe baseline runs on CPU only here (torch.distributed.pipelining over gloo)")
    cfg = make_cfg(a, "backprop", width)
    cfg.epochs = max(1, epochs)
    out = tmp / f"gpipe-{width}-{epochs}-{time.monotonic_ns()}.json"
    opts = {"threads_per_stage": a.threads_per_stage, "schedule": a.schedule, "microbatches": a.microbatches,
            "warmup": a.warmup, "steps": a.steps, "epochs": epochs, "eval_every": a.tta_eval_every}
    mp.spawn(_gpipe_rank, args=(a.stages, free_port(), cfg.to_dict(), ds, opts, str(out)), nprocs=a.stages)
    return json.loads(out.read_text())


def time_to_accuracy(a: argparse.Namespace, ds: data.Dataset, method: str, tmp: Path) -> dict:
    """When the method first reaches --target-accuracy, from its evaluations (--tta-evals-per-epoch per epoch).

    {"seconds": training seconds (the wall time less the pauses for evaluation) at the first evaluation at or
    above the target, None if never; "wall_s": the same moment's wall time, evaluations included; "epochs":
    epochs of data seen by then; "curve": [(epochs of data, test accuracy, training seconds)] of every
    evaluation; "epoch_ends": [(test accuracy, training seconds)] of the epoch-end evaluations}."""
    kw = {"eval_every": a.tta_eval_every, "checkpoint_every": 10**9}  # no mid-epoch checkpoints
    if method == "gpipe":
        records = gpipe(a, ds, a.width, tmp, epochs=a.tta_epochs)["epochs"]
    else:
        run = tmp / f"tta-{method}"
        if method.startswith("backprop"):
            from synthgrad.trainer import Progress, Trainer

            threads = 1 if method == "backprop-1t" else a.threads_all
            torch.set_num_threads(threads)
            cfg = make_cfg(a, "backprop", a.width, **kw)
            cfg.epochs = a.tta_epochs
            run.mkdir()
            trainer = Trainer(cfg, ds, run, progress=Progress(enabled=False))
            trainer.start()
            with pinned(threads):
                trainer.fit()
        else:
            cfg = pipeline_cfg(a, method, a.width, **kw)
            cfg.epochs = a.tta_epochs
            run_pipeline(cfg, ds, run, quiet=True)
        records = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] in ("eval", "epoch")]
    per_epoch = data.num_batches(len(ds.train_y), a.batch_size)
    curve, paused, first = [], 0.0, None
    for r in sorted(records, key=lambda r: (r["step"], r["kind"] == "epoch")):
        paused += r["eval_time_s"]
        point = (r["step"] / per_epoch, r["test_accuracy"], r["wall_time_s"] - paused)
        curve.append(point)
        if first is None and r["test_accuracy"] >= a.target_accuracy:
            first = (point, r["wall_time_s"])
    return {"seconds": first[0][2] if first else None, "wall_s": first[1] if first else None,
            "epochs": first[0][0] if first else None, "curve": curve,
            "epoch_ends": [(acc, t) for ep, acc, t in curve if ep == int(ep) and ep > 0]}


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?")
    except (OSError, subprocess.SubprocessError):
        model = platform.processor() or "?"
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    if torch.cuda.is_available():
        model += f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return (f"{os.cpu_count()} cores (nproc {len(os.sched_getaffinity(0))}), {model}, torch {torch.__version__}; "
            f"load average at the end {load} (the machine is shared: other jobs ran during the measurement)")


def measure_once(a: argparse.Namespace, ds: data.Dataset, width: int, tmp: Path, m: str) -> dict:
    """One throughput measurement of method `m`: {"sps"} (and the stage profile, for the engine's pipelines)."""
    if m == "backprop-1t":
        return {"sps": single_process(a, ds, width, 1)}
    if m == "backprop-all":
        return {"sps": single_process(a, ds, width, a.threads_all)}
    if m == "gpipe":
        return gpipe(a, ds, width, tmp)
    sps, prof = pipeline(a, ds, width, m, tmp)
    return {"sps": sps, "profile": prof}


def measure(a: argparse.Namespace, ds: data.Dataset, width: int, tmp: Path, methods: list[str]) -> dict:
    """Median samples/s of each method over a.repeats rounds; the methods take turns within a round, so a
    drift in the shared machine's speed reaches every method alike."""
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for r in range(a.repeats):
        for m in methods:
            print(f"width {width}, round {r + 1}/{a.repeats}: {m} ...", file=sys.stderr, flush=True)
            try:
                runs[m].append(measure_once(a, ds, width, tmp, m))
            except Exception as e:  # noqa: BLE001 (a baseline that cannot run is reported, not fatal)
                traceback.print_exc()
                runs[m].append({"sps": None, "error": f"{type(e).__name__}: {e}"})
            print(f"  {runs[m][-1]}", file=sys.stderr, flush=True)
    res: dict[str, dict] = {}
    for m, got in runs.items():
        ok = [g for g in got if g.get("sps")]
        if not ok:
            res[m] = got[-1]
            continue
        sps = [g["sps"] for g in ok]
        median = statistics.median(sps)
        # The stage profile of the run nearest the median.
        nearest = min(ok, key=lambda g: abs(g["sps"] - median))
        res[m] = {"sps": median, "all_sps": sps, "profile": nearest.get("profile")}
    return res


def plot(path: Path, a: argparse.Namespace, main_res: dict, sweeps: dict[str, dict], tta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 1 + len(sweeps) + bool(tta)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    ax = axes[0][0]
    names = [m for m in METHODS if main_res.get(m, {}).get("sps")]
    vals = [main_res[m]["sps"] for m in names]
    colors = dict(zip(METHODS, ["#888", "#555", "#c84", "#48c", "#2a2", "#7c4"], strict=True))
    bars = ax.bar(range(len(names)), vals, color=[colors[m] for m in names])
    base = main_res["backprop-1t"]["sps"]
    for b, v in zip(bars, vals, strict=True):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v / base:.2f}x", ha="center", va="bottom")
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_ylabel("samples/s")
    ax.set_title(f"{a.model} width {a.width}, batch {a.batch_size}, K={a.stages}")
    i = 1
    for what, sweep in sweeps.items():  # "width" or "batch size": {value: {method: result}}
        ax = axes[0][i]
        i += 1
        values = sorted(sweep)
        for m in METHODS:
            ys = [sweep[v].get(m, {}).get("sps") for v in values]
            base_v = [sweep[v]["backprop-1t"]["sps"] for v in values]
            pts = [(v, y / b) for v, y, b in zip(values, ys, base_v, strict=True) if y]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=m, color=colors[m])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("layer width" if what == "width" else "batch size")
        ax.set_ylabel("throughput / backprop 1 thread")
        ax.axhline(1, color="k", lw=0.5)
        ax.legend(fontsize=8)
        ax.set_title(f"{what} sweep" + (f" (width {a.width})" if what != "width" else f" (batch {a.batch_size})"))
    if tta:
        ax = axes[0][i]
        for m, t in tta.items():
            pts = [(sec, 100 * acc) for _, acc, sec in t["curve"]]
            ax.plot(*zip(*pts, strict=True), marker=".", color=colors[m],
                    label=m + ("" if t["seconds"] is None else f" ({t['seconds']:.1f} s)"))
        ax.axhline(100 * a.target_accuracy, color="k", lw=0.5)
        ax.set_ylim(100 * a.target_accuracy - 4, 100)
        ax.set_xlabel("training seconds (evaluation pauses left out)")
        ax.set_ylabel("test accuracy (%)")
        ax.legend(fontsize=8)
        ax.set_title(f"time to {a.target_accuracy:.0%} test accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def cut_shares(model: str, width: int, stages: int, input_shape: tuple[int, ...], num_classes: int) -> list[float]:
    """Each stage's share of a training step's multiply-accumulates under the engine's cut (models.partition).

    The busiest stage bounds the pipeline: with a free engine it runs at most 1 / max(share) x single-process
    backprop on one core.
    """
    costs = models.step_costs(models.build_layers(model, input_shape, num_classes, width), input_shape)
    bounds = models.cut_bounds(costs, stages)
    return [sum(costs[i:j]) / sum(costs) for i, j in itertools.pairwise(bounds)]


def write_report(path: Path, a: argparse.Namespace, argv: list[str], main_res: dict, sweeps: dict[str, dict], tta: dict,
                 elapsed: float) -> None:
    n = a.threads_all
    base = main_res["backprop-1t"]["sps"]
    dm = {"dni": "DNI", "cdni": "cDNI"}[a.dni_method]
    lines = [
        f"# Pipeline engine benchmark: K = {a.stages} stages on {a.device}", "",
        f"- date: {datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {machine()}",
        f"- command: `{' '.join(['python', 'benchmarks/pipeline.py', *argv])}` ({elapsed:.0f} s)",
        f"- model: `{a.model}` width {a.width}, batch {a.batch_size}, cut into {a.stages} cost-balanced stages; "
        f"{a.steps} timed steps after {a.warmup} warm-up steps; the pipelines run {a.threads_per_stage} thread(s) "
        f"per process, so every method uses the same {n} cores (backprop 1 thread uses one)",
        f"- decoupled pipelines: {dm}, synthesizer learning rate {a.synth_lr}; the low-rank synthesizer has "
        f"{a.synth_hidden} hidden layer(s) of width {a.synth_width} (Linear + BN + ReLU), so that the stage below "
        "spends its time on its own layers; the linear synthesizer (width x width, the paper's) learns faster but "
        "costs as much as a layer, run twice per step: once to predict, once more to regress onto the target "
        "when it arrives",
        f"- throughput: the median of {a.repeats} rounds; in each round every method runs once, in turn, so that "
        "a drift in the shared machine's speed reaches all of them (all rounds in brackets)",
        "- why this model: at width >= 1024 one step is tens of milliseconds of matrix products while a message "
        "is one [batch, width] float32 tensor (0.5 MB at width 1024) over loopback gloo, which costs each "
        "stage about 0.8 ms of its core a step for both directions (width 1024, benchmarks/link_cost.py) "
        "against 20 to 25 ms of compute, so compute dominates communication; and the cut at a layer boundary "
        "gives the stages " + " / ".join(f"{x:.0%}" for x in a.cut_shares) + " of a training step's "
        "multiply-accumulates, so even a free engine stops at " + f"{1 / max(a.cut_shares):.2f}x backprop on one "
        f"core (at width {a.width}: " + ", ".join(f"{m} {b:.2f}x" for m, b in a.fcn_bounds.items())
        + "; fcn-6 is the paper's FCN that cuts most evenly, so the benchmark runs it by default)", "",
        "| method | samples/s | vs backprop 1 thread |", "|---|---:|---:|"]
    for m in METHODS:
        r = main_res.get(m, {})
        label = LABELS[m].format(n=n, k=a.stages, mb=a.microbatches, dm=dm)
        if r.get("sps"):
            spread = ", ".join(f"{v:,.0f}" for v in r.get("all_sps", []))
            lines.append(f"| {label} | {r['sps']:,.0f} ({spread}) | {r['sps'] / base:.2f}x |")
        else:
            lines.append(f"| {label} | failed: {r.get('error', '?')} | |")
    for d in DECOUPLED:
        sps = main_res.get(d, {}).get("sps")
        if sps:
            lines += ["", f"{d} against the others: " + ", ".join(
                f"{sps / main_res[m]['sps']:.2f}x {m}" for m in METHODS
                if m not in DECOUPLED and main_res[m].get("sps"))]
    lines += ["", "Where each pipeline stage's time went (seconds over the whole run, warm-up included; busy = "
              "computing, idle = waiting for a peer, synth = synthesizer updates, a part of busy or idle):", ""]
    for m in ("locked-pipeline", *DECOUPLED):
        prof = main_res.get(m, {}).get("profile")
        if prof:
            lines.append(f"- {m}: busy {prof['stage_busy_s']}, idle {prof['stage_idle_s']}, synth "
                         f"{prof['stage_synth_s']}, target staleness mean {prof['staleness']} "
                         f"max {prof['staleness_max']}")
    for what, sweep in sweeps.items():
        fixed = f"batch {a.batch_size}" if what == "width" else f"width {a.width}"
        lines += ["", f"## {what.capitalize()} sweep ({fixed}; samples/s; ratio to backprop 1 thread)", "",
                  f"| {what} | " + " | ".join(METHODS) + " |", "|---:|" + "---:|" * len(METHODS)]
        for v in sorted(sweep):
            b = sweep[v]["backprop-1t"]["sps"]
            cells = [f"{sweep[v][m]['sps']:,.0f} ({sweep[v][m]['sps'] / b:.2f}x)" if sweep[v].get(m, {}).get("sps")
                     else "-" for m in METHODS]
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
    if tta:
        lines += ["", f"## Wall time to {a.target_accuracy:.0%} MNIST test accuracy (at most {a.tta_epochs} epochs)",
                  "", f"Each run evaluates the test set {a.tta_evals_per_epoch} times per epoch (`--eval-every "
                  f"{a.tta_eval_every}`, and at each epoch's end); seconds are training time: the wall time "
                  "less the pauses for those evaluations (and for checkpoints), which a run without them does not "
                  "pay. The wall time with them is shown too.", "",
                  "| method | seconds to target | wall s, evaluations included | epochs of data by then "
                  "| test accuracy (training seconds) at each epoch end |", "|---|---:|---:|---:|---|"]
        for m, t in tta.items():
            s = t["seconds"]
            ends = ", ".join(f"{acc:.2%} ({w:.1f} s)" for acc, w in t["epoch_ends"])
            if s is None:
                lines.append(f"| {m} | not reached | - | - | {ends} |")
            else:
                lines.append(f"| {m} | {s:.1f} | {t['wall_s']:.1f} | {t['epochs']:.2f} | {ends} |")
    path.write_text("\n".join(lines) + "\n")


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags; their defaults measure the README's pipeline table (`python benchmarks/pipeline.py`)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="fcn-6",
                   help="fcn-6: its 2-stage cut is the most even of the paper's FCNs (see the report's 'why')")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--steps", type=int, default=150, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--dni-method", choices=["dni", "cdni"], default="cdni",
                   help="rule of the decoupled pipelines (cdni: synthesizers also see the label)")
    p.add_argument("--synth-lr", type=float, default=1e-3,
                   help="synthesizer learning rate (the 20-epoch default, 1e-4, learns too slowly for one epoch)")
    p.add_argument("--repeats", type=int, default=3, help="rounds of throughput measurements (median reported)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda: every method on the GPU(s); stages share GPUs "
                   "when there are fewer than stages")
    p.add_argument("--synth-hidden", type=int, default=1, help="DNI synthesizer hidden layers (0: linear)")
    p.add_argument("--synth-width", type=int, default=64,
                   help="DNI synthesizer hidden width: small = a cheap low-rank synthesizer")
    p.add_argument("--threads-all", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--schedule", choices=["gpipe", "1f1b"], default="gpipe")
    p.add_argument("--sweep", default="128,256,512,1024,2048",
                   help="comma-separated widths for a sweep ('': only --width)")
    p.add_argument("--batch-sweep", default="", help="comma-separated batch sizes for a sweep at --width, e.g. "
                   "64,128,256,512 (multiples of --microbatches)")
    p.add_argument("--sweep-steps", type=int, default=60, help="timed steps per measurement in the sweeps")
    p.add_argument("--tta-epochs", type=int, default=0, help="also measure time to --target-accuracy (0: skip)")
    p.add_argument("--target-accuracy", type=float, default=0.97)
    p.add_argument("--tta-evals-per-epoch", type=int, default=10,
                   help="test evaluations per epoch in the time-to-accuracy runs (each also at its epoch's end)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes, to check that everything runs")
    p.add_argument("--gpipe-records", type=Path, default=None,
                   help="only train the GPipe baseline for --tta-epochs and write its evaluation records here (as "
                        "JSON; benchmarks/time_to_accuracy.py uses it)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = build_parser().parse_args(argv)
    a.threads_per_stage = max(1, a.threads_all // a.stages)
    if a.dry_run:
        a.width, a.steps, a.warmup, a.sweep, a.sweep_steps, a.repeats = 64, 10, 2, "", 10, 1
        a.batch_sweep = "64,128" if a.batch_sweep else ""
    ds = data.load("mnist", a.data_dir)
    # Steps between the time-to-accuracy runs' evaluations.
    a.tta_eval_every = max(1, math.ceil(data.num_batches(len(ds.train_y), a.batch_size) / a.tta_evals_per_epoch))
    if a.gpipe_records is not None:
        with tempfile.TemporaryDirectory() as tmp_s:
            a.gpipe_records.write_text(json.dumps(gpipe(a, ds, a.width, Path(tmp_s), epochs=a.tta_epochs)["epochs"]))
        return 0
    a.cut_shares = cut_shares(a.model, a.width, a.stages, tuple(ds.input_shape), ds.num_classes)
    # The same bound for the paper's FCNs, for the report's "why this model".
    a.fcn_bounds = {m: 1 / max(cut_shares(m, a.width, a.stages, tuple(ds.input_shape), ds.num_classes))
                    for m in ("fcn-3", "fcn-4", "fcn-5", "fcn-6")}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        main_res = measure(a, ds, a.width, tmp, METHODS)
        sweeps: dict[str, dict[int, dict]] = {}
        steps, batch = a.steps, a.batch_size
        a.steps = a.sweep_steps
        if a.sweep:
            sweeps["width"] = {w: main_res if w == a.width else measure(a, ds, w, tmp, METHODS)
                               for w in (int(s) for s in a.sweep.split(","))}
        if a.batch_sweep:
            sweeps["batch size"] = {}
            for b in (int(s) for s in a.batch_sweep.split(",")):
                a.batch_size = b
                sweeps["batch size"][b] = main_res if b == batch else measure(a, ds, a.width, tmp, METHODS)
            a.batch_size = batch
        a.steps = steps
        tta: dict[str, dict] = {}
        if a.tta_epochs:
            for m in METHODS:
                print(f"time to accuracy: {m} ...", file=sys.stderr, flush=True)
                tta[m] = time_to_accuracy(a, ds, m, tmp)
                print(f"  {tta[m]}", file=sys.stderr, flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    name = "pipeline" + ("" if a.device == "cpu" else f"-{a.device.split(':')[0]}") + ("-dry-run" if a.dry_run else "")
    write_report(a.out / f"{name}.md", a, argv, main_res, sweeps, tta, time.perf_counter() - t0)
    plot(a.out / f"{name}.png", a, main_res, sweeps, tta)
    print((a.out / f"{name}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
