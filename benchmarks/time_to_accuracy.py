"""Time to accuracy: training seconds to 97% and 98% MNIST test accuracy, every method on one machine.

Each run is a plain `synthgrad train` command in its own process (GPipe, which the CLI does not
have, runs through benchmarks/pipeline.py's torch.distributed.pipelining baseline): single-process
backprop on 2 threads and on 1, the locked pipeline, GPipe, the decoupled cDNI pipeline at its
defaults, DDG and DGL, all with K = 2 processes where they are pipelines. Test accuracy is measured
--evals-per-epoch times per epoch; training seconds are the run's wall time less its evaluations
(as the runs' metrics record them). The methods take turns within a round, the order rotating from
round to round, and each figure is the median over --rounds rounds.

    python benchmarks/time_to_accuracy.py                     # the README's table: fcn-6, width 1024, 3 epochs
    python benchmarks/time_to_accuracy.py --model resmlp --width 512
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from synthgrad.idx import DATASETS
from synthgrad.models import get_spec

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TARGETS = (0.97, 0.98)

# The methods: name -> the flags that make them (added to the common ones); GPipe is special.
METHODS = {
    "backprop, 1 process, 2 threads": ["--method", "backprop", "--threads", "2"],
    "backprop, 1 process, 1 thread": ["--method", "backprop", "--threads", "1"],
    "locked pipeline": ["--method", "backprop", "--stages", "2"],
    "GPipe (4 micro-batches)": None,
    "cDNI pipeline": ["--method", "cdni", "--stages", "2"],
    "DDG pipeline": ["--method", "ddg", "--stages", "2"],
    "DGL pipeline": ["--method", "dgl", "--stages", "2"],
}
BASELINE = "backprop, 1 process, 2 threads"
# The width of the README's table on the paper's FCNs: where the pipeline engine pays off (its width sweep).
FCN_WIDTH = 1024


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags; their defaults measure the README's time-to-accuracy table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fcn-6")
    p.add_argument("--width", type=int, default=None,
                   help=f"default: {FCN_WIDTH} on the paper's FCNs (fcn-N), the model's own otherwise")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--evals-per-epoch", type=int, default=5)
    p.add_argument("--methods", nargs="+", default=list(METHODS), help="a subset of the methods, by name")
    p.add_argument("--extra", nargs="*", default=[], metavar="NAME=FLAGS",
                   help="more methods: a name and the synthgrad train flags that make it (e.g. "
                        "'cDNI rank 64=--method cdni --stages 2 --synth-rank 64')")
    p.add_argument("--targets", type=float, nargs="+", default=list(TARGETS), help="test accuracies to time")
    p.add_argument("--baseline", default=BASELINE, help="the method the others' times are divided by")
    p.add_argument("--out", default=None, help="report name in benchmarks/results (default: time-to-accuracy-MODEL)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    a = build_parser().parse_args(argv)
    if a.width is None and a.model.startswith("fcn-"):
        a.width = FCN_WIDTH
    return a


def trained_flags(a: argparse.Namespace, seed: int) -> list[str]:
    """The flags every method's runs share that decide what is trained (the README's table rows print them)."""
    return ["--model", a.model, *(["--width", str(a.width)] if a.width else []), "--epochs", str(a.epochs),
            "--seed", str(seed)]


def run_command(a: argparse.Namespace, method: str) -> str:
    """`method`'s run as a `synthgrad train` command, less the flags that only measure it (evaluations, quiet)."""
    return shlex.join(["synthgrad", "train", *trained_flags(a, 0), *METHODS[method]])


def common_flags(a: argparse.Namespace, eval_every: int, seed: int) -> list[str]:
    return trained_flags(a, seed) + ["--eval-every", str(eval_every), "--checkpoint-every", "1000000000",
                                     "--quiet", "--no-plots"]


def run_cli(flags: list[str], run: Path) -> list[dict]:
    """One `synthgrad train` run; its evaluation records (kind eval or epoch)."""
    cmd = [sys.executable, "-m", "synthgrad", "train", *flags, "--run-dir", str(run)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True, timeout=7200)
    from synthgrad.metrics import read_metrics

    return [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] in ("eval", "epoch")]


def run_gpipe(a: argparse.Namespace, tmp: Path) -> list[dict]:
    """GPipe over the same stages and data (benchmarks/pipeline.py's baseline); its evaluation records."""
    out = tmp / f"gpipe-{time.monotonic_ns()}.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "pipeline.py"), "--model", a.model, "--tta-epochs",
           str(a.epochs), "--tta-evals-per-epoch", str(a.evals_per_epoch), "--gpipe-records", str(out)]
    if a.width:
        cmd += ["--width", str(a.width)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True, timeout=7200)
    return json.loads(out.read_text())


def curve(records: list[dict]) -> list[tuple[float, float]]:
    """[(training seconds, test accuracy)] of a run: wall time less the evaluations so far."""
    out, paused = [], 0.0
    for r in sorted(records, key=lambda r: (r["step"], r["kind"] == "epoch")):
        paused += r["eval_time_s"]
        out.append((r["wall_time_s"] - paused, r["test_accuracy"]))
    return out


def first_at(points: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, acc in points if acc >= target), None)


def main() -> None:
    a = parse_args()
    methods = {m: METHODS[m] for m in a.methods}
    for item in a.extra:
        name, flags = item.split("=", 1)
        methods[name] = shlex.split(flags)

    def eval_every(flags: list[str] | None) -> int:
        """Steps between evaluations for a method's flags: --evals-per-epoch per epoch at its batch size (the
        flag's, else the model's default) over MNIST's training set, which every run here trains on."""
        flags = flags or []
        batch = (int(flags[flags.index("--batch-size") + 1]) if "--batch-size" in flags
                 else get_spec(a.model).defaults["batch_size"])
        return max(1, (DATASETS["mnist"].counts["train"] // batch) // a.evals_per_epoch)

    runs: dict[str, list[list[tuple[float, float]]]] = {m: [] for m in methods}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        names = list(methods)
        for r in range(a.rounds):
            order = names[r % len(names):] + names[:r % len(names)]  # rotate: no method always first
            for name in order:
                run = tmp / f"r{r}-{len(runs[name])}-{abs(hash(name))}"
                flags = methods[name]
                t0 = time.perf_counter()
                recs = (run_gpipe(a, tmp) if flags is None else
                        run_cli(common_flags(a, eval_every(flags), 0) + flags, run))
                runs[name].append(curve(recs))
                pts = runs[name][-1]
                reached = ", ".join(f"to {100 * t:g}% {first_at(pts, t)}" for t in a.targets)
                print(f"round {r + 1}: {name}: final {pts[-1][1]:.4f}, {reached} ({time.perf_counter() - t0:.0f} s)",
                      flush=True)
    report(a, methods, runs, time.perf_counter() - t_start)


def median_or_none(values: list[float | None]) -> tuple[float | None, int]:
    got = [v for v in values if v is not None]
    return (statistics.median(got) if len(got) * 2 > len(values) else None), len(got)


def report(a: argparse.Namespace, methods: dict, runs: dict, seconds: float) -> None:
    name = a.out or f"time-to-accuracy-{a.model}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    base = {t: median_or_none([first_at(c, t) for c in runs[a.baseline]])[0] if a.baseline in runs else None
            for t in a.targets}
    lines = [f"# Time to accuracy: {a.model}" + (f", width {a.width}" if a.width else ""), "",
             f"- command: `python benchmarks/time_to_accuracy.py {shlex.join(sys.argv[1:])}` ({seconds / 60:.0f} min)",
             f"- date: {datetime.now():%Y-%m-%d}; machine: {platform.machine()}, {os.cpu_count()} cores, "
             f"load average at the end {os.getloadavg()[0]:.1f}",
             f"- training seconds (wall time less evaluations) to the first of {a.evals_per_epoch} evaluations per "
             f"epoch at or above the target, median of {a.rounds} interleaved rounds (a median needs more than "
             "half the rounds to reach it); the ratio is the baseline's time over the method's (above 1: faster)",
             "", "| method | flags | " + " | ".join(f"to {100 * t:g}% (s) | × faster than {a.baseline}" if i == 0 else
                                                  f"to {100 * t:g}% (s) | ×" for i, t in enumerate(a.targets))
             + " | final accuracy (median) |", "|---|---|" + "---:|---:|" * len(a.targets) + "---:|"]
    for m, flags in methods.items():
        row = [m, "GPipe baseline of benchmarks/pipeline.py" if flags is None else f"`{' '.join(flags)}`"]
        for t in a.targets:
            med, n = median_or_none([first_at(c, t) for c in runs[m]])
            row += ["-" if med is None else f"{med:.1f}" + ("" if n == len(runs[m]) else f" ({n}/{len(runs[m])})"),
                    "-" if med is None or not base[t] else f"{base[t] / med:.2f}"]
        row.append(f"{100 * statistics.median(c[-1][1] for c in runs[m]):.2f}%")
        lines.append("| " + " | ".join(row) + " |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps({"argv": sys.argv[1:], "runs": runs}, indent=1))
    plot(RESULTS / f"{name}.png", a, runs)
    print("\n".join(lines))


def plot(path: Path, a: argparse.Namespace, runs: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for m, curves in runs.items():
        color = None
        for i, c in enumerate(curves):
            (line,) = ax.plot([t for t, _ in c], [100 * acc for _, acc in c], color=color,
                              alpha=0.9 if i == 0 else 0.35, label=m if i == 0 else None)
            color = line.get_color()
    for t in a.targets:
        ax.axhline(100 * t, color="grey", lw=0.6, ls=":")
    ax.set_ylim(100 * min(a.targets) - 3, 100 * max(a.targets) + 1.2)
    ax.set_xlabel("training seconds (evaluations left out)")
    ax.set_ylabel("MNIST test accuracy (%)")
    ax.set_title(f"Time to accuracy, {a.model}" + (f" width {a.width}" if a.width else "") + ", 2 cores")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
