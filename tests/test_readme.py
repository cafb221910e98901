"""The README: two commands first, and its library example runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_readme_opens_with_exactly_two_commands() -> None:
    first_block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert first_block is not None and README.index("```bash") < README.index("\n## ")
    commands = [line for line in first_block.group(1).splitlines() if line.strip()]
    assert [c.split("#")[0].strip() for c in commands] == ["bash scripts/main.sh", "bash scripts/test.sh"]
    ci = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in ci


def test_library_example_runs(tmp_path: Path, monkeypatch) -> None:
    """Both blocks of "Use it on your own model", as written: the second (a custom cDNI synthesizer, SGD stages,
    a schedule, the model's state_dict) goes on from the first."""
    section = README[README.index("## Use it on your own model"):README.index("### Cutting your model")]
    first, second = re.findall(r"```python\n(.*?)```", section, re.S)
    scope: dict = {}
    exec(compile(first, "README example", "exec"), scope)  # noqa: S102
    assert scope["stats"]["train_loss"] > 0 and len(scope["stats"]["synth_loss"]) == 2
    assert scope["net"](scope["x"][:4]).shape == (4, 3)
    monkeypatch.chdir(tmp_path)  # it saves model.pt
    exec(compile(second, "README example 2", "exec"), scope)  # noqa: S102
    assert scope["stats"]["grad_cosine"][0] is not None and scope["dni"].method == "cdni"
    assert set(torch.load(tmp_path / "model.pt")) == {"0.0.weight", "0.0.bias", "1.0.weight", "1.0.bias",
                                                      "2.weight", "2.bias"}


def test_cut_and_load_example_runs(fake_data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import torch

    import synthgrad as sg

    example = re.search(r"### Cutting your model and loading data\n.*?```python\n(.*?)```", README, re.S)
    assert example is not None
    ds = sg.load_dataset("mnist", data_dir=fake_data_dir, cache_dir=tmp_path / "c", verify_md5=False)
    monkeypatch.setattr(sg, "load_dataset", lambda name: ds)  # no real Fashion-MNIST needed
    scope: dict = {"sg": sg, "nn": torch.nn}
    exec(compile(example.group(1), "README cut example", "exec"), scope)  # noqa: S102
    stages = scope["stages"]
    assert len(stages) == 3 and torch.nn.Sequential(*stages)(ds.train_x[:4]).shape == (4, 10)


def test_pipeline_example_runs_as_written(tmp_path: Path) -> None:
    """The README's "Pipeline your own model" block, saved as a file and run with python: 2 processes."""
    example = re.search(r"## Pipeline your own model\n\n```python\n(.*?)```", README, re.S)
    assert example is not None
    script = tmp_path / "pipeline_example.py"
    script.write_text(example.group(1))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    t0 = time.monotonic()
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert time.monotonic() - t0 < 120
    accuracy = float(re.search(r"test accuracy (\S+)", run.stdout).group(1))
    assert accuracy > 0.8  # 10 classes: chance is 0.1
