"""The README's reported results and their commands (benchmarks/results/reported.json): which commands are plain.

    python benchmarks/reported.py

A command is plain when it carries no flag but those of reported.json's `plain_flags` (what is trained
and on what, the method, the seed, the length in epochs, and where the network is cut): everything
else comes from the defaults. Prints every result's command, marks the others with the flags they add,
and counts plain results and plain README table rows (a row is plain when all its results are).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

REPORTED = Path(__file__).resolve().parent / "results" / "reported.json"


def extra_flags(command: str, plain: set[str]) -> list[str]:
    """The flags of `command` that are not plain (benchmark scripts: all of theirs)."""
    flags = re.findall(r"(?<!\S)--[a-z][a-z0-9-]*", command)
    if not command.startswith("synthgrad "):
        return flags or ["(a benchmark script)"]
    return [f for f in flags if f not in plain]


def main() -> int:
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
