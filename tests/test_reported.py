"""The README's results come from the defaults: every reported command gives the settings recorded with its result.

benchmarks/results/reported.json holds, for each result of the README's tables, the command of one of its
runs and the settings behind it (from the run's config.json or its benchmark report). Each command is
resolved as the CLI resolves it, and run for two steps, and the config.json it writes must hold those
settings: a change of a default that a reported result rests on fails here until the result is measured
again and its row updated.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import benchscripts
import pytest

from synthgrad import cli, seqconfig
from synthgrad.cli import main
from synthgrad.rundir import CONFIG

RESULTS = Path(__file__).parents[1] / "benchmarks" / "results"
REPORTED = json.loads((RESULTS / "reported.json").read_text())
# A row's `synthgrad train` command: its own, or (timed by a benchmark) one of the benchmark's runs.
ROWS = [{**row, "command": row.get("run", row["command"])} for row in REPORTED["rows"]
        if row.get("run", row["command"]).startswith("synthgrad train ")]
TEXT = "The quick brown fox jumps over the lazy dog; then the dog sleeps in the sun. " * 12  # ~1,000 characters


def _id(row: dict) -> str:
    return f"{row['table']}: {row['row']}, {row['column']}"


def _argv(row: dict, text: Path) -> list[str]:
    """The row's command as `synthgrad` arguments, the placeholder TEXT replaced by a real file."""
    argv = shlex.split(row["command"])[1:]
    return [str(text) if a == "TEXT" else a for a in argv]


def _resolved(argv: list[str]) -> dict:
    """The configuration the CLI resolves from `argv`, without running anything."""
    a = cli.build_parser().parse_args(argv)
    cfg = seqconfig.config_from_args(a) if a.task is not None else cli.config_from_args(a)
    return cfg.to_dict()


def _differences(settings: dict, config: dict, skip: tuple[str, ...] = ()) -> dict:
    return {k: (v, config.get(k, "absent")) for k, v in settings.items() if k not in skip and config.get(k) != v}


def test_the_table_covers_every_results_table_and_names_existing_reports() -> None:
    assert len(ROWS) >= 27 and all(row["settings"] for row in ROWS)
    for row in REPORTED["rows"]:
        assert (RESULTS.parent.parent / row["report"]).is_file(), row["report"]
    tables = {row["table"] for row in REPORTED["rows"]}
    assert tables == {"Backprop baselines", "DNI and cDNI reproduction", "Pipeline engine", "Time to accuracy", "RNNs"}
    methods = {(row["settings"].get("task"), row["settings"]["method"]) for row in ROWS}
    assert methods == {(None, "backprop"), (None, "dni"), (None, "cdni"), (None, "ddg"), (None, "dgl"),
                       ("copy", "bptt"), ("copy", "dni"),
                       ("repeat-copy", "bptt"), ("repeat-copy", "dni"), ("charlm", "bptt"), ("charlm", "dni")}


@pytest.mark.parametrize("row", ROWS, ids=_id)
def test_the_plain_command_resolves_to_the_reported_settings(row: dict, tmp_path: Path) -> None:
    config = _resolved(_argv(row, tmp_path / "text.txt"))
    assert _differences(row["settings"], config) == {}


# Short runs of the sequence rows and of one classifier per method (mlp: the others' runs differ only in the model
# and would cost a minute of checkpoint writes; their resolution above is the same code path).
SHORT = [r for r in ROWS if r["table"] == "RNNs" or (r["settings"].get("model") == "mlp" and "sgd" not in r["command"]
                                                      and r["table"] == "DNI and cDNI reproduction")]


@pytest.mark.parametrize("row", SHORT, ids=_id)
def test_a_short_run_of_the_command_writes_the_reported_settings(row: dict, tmp_path: Path,
                                                                 fake_data_dir: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    run = tmp_path / "run"
    argv = [*_argv(row, text), "--max-steps", "2", "--run-dir", str(run), "--quiet", "--no-plots"]
    if "--task" not in argv:
        argv += ["--data-dir", str(fake_data_dir), "--no-verify-md5", "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    config = json.loads((run / CONFIG).read_text())
    assert config["max_steps"] == 2
    assert _differences(row["settings"], config, skip=("max_steps",)) == {}


def test_the_plain_time_to_accuracy_benchmark_runs_each_rows_run() -> None:
    tta = benchscripts.load("time_to_accuracy")
    rows = [r for r in REPORTED["rows"] if r["table"] == "Time to accuracy"]
    assert rows and {r["command"] for r in rows} == {"python benchmarks/time_to_accuracy.py"}
    a = tta.parse_args([])
    commands = {tta.run_command(a, m) for m, flags in tta.METHODS.items() if flags is not None}
    assert {r["run"] for r in rows} <= commands
    # A user's other model keeps its own width.
    assert tta.parse_args(["--model", "resmlp"]).width is None


def test_the_plain_pipeline_benchmark_measures_every_row_of_its_table() -> None:
    pipeline = benchscripts.load("pipeline")
    rows = [r for r in REPORTED["rows"] if r["table"] == "Pipeline engine"]
    assert rows and {r["command"] for r in rows} == {"python benchmarks/pipeline.py"}
    a = pipeline.build_parser().parse_args([])
    assert (a.model, a.width, a.steps, a.repeats, a.sweep_steps) == ("fcn-6", 1024, 150, 3, 60)
    widths = {int(w) for w in a.sweep.split(",")}
    assert {int(r["row"].removeprefix("width ")) for r in rows} == widths
