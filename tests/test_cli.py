"""The command line: a few-step run writes the run directory and plots; bad input gives one clear line."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from synthgrad import checkpoint
from synthgrad.cli import main
from synthgrad.metrics import read_metrics


def _train(args: list[str], fake: Path, tmp: Path) -> list[str]:
    return ["train", "--data-dir", str(fake), "--no-verify-md5", "--cache-dir", str(tmp / "cache"), *args]


@pytest.mark.parametrize("method", ["backprop", "dni", "cdni"])
def test_dry_run_writes_run_directory_and_plots(method: str, fake_data_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    code = main(_train(["--method", method, "--model", "fcn-2", "--width", "32", "--synth-width", "32",
                        "--dry-run", "--diagnose-every", "5", "--log-every", "5", "--run-dir", str(run)],
                       fake_data_dir, tmp_path))
    assert code == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("final test accuracy") and str(run) in last
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "metrics.jsonl", "final.pt", "best.pt", "checkpoint.pt", "loss.png",
            "accuracy.png"} <= names
    if method != "backprop":
        assert {"synth_loss.png", "grad_cosine.png"} <= names
    assert json.loads((run / "config.json").read_text())["max_steps"] == 20


def test_plot_several_runs_into_one_figure(fake_data_dir: Path, tmp_path: Path) -> None:
    runs = []
    for method in ("backprop", "cdni"):
        runs.append(tmp_path / method)
        # 2 epochs of 4 steps, with mid-epoch evaluations (they join the accuracy curve)
        assert main(_train(["--method", method, "--model", "mlp", "--epochs", "2", "--eval-every", "3",
                            "--no-plots", "--quiet", "--run-dir", str(runs[-1])], fake_data_dir, tmp_path)) == 0
        evals = [r for r in read_metrics(runs[-1] / "metrics.jsonl") if r["kind"] == "eval"]
        assert [r["step"] for r in evals] == [3, 6]
    assert main(["plot", *map(str, runs), "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "accuracy.png").stat().st_size > 1000


def test_existing_run_dir_is_refused_then_resumed(fake_data_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    args = _train(["--model", "mlp", "--method", "cdni", "--max-steps", "5", "--quiet", "--no-plots",
                   "--run-dir", str(run)], fake_data_dir, tmp_path)
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err
    assert main(["train", "--resume", str(run), "--quiet", "--no-plots"]) == 0


def test_a_run_written_before_synth_center_existed_resumes_without_centring(fake_data_dir: Path,
                                                                            tmp_path: Path) -> None:
    from synthgrad.cli import config_to_resume

    run = tmp_path / "run"
    assert main(_train(["--model", "mlp", "--method", "cdni", "--max-steps", "2", "--quiet", "--no-plots",
                        "--run-dir", str(run)], fake_data_dir, tmp_path)) == 0
    assert config_to_resume(run).synth_center is True  # today's cDNI default, recorded
    cfg = json.loads((run / "config.json").read_text())
    del cfg["synth_center"]  # as an older synthgrad wrote it
    (run / "config.json").write_text(json.dumps(cfg))
    assert config_to_resume(run).synth_center is False
    assert main(["train", "--resume", str(run), "--quiet", "--no-plots"]) == 0


def test_a_token_run_written_before_the_mean_token_term_resumes_without_it(fake_data_dir: Path,
                                                                         tmp_path: Path) -> None:
    from synthgrad.cli import config_to_resume

    run = tmp_path / "run"
    base = ["--model", "vit-mini", "--method", "cdni", "--max-steps", "2", "--quiet", "--no-plots",
            "--run-dir", str(run)]
    # An older synthgrad built no term: its checkpoint has no mean_map, and its config.json no synth_mean_token.
    assert main(_train([*base, "--no-synth-mean-token"], fake_data_dir, tmp_path)) == 0
    cfg = json.loads((run / "config.json").read_text())
    del cfg["synth_mean_token"]
    (run / "config.json").write_text(json.dumps(cfg))
    assert config_to_resume(run).synth_mean_token is False
    assert main(["train", "--resume", str(run), "--max-steps", "4", "--quiet", "--no-plots"]) == 0
    fresh = tmp_path / "fresh"
    assert main(_train([*base[:-1], str(fresh)], fake_data_dir, tmp_path)) == 0
    assert config_to_resume(fresh).synth_mean_token is True  # today's cDNI default, recorded


def test_sgd_optimizer_has_its_own_default_lr_and_reaches_the_checkpoint(fake_data_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["train", "--method", "dni", "--optimizer", "sgd", "--model", "fcn-2", "--width", "16",
                 "--max-steps", "3", "--quiet", "--no-plots", "--run-dir", str(run), "--data-dir",
                 str(fake_data_dir), "--no-verify-md5", "--cache-dir", str(tmp_path / "c")]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["optimizer"], cfg["lr"]) == ("sgd", 0.01)
    groups = checkpoint.load(run / checkpoint.LATEST)["payload"]["rule"]["stage_rules"][0]["optimizer"]["param_groups"]
    assert groups[0]["momentum"] == 0.9 and groups[0]["nesterov"]


@pytest.mark.parametrize("method", ["cdni", "dgl", "backprop"])
def test_lower_lr_reaches_the_lower_stages_and_the_checkpoint(fake_data_dir: Path, tmp_path: Path, method: str) -> None:
    run = tmp_path / "run"
    assert main(["train", "--method", method, "--model", "fcn-3", "--width", "16", "--lr", "1e-3", "--lower-lr", "2e-3",
                 "--max-steps", "3", "--quiet", "--no-plots", "--run-dir", str(run), "--data-dir",
                 str(fake_data_dir), "--no-verify-md5", "--cache-dir", str(tmp_path / "c")]) == 0
    assert json.loads((run / "config.json").read_text())["lower_lr"] == 2e-3
    rules = checkpoint.load(run / checkpoint.LATEST)["payload"]["rule"]["stage_rules"]
    rates = [r["optimizer"]["param_groups"][0]["initial_lr"] for r in rules]
    assert rates == [2e-3] * (len(rules) - 1) + [1e-3]


FLAGS = ["--model", "--dataset", "--method", "--target", "--epochs", "--batch-size", "--lr", "--width",
         "--stages", "--update-prob", "--seed", "--synth-lr", "--synth-hidden", "--synth-width",
         "--synth-scale", "--synth-warmup", "--device", "--threads", "--max-steps", "--log-every",
         "--checkpoint-every", "--resume", "--data-dir", "--optimizer", "--lower-lr"]
VALUES = ["-1", "0", "nan", "inf", "1e999", "abc", "", "fcn-0", "cnn", "2", "0.5", "999999999999", "cuda:x",
          "--", "/nonexistent", "mnist", "bootstrap", "-0.0", "1.5"]


def test_fuzzed_flags_end_in_a_clear_error_never_a_traceback(fake_data_dir: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    rng = random.Random(0)
    for _ in range(120):
        argv = ["train", "--no-plots", "--quiet", "--max-steps", "2", "--run-dir", str(tmp_path / "r"),
                "--overwrite", "--data-dir", str(fake_data_dir), "--no-verify-md5"]
        for _ in range(rng.randint(1, 3)):
            argv += [rng.choice(FLAGS), rng.choice(VALUES)]
        try:
            code = main(argv)
        except SystemExit as e:  # argparse: usage line and exit status 2
            code = e.code
        err = capsys.readouterr().err
        assert "Traceback" not in err and "internal error" not in err, (argv, err)
        assert code in (0, 2, 3), (argv, code, err)
        if code:
            assert "error" in err, (argv, err)


def test_random_bytes_as_idx_files_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rng = random.Random(1)
    d = tmp_path / "junk"
    d.mkdir()
    for trial in range(25):
        for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                     "t10k-labels-idx1-ubyte"):
            n = rng.choice([0, 3, 8, 16, 100, 4000])
            raw = bytes(rng.getrandbits(8) for _ in range(n))
            if trial % 3 == 0 and n >= 4:  # sometimes a valid magic with a lying header
                raw = (b"\x00\x00\x08\x03" if "images" in name else b"\x00\x00\x08\x01") + raw[4:]
            (d / name).write_bytes(raw)
        for verify in ([], ["--no-verify-md5"]):
            code = main(["train", "--data-dir", str(d), "--cache-dir", str(tmp_path / "c"), "--quiet",
                         "--run-dir", str(tmp_path / "r"), "--overwrite", *verify])
            err = capsys.readouterr().err
            assert code == 3 and str(d) in err and "Traceback" not in err, err


def test_console_entry_point_and_module_run_without_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    r = subprocess.run([sys.executable, "-m", "synthgrad", "train", "--model", "nope"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 2 and "unknown model" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "synthgrad", "models"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0 and "fcn-N" in r.stdout
    assert all(name in r.stdout for name in ("resmlp", "resnet-mini", "vit-mini", "lstm-rows"))  # the zoo too
    assert "with --stages: cdni: {'synth_rank': 64" in r.stdout
    assert ("cnn cdni: {'synth_lr': 0.0001, 'synth_center': False, 'synth_classifier': False, "
            "'synth_local': False}") in r.stdout  # its own
