"""When do a decoupled stage's updates follow the true ones? The parameter-space cosine of zoo runs, early and late.

Reads zoo run records (`benchmarks/zoo.py`, which stores every diagnosed step's `param_cosine`: per interface,
the cosine of the stage's parameter gradient under what it applied to that under the true gradient) and writes,
per run and interface, the median cosine over steps 100 to 400 and from step 500 on, and over the last 10
samples, beside the run's test accuracy and its frozen floor and backprop where the runs root holds them.

    python benchmarks/update_agreement.py --runs-root /tmp/s10/runs --report update-agreement-dni
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo import Run  # noqa: E402  (a sibling benchmark: its runs' keys)

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
EARLY, LATE = (100, 400), 500  # the steps of the first window, and where the second starts


def medians(record: dict) -> list[tuple[float | None, float | None, float | None]]:
    """Per interface: median cosine over steps EARLY, from LATE on, and over the last 10 samples."""
    samples = [(d["step"], d["param_cosine"]) for d in record.get("diagnostics", []) if d.get("param_cosine")]
    if not samples:
        return []
    out = []
    for k in range(len(samples[0][1])):
        early = [c[k] for s, c in samples if EARLY[0] <= s <= EARLY[1] and c[k] is not None]
        late = [c[k] for s, c in samples if s >= LATE and c[k] is not None]
        out.append(tuple(statistics.median(x) if x else None for x in (early, late, late[-10:])))
    return out


def other(root: Path, record: dict, method: str) -> float | None:
    """The final accuracy of the same cell's backprop or frozen run in the runs root, if it is there."""
    run = Run(record["model"], record["dataset"], record["stages"], method, record["seed"], record["epochs"])
    path = root / f"{run.key}.json"
    return json.loads(path.read_text())["final"] if path.exists() else None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs-root", required=True, help="a zoo.py runs root")
    p.add_argument("--variant", default="library")
    p.add_argument("--floors-root", default=None, help="another runs root that holds the backprop and frozen runs")
    p.add_argument("--report", required=True, help="report name in benchmarks/results (or a path ending in .md)")
    a = p.parse_args(argv)
    root = Path(a.runs_root)
    floors = Path(a.floors_root) if a.floors_root else root
    files = sorted((root / a.variant).glob("*.json"))
    if not files:
        p.error(f"no run records under {root / a.variant}: run benchmarks/zoo.py with --runs-root {root} first")

    def fmt(xs: list[float | None]) -> str:
        return ", ".join("-" if x is None else f"{x:.2f}" for x in xs)

    rows = []
    for f in files:
        r = json.loads(f.read_text())
        m = medians(r)
        if not m:
            continue
        bp, floor = other(floors, r, "backprop"), other(floors, r, "frozen")
        rows.append(f"| {r['dataset']} | {r['model']} | {r['stages']} | {r['method']} | {r['epochs']} | "
                    f"{'-' if bp is None else f'{bp:.2f}'} | {'-' if floor is None else f'{floor:.2f}'} | "
                    f"{r['final']:.2f} | {fmt([x[0] for x in m])} | {fmt([x[1] for x in m])} | "
                    f"{fmt([x[2] for x in m])} |")
    lines = ["# When a stage's updates follow the true ones: parameter-space cosine, early and late", "",
             f"- command: `python benchmarks/update_agreement.py {shlex.join(sys.argv[1:] if argv is None else argv)}`",
             f"- date: {date.today().isoformat()}; machine: {platform.machine()}, {os.cpu_count()} cores",
             "- per interface, lowest first: the cosine of the stage's parameter gradient under the gradient it "
             "applied to that under the true gradient (DNI.step's `param_cosine`, sampled every 100 steps), median "
             f"over steps {EARLY[0]} to {EARLY[1]}, from step {LATE} on, and over the last 10 samples; test accuracy "
             "(%) after the last epoch, with backprop and the frozen floor of the same cell where recorded", "",
             "| dataset | model | K | method | epochs | backprop | floor | accuracy | cosine, steps 100-400 | "
             "cosine, from step 500 | cosine, last 10 |", "|---|---|---|---|---|---|---|---|---|---|---|", *rows]
    out = Path(a.report) if a.report.endswith(".md") else RESULTS / f"{a.report}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
