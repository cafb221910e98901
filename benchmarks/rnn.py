"""Benchmark: truncated BPTT vs DNI through time on copy, repeat copy and charlm; writes a table and plots.

    python benchmarks/rnn.py --quick          # 1 seed, short runs: about 10 minutes on 2 CPU cores
    python benchmarks/rnn.py                  # 3 seeds at the defaults: the README's RNN table (hours on 2 cores)

Every run is a plain `synthgrad train --task ...` in its own process (one torch thread each,
--jobs at a time), so each row can be reproduced from its command alone. Settings not given here are
synthgrad's defaults for the task and method (synthgrad/seqdefaults.py), which are the settings of the
README's results. A finished run with the same resolved configuration is reused, so an interrupted benchmark
continues and seeds can be added later. Results go to benchmarks/results/rnn.md and rnn.png; run directories
to benchmarks/runs/rnn/.
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
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

from synthgrad.tasks import has_old_repeat_code

ROOT = Path(__file__).resolve().parent
COPY_T = (2, 3, 4, 5, 8)
CHARLM_T = (5, 8, 16)
QUICK_STEPS = 1500  # per run with --quick; otherwise the task's default (copy tasks 20,000, charlm 40,000)
DEFAULT_TEXT = "/work/shared/data/tinyshakespeare/input.txt"


def run_args(task: str, method: str, t: int, seed: int, steps: int | None, run_dir: Path, text: str | None,
             synth_scale: float | None = None, schedule: str | None = None,
             aux_weight: float | None = None, synth_discount: float | None = None,
             clip: float | None = None) -> list[str]:
    """The `synthgrad` arguments of one run; every setting left None is the task's and method's default."""
    args = ["train", "--task", task, "--method", method, "--truncation", str(t), "--seed", str(seed),
            "--threads", "1", "--run-dir", str(run_dir), "--overwrite", "--quiet", "--no-plots", "--log-every", "100"]
    if steps is not None:
        args += ["--max-steps", str(steps)]
    if method == "dni" and synth_scale is not None:
        args += ["--synth-scale", str(synth_scale)]
    if method == "dni" and aux_weight is not None:
        args += ["--aux-weight", str(aux_weight)]  # DNI + Aux
    if method == "dni" and synth_discount is not None:
        args += ["--synth-discount", str(synth_discount)]  # the bootstrapped target's weight of the future
    if clip is not None:
        args += ["--clip", str(clip)]
    if schedule is not None:
        args += ["--schedule", schedule]
    if task == "charlm":
        args += ["--text", text, "--eval-every", "10000"]  # the final evaluation is the result; these are for plots
    return args


def resolved(args: list[str]) -> dict:
    """The configuration `synthgrad` resolves from `args`, as config.json records it (less the run's own extras)."""
    from synthgrad import cli
    from synthgrad.seqconfig import config_from_args

    cfg = config_from_args(cli.build_parser().parse_args(args)).to_dict()
    return {k: v for k, v in cfg.items() if k not in ("extra", "tensorboard")}


def finished(run_dir: Path, args: list[str]) -> bool:
    """True when run_dir holds a finished run of exactly the configuration `args` resolve to (reused, so that
    seeds can be added later; a run at other settings, older defaults included, is run again)."""
    try:
        cfg = json.loads((run_dir / "config.json").read_text())
        if cfg.get("method") == "dni" and cfg.get("synth_discount") is None:
            cfg["synth_discount"] = cfg["synth_scale"]  # how runs before 2026-11-30 recorded a discount at the scale
        want = resolved(args)
        return (run_dir / "final.pt").exists() and {k: cfg.get(k) for k in want} == want and \
            not has_old_repeat_code(cfg["task"], cfg.get("extra", {})) and \
            final_record(run_dir).get("kind") == "final"
    except (OSError, ValueError, IndexError, KeyError):
        return False


def final_record(run_dir: Path) -> dict:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


def training_bpc(run_dir: Path, last: int = 40) -> float | None:
    """Charlm: the mean training BPC of the last `last` logged windows, to set beside the held-out BPC."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    bpc = [r["train_bpc"] for r in records if r["kind"] == "step" and "train_bpc" in r][-last:]
    return statistics.mean(bpc) if bpc else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed and short step budgets (about 10 minutes)")
    p.add_argument("--seeds", type=int, default=None, help="default: 3 (1 with --quick)")
    p.add_argument("--copy-steps", type=int, default=None,
                   help="steps (batches) per copy run; default: synthgrad's, 20000 (1500 with --quick)")
    p.add_argument("--charlm-steps", type=int, default=None,
                   help="steps (windows) per charlm run; default: synthgrad's, 40000 (1500 with --quick)")
    p.add_argument("--text", default=DEFAULT_TEXT, help="text file for charlm")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel, one torch thread each")
    p.add_argument("--tasks", default="copy,repeat-copy,charlm", help="comma-separated subset")
    p.add_argument("--out", type=Path, default=ROOT / "results", help="folder for rnn.md and rnn*.png")
    p.add_argument("--synth-scale", type=float, default=None,
                   help="DNI runs: scale of the synthetic gradient (default: the task's, 0.1; charlm 0.3)")
    p.add_argument("--aux-weight", type=float, default=None,
                   help="DNI runs: DNI + Aux with this weight (default: the task's, 0; charlm 100)")
    p.add_argument("--synth-discount", type=float, default=None,
                   help="DNI runs: weight of the next window's synthetic gradient in the bootstrapped target "
                        "(default: the task's, 1; charlm: the synthetic-gradient scale)")
    p.add_argument("--clip", type=float, default=None,
                   help="every run: gradient-norm clip (default: the task's, 1; charlm 5)")
    p.add_argument("--schedule", choices=["constant", "cosine"], default=None,
                   help="learning-rate schedule of every run (default: the task's, constant; charlm cosine)")
    p.add_argument("--charlm-t", default=",".join(map(str, CHARLM_T)),
                   help="comma-separated truncation lengths for charlm (the target compares DNI T=5 with BPTT T=8)")
    a = p.parse_args()
    seeds = a.seeds or (1 if a.quick else 3)
    copy_steps = a.copy_steps or (QUICK_STEPS if a.quick else None)
    charlm_steps = a.charlm_steps or (QUICK_STEPS if a.quick else None)
    tasks = a.tasks.split(",")
    try:
        a.charlm_ts = tuple(int(t) for t in a.charlm_t.split(","))
    except ValueError:
        sys.exit(f"--charlm-t {a.charlm_t!r}: give comma-separated truncation lengths, e.g. 5,8,16")
    if any(t < 1 for t in a.charlm_ts):
        sys.exit(f"--charlm-t {a.charlm_t!r}: truncation lengths must be at least 1")
    if "charlm" in tasks and not Path(a.text).is_file():
        sys.exit(f"--text {a.text}: no such file; give the tinyshakespeare input.txt or drop charlm from --tasks")

    jobs = []
    for task in tasks:
        ts, steps = (a.charlm_ts, charlm_steps) if task == "charlm" else (COPY_T, copy_steps)
        for t in ts:
            for method in ("bptt", "dni"):
                for seed in range(seeds):
                    scaled = method == "dni" and a.synth_scale is not None
                    name = f"{task}-{method}-T{t}-s{seed}" + (f"-scale{a.synth_scale:g}" if scaled else "")
                    if method == "dni" and a.aux_weight is not None:
                        name += f"-aux{a.aux_weight:g}"
                    if method == "dni" and a.synth_discount is not None:
                        name += f"-discount{a.synth_discount:g}"
                    if a.clip is not None:
                        name += f"-clip{a.clip:g}"
                    if a.schedule is not None:
                        name += f"-{a.schedule}"
                    if steps is not None:
                        name += f"-{steps}steps"  # keeps the runs of the default budget for reuse
                    run_dir = ROOT / "runs" / "rnn" / name
                    jobs.append((task, method, t, seed, run_dir,
                                 run_args(task, method, t, seed, steps, run_dir, a.text, a.synth_scale,
                                          a.schedule, a.aux_weight, a.synth_discount, a.clip), steps))
    # Longest first (charlm, long T) so the pool finishes together.
    jobs.sort(key=lambda j: (j[0] != "charlm", -j[2]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.time()

    def launch(job: tuple) -> tuple:
        if finished(job[4], job[5]):
            print(f"[{time.time() - start:6.0f}s] {job[0]} {job[1]} T={job[2]} s{job[3]}: reused {job[4]}", flush=True)
            return job, 0
        cmd = [sys.executable, "-m", "synthgrad", *job[5]]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        status = "ok" if proc.returncode == 0 else f"failed ({proc.stderr.strip().splitlines()[-1:]})"
        print(f"[{time.time() - start:6.0f}s] {job[0]} {job[1]} T={job[2]} s{job[3]}: {status}", flush=True)
        return job, proc.returncode

    with ThreadPoolExecutor(a.jobs) as pool:
        done = list(pool.map(launch, jobs))
    wall = time.time() - start

    results: dict[tuple[str, str, int], list[dict]] = {}
    configs: dict[tuple[str, str], dict] = {}  # one finished run's config.json per task and method
    for job, code in done:
        if code == 0:
            record = final_record(job[4])
            if job[0] == "charlm":
                record["train_bpc_end"] = training_bpc(job[4])
            results.setdefault(job[:3], []).append(record)
            configs.setdefault(job[:2], json.loads((job[4] / "config.json").read_text()))
    write_report(a, tasks, seeds, results, configs, wall)
    return 0


def _mean_std(values: list[float], digits: int = 2) -> str:
    if not values:
        return "n/a"
    m = statistics.mean(values)
    return f"{m:.{digits}f}" if len(values) == 1 else f"{m:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


SHOWN = ("max_steps", "hidden", "batch_size", "lr", "schedule", "clip", "synth_lr", "synth_hidden", "synth_scale",
         "synth_warmup", "synth_discount", "aux_weight")  # the settings a report lists per task and method


def settings_line(task: str, method: str, cfg: dict) -> str:
    """One report line: the settings a task's runs of `method` ran with, from one run's config.json."""
    keys = [k for k in SHOWN if method == "dni" or not k.startswith(("synth_", "aux_"))]
    return f"- {task}, {method.upper()}: " + ", ".join(f"{k} {cfg[k]:g}" if isinstance(cfg[k], float) else
                                                       f"{k} {cfg[k]}" for k in keys)


def write_report(a: argparse.Namespace, tasks: list[str], seeds: int, results: dict, configs: dict,
                 wall: float) -> None:
    import torch

    a.out.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/rnn.py " + " ".join(shlex.quote(s) for s in sys.argv[1:])
    lines = ["# Synthetic gradients through time: truncated BPTT vs DNI", "",
             f"- command: `{cmd}`",
             f"- date: {datetime.now().isoformat(timespec='minutes')}",
             f"- machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores (shared), "
             f"Python {platform.python_version()}, torch {torch.__version__}; {a.jobs} runs in parallel, "
             f"1 thread each; wall time of this invocation (reused runs cost none) {wall / 60:.1f} min",
             f"- seeds: {seeds}; a copy-task step is a batch of sequences, a charlm step one T-character window "
             "of every stream",
             "- model: one-layer LSTM, Adam; DNI: a linear, zero-initialised synthesizer on [h, c] with "
             "bootstrapped targets (synth_discount: the next window's weight in them), its synthetic gradient x "
             "synth_scale, ramped up from 0 over synth_warmup windows; DNI + Aux when aux_weight > 0. Settings, "
             "from each task's and method's config.json:",
             *(settings_line(task, method, cfg) for (task, method), cfg in sorted(configs.items())),
             "", "Notes and earlier measurements: rnn-notes.md.", ""]
    summary: dict = {}
    for task in (t for t in tasks if t != "charlm"):
        lines += [f"## {task}: longest length N solved (mean bit error per sequence < 0.15 over 20 batches)", "",
                  "| T | BPTT | DNI | DNI / BPTT | target DNI >= 2x BPTT |", "|---|---|---|---|---|"]
        for t in COPY_T:
            b = [r["max_length_solved"] for r in results.get((task, "bptt", t), [])]
            d = [r["max_length_solved"] for r in results.get((task, "dni", t), [])]
            mb, md = (statistics.mean(b), statistics.mean(d)) if b and d else (None, None)
            ratio = "n/a" if md is None or md == 0 else "inf" if mb == 0 else f"{md / mb:.2f}"
            # met: DNI solves something, and at least twice BPTT's length (BPTT solving nothing counts as 0)
            met = "n/a (T > 5)" if t > 5 else ("yes" if md is not None and md > 0 and md >= 2 * mb else "no")
            lines.append(f"| {t} | {_mean_std(b)} | {_mean_std(d)} | {ratio} | {met} |")
            summary[(task, t)] = (b, d)
        lines.append("")
    if "charlm" in tasks:
        steps = next((cfg["max_steps"] for (task, _), cfg in configs.items() if task == "charlm"), "n/a")
        lines += [f"## charlm: held-out bits per character after {steps} steps (last 10% of {a.text})", "",
                  "Training BPC: mean of each run's last 40 logged windows (a gap to the held-out BPC is overfitting).",
                  "", "| T | BPTT | DNI | BPTT, training | DNI, training |", "|---|---|---|---|---|"]
        for t in a.charlm_ts:
            b = [r["bpc"] for r in results.get(("charlm", "bptt", t), [])]
            d = [r["bpc"] for r in results.get(("charlm", "dni", t), [])]
            tb, td = ([r["train_bpc_end"] for r in results.get(("charlm", m, t), []) if r.get("train_bpc_end")]
                      for m in ("bptt", "dni"))
            # BPC: differences of 0.01 count
            lines.append(f"| {t} | {_mean_std(b, 3)} | {_mean_std(d, 3)} | {_mean_std(tb, 3)} | {_mean_std(td, 3)} |")
            summary[("charlm", t)] = (b, d)
        d5 = summary.get(("charlm", 5), ([], []))[1]
        b8 = summary.get(("charlm", 8), ([], []))[0]
        if d5 and b8:
            ok = statistics.mean(d5) <= statistics.mean(b8)
            lines += ["", f"Target DNI T=5 ({statistics.mean(d5):.3f}) <= BPTT T=8 ({statistics.mean(b8):.3f}): "
                          f"{'met' if ok else 'not met'}."]
        lines.append("")
    lines += ["Run directories: `benchmarks/runs/rnn/` (config.json, metrics.jsonl per run); plot: `rnn.png`.", ""]
    (a.out / "rnn.md").write_text("\n".join(lines))
    plot(a.out / "rnn.png", tasks, summary, a.charlm_ts)
    print("\n".join(lines))


def plot(path: Path, tasks: list[str], summary: dict, charlm_ts: tuple[int, ...] = CHARLM_T) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        ts = charlm_ts if task == "charlm" else COPY_T
        for i, (method, color) in enumerate((("bptt", "tab:blue"), ("dni", "tab:orange"))):
            xs, ms, ss = [], [], []
            for t in ts:
                vals = summary.get((task, t), ([], []))[i]
                if vals:
                    xs.append(t)
                    ms.append(statistics.mean(vals))
                    ss.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
            ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, color=color, label=method.upper())
        ax.set(xlabel="truncation T", title=task,
               ylabel="held-out BPC" if task == "charlm" else "longest length solved")
        ax.set_xticks(list(ts))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
