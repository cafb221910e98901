"""The README's reported results and their commands (benchmarks/results/reported.json): which commands are plain.

    python benchmarks/reported.py                     # every result's command; the count of plain ones
    python benchmarks/reported.py --settings RUN_DIR  # a run's settings, as a row of reported.json records them

A `synthgrad train` command is plain when it carries no flag but those of reported.json's `plain_flags`
(what is trained and on what, the method, the seed, the length in epochs, and where the network is cut):
everything else comes from the defaults. A benchmark script's command (the tables that time methods side by
side) is plain when it carries no flag at all: the script's defaults are the table's settings. Prints
every result's command, marks the others with the flags they add, and counts plain results and plain
README table rows (a row is plain when all its results are).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

REPORTED = Path(__file__).resolve().parent / "results" / "reported.json"
# The fields of config.json that a row records: those that decide a result.
CLASSIFIER_KEYS = ("model", "dataset", "method", "epochs", "optimizer", "lr", "synth_lr", "synth_hidden",
                   "synth_width", "schedule", "batch_size", "target")
SEQUENCE_KEYS = ("task", "method", "truncation", "hidden", "batch_size", "lr", "max_steps", "clip", "schedule")
SEQUENCE_DNI_KEYS = ("synth_lr", "synth_hidden", "synth_width", "synth_scale", "synth_warmup", "synth_discount",
                     "aux_weight")
TASK_KEYS = {"copy": ("solve_threshold", "solve_window", "max_length"),
             "repeat-copy": ("solve_threshold", "solve_window", "max_length", "max_repeats"),
             "charlm": ("embed", "holdout", "eval_chars")}


def settings(run_dir: Path) -> dict:
    """The settings a row records, from a run directory's config.json (paste them into its row)."""
    cfg = json.loads((run_dir / "config.json").read_text())
    if "task" in cfg:
        keys = SEQUENCE_KEYS + TASK_KEYS[cfg["task"]] + (SEQUENCE_DNI_KEYS if cfg["method"] == "dni" else ())
    else:
        keys = tuple(k for k in CLASSIFIER_KEYS if cfg["method"] != "backprop" or k != "synth_width")
    return {k: cfg[k] for k in keys}


def extra_flags(command: str, plain: set[str]) -> list[str]:
    """The flags of `command` that are not plain (a benchmark script's: all of them; without any, its defaults
    measure the table, and the command is plain)."""
    flags = re.findall(r"(?<!\S)--[a-z][a-z0-9-]*", command)
    if not command.startswith("synthgrad "):
        return flags
    return [f for f in flags if f not in plain]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", type=Path, metavar="RUN_DIR", help="print the settings of this run and stop")
    a = p.parse_args()
    if a.settings is not None:
        print(json.dumps(settings(a.settings), indent=1))
        return 0
    doc = json.loads(REPORTED.read_text())
    plain = set(doc["plain_flags"])
    rows: dict[tuple[str, str], bool] = {}
    n_plain = 0
    for r in doc["rows"]:
        extra = extra_flags(r["command"], plain)
        n_plain += not extra
        key = (r["table"], r["row"])
        rows[key] = rows.get(key, True) and not extra
        mark = "plain" if not extra else "adds " + " ".join(extra)
        print(f"{r['table']} | {r['row']} | {r['column']}: {r['command']}  [{mark}]")
    n, m = len(doc["rows"]), len(rows)
    k = sum(rows.values())
    print(f"\nresults with a plain command: {n_plain} of {n} ({100 * n_plain / n:.0f}%)")
    print(f"README table rows whose commands are all plain: {k} of {m} ({100 * k / m:.0f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
