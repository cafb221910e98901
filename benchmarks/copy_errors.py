"""Where a copy-task model goes wrong: its bit errors split by repeat count and by kind of output step.

The curriculum reports one number per batch, the wrong bits per sequence over the whole output phase.
This reloads trained models (a run directory's final.pt) and splits those errors, on fresh sequences
of one length, into:

- data: wrong bits while the model should be writing the N vectors (N x R steps, 8 bits each);
- marker: wrong end-marker bits on those steps (a marker written too early) and on the last step
  (a marker missed); Repeat Copy only;
- blank: wrong data bits on the last step, where the model should write zeros;

per repeat count R, so a model that copies but cannot count the repeats shows up as errors at R > 1 in
`blank` and `marker`, not in `data`.

    python benchmarks/copy_errors.py benchmarks/runs/rnn/repeat-copy-dni-T2-s0-20000steps ... --length 1
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from synthgrad import checkpoint
from synthgrad.rnn import LSTMCore
from synthgrad.rundir import read_model
from synthgrad.tasks import CopyTask, has_old_repeat_code


@torch.no_grad()
def split_errors(model: LSTMCore, task: CopyTask, length: int, reps: int, count: int, seed: int) -> dict[str, float]:
    """Mean wrong bits per sequence, by kind of output step, over `count` sequences of `length` vectors x `reps`."""
    g = torch.Generator().manual_seed(seed)
    n, b = length, task.bits
    seq = torch.randint(0, 2, (n, count, b), generator=g).float()  # [N, C, BITS]
    ep = task.episode(seq, reps)
    logits, _ = model(ep.x)  # [L, C, O]
    pred = (logits[n + 1:] > 0).float()  # output phase only: [N*R (+1), C, O]
    wrong = (pred != ep.target[n + 1:]).float()
    errors = {"data": wrong[:n * reps, :, :b].sum().item() / count}
    if task.repeat:
        errors["marker"] = wrong[:, :, b].sum().item() / count
        errors["blank"] = wrong[-1, :, :b].sum().item() / count
    return errors


def load_model(run_dir: Path) -> tuple[LSTMCore, CopyTask, dict]:
    saved = read_model(run_dir / checkpoint.FINAL)
    cfg, state = saved.config, saved.payload  # payload: the model and its final record
    if cfg["task"] not in ("copy", "repeat-copy"):
        raise SystemExit(f"{run_dir}: task {cfg['task']!r} is not a copy task")
    if has_old_repeat_code(cfg["task"], cfg.get("extra", {})):
        raise SystemExit(f"{run_dir}: trained with the old repeat code R / max_repeats (before 2026-11-27); "
                         "train it again with this version")
    task = CopyTask(repeat=cfg["task"] == "repeat-copy", max_repeats=cfg["max_repeats"])
    model = LSTMCore(task.input_size, cfg["hidden"], task.output_size)
    model.load_state_dict(state["model"])
    model.eval()
    return model, task, state


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories of `synthgrad train --task copy|repeat-copy`")
    p.add_argument("--length", type=int, default=None,
                   help="sequence length N (default: the length each run's curriculum was working on)")
    p.add_argument("--count", type=int, default=2000, help="sequences per repeat count")
    p.add_argument("--seed", type=int, default=1234)
    a = p.parse_args()
    torch.set_num_threads(1)
    print("| run | solved | N | R | data | marker | blank | total |")
    print("|---|---|---|---|---|---|---|---|")
    for run in a.runs:
        model, task, state = load_model(run)
        length = a.length or state["length"]
        for reps in range(1, (task.max_repeats if task.repeat else 1) + 1):
            e = split_errors(model, task, length, reps, a.count, a.seed)
            cells = " | ".join(f"{e[k]:.2f}" if k in e else "-" for k in ("data", "marker", "blank"))
            total = sum(e.values())
            print(f"| {run.name} | {state['max_length_solved']} | {length} | {reps} | {cells} | {total:.2f} |")


if __name__ == "__main__":
    main()
