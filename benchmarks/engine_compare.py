"""The pipeline engine against an earlier version of itself: samples/s of the same runs, side by side.

Each measurement is a fresh process that imports synthgrad from one source tree (this checkout's
src/, or --baseline-src, e.g. a worktree of an older commit: `git worktree add /tmp/old 31e4ec0`)
and trains a pipeline for --warmup + --steps steps through `synthgrad.pipeline.run_pipeline` (the
same call in every version); samples/s comes from the last stage's step records after the warm-up,
as in benchmarks/pipeline.py. The two versions take turns within every round, the order
alternating, and each figure is the median of its rounds; the ratio new/old is taken round by
round, so the machine's drifts hit both alike.

    python benchmarks/engine_compare.py --baseline-src /tmp/old/src --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# One process: train a pipeline and print its samples/s after the warm-up (runs under either version).
MEASURE = r"""
import json, sys, tempfile
from pathlib import Path
from synthgrad import data
from synthgrad.config import TrainConfig
from synthgrad.metrics import read_metrics
from synthgrad.pipeline import run_pipeline
a = json.loads(sys.argv[1])
ds = data.load("mnist")
cfg = TrainConfig(**a["cfg"]).resolve()
with tempfile.TemporaryDirectory() as tmp:
    run_pipeline(cfg, ds, Path(tmp) / "run", quiet=True)
    steps = [r for r in read_metrics(Path(tmp) / "run" / "metrics.jsonl") if r["kind"] == "step"
             and r["step"] >= a["warmup"]]
first, last = steps[0], steps[-1]
print(json.dumps((last["step"] - first["step"]) * cfg.batch_size / (last["wall_time_s"] - first["wall_time_s"])))
"""

VARIANTS = {  # the pipeline rows of benchmarks/pipeline.py at fcn-6, width 1024, 2 stages
    "cdni pipeline, low-rank synthesizer": {"method": "cdni", "synth_hidden": 1, "synth_width": 64,
                                            "synth_lr": 1e-3},
    "cdni pipeline, linear synthesizer": {"method": "cdni", "synth_hidden": 0},
    "locked pipeline": {"method": "backprop"},
}


def measure(src: Path, variant: dict, a: argparse.Namespace) -> float:
    cfg = {"model": a.model, "width": a.width, "batch_size": a.batch_size, "stages": 2, "epochs": 1,
           "max_steps": a.warmup + a.steps, "log_every": 10, **variant}
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, "-c", MEASURE, json.dumps({"cfg": cfg, "warmup": a.warmup})], env=env,
                         capture_output=True, text=True, check=True, timeout=900)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline-src", type=Path, required=True, help="src/ of the earlier version")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--model", default="fcn-6")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", type=Path, default=RESULTS / "engine-compare.md")
    a = p.parse_args()
    sources = {"new": ROOT / "src", "old": a.baseline_src}
    sps: dict[str, dict[str, list[float]]] = {v: {"new": [], "old": []} for v in VARIANTS}
    for r in range(a.rounds):
        for name, variant in VARIANTS.items():
            order = ["new", "old"] if r % 2 == 0 else ["old", "new"]
            for version in order:
                sps[name][version].append(measure(sources[version], variant, a))
            print(f"round {r + 1}: {name}: new {sps[name]['new'][-1]:,.0f}/s, old {sps[name]['old'][-1]:,.0f}/s",
                  flush=True)
    lines = [f"# The engine against its earlier version ({datetime.now():%Y-%m-%d})", "",
             f"Command: `python benchmarks/engine_compare.py {' '.join(sys.argv[1:])}`", "",
             f"Machine: {platform.node()}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}; "
             f"{a.model} width {a.width}, batch {a.batch_size}, 2 stage processes, samples/s after {a.warmup} "
             f"warm-up steps over {a.steps} steps; median of {a.rounds} interleaved rounds.", "",
             "| pipeline | new (samples/s) | old (samples/s) | new / old (median of per-round ratios) |",
             "|---|---:|---:|---:|"]
    for name, v in sps.items():
        ratio = statistics.median(n / o for n, o in zip(v["new"], v["old"], strict=True))
        lines.append(f"| {name} | {statistics.median(v['new']):,.0f} | {statistics.median(v['old']):,.0f} | "
                     f"{ratio:.3f} |")
    a.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
