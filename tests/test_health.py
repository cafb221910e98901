"""Health sampling: agreement with the true gradient and activation RMS in the stats, warnings once, with advice."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import synthgrad as sg
from synthgrad import data
from synthgrad.config import TrainConfig
from synthgrad.health import Health, HealthWarning
from synthgrad.metrics import read_metrics
from synthgrad.trainer import Progress, Trainer


class NoiseSynthesizer(nn.Module):
    """Predicts loud noise: farther from the true gradient than zero, always."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()))

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return 100 * torch.randn_like(h) + self.p


class Oracle(nn.Module):
    """Predicts the true per-example gradient, from the stage above."""

    def __init__(self, upper: nn.Module, labels: torch.Tensor):
        super().__init__()
        self.upper, self.labels = [upper], labels
        self.p = nn.Parameter(torch.zeros(()))

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return sg.true_gradient(self.upper, h, self.labels) * h.shape[0] + 0 * self.p


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 20, generator=g), torch.randint(0, 3, (32,), generator=g)


def test_a_useless_synthesizer_is_warned_about_once_with_what_to_try() -> None:
    x, y = _batch()
    stages = [nn.Linear(20, 16), nn.Linear(16, 3)]
    dni = sg.DNI(stages, [sg.BackwardInterface(NoiseSynthesizer(), sg.adam(1e-3))],
                 health=Health(every=2, window=3, warmup=0))
    with pytest.warns(HealthWarning, match=r"gradient that stage 1 learns from \(its synthesizer's prediction, as "
                      r"applied\) has been no better than nothing .* Without the label this is expected once the "
                      r"stages above fit the training labels.* Try cDNI"):
        for _ in range(5):  # samples at steps 0, 2 and 4: a window of 3
            stats = dni.step(x, y)
    assert "act_rms" in stats and stats["grad_rel_error"][0] > 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: no second warning
        for _ in range(6):
            dni.step(x, y)


def test_a_useless_cdni_synthesizer_gets_advice_that_leaves_out_cdni() -> None:
    # The run sees the label already: "try cDNI" would send its user nowhere.
    x, y = _batch()
    stages = [nn.Linear(20, 16), nn.Linear(16, 3)]
    # Without the local loss: with it, the mix leans on the local gradient and the stage is fine (below).
    iface = sg.BackwardInterface(NoiseSynthesizer(), sg.adam(1e-3), classifier=False, local_loss=False)
    dni = sg.DNI(stages, [iface], conditioned=True, num_classes=3, health=Health(every=2, window=3, warmup=0))
    with pytest.warns(HealthWarning) as record:
        for _ in range(5):
            dni.step(x, y)
    message = str(record[0].message)
    assert "The label is given already (cDNI); try a faster synthesizer" in message and "Try cDNI" not in message
    assert "Without the label" not in message
    assert "trust=True" in message
    assert record[0].filename == __file__  # the warning points at the user's dni.step(...), not into the library


def test_a_stage_that_its_local_loss_carries_is_judged_by_what_it_applies() -> None:
    # The synthesizer predicts noise, but the least-squares mix leans on the local loss (a -> 0), so the stage
    # learns: judging the prediction would warn about a stage that is fine.
    x, y = _batch()
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Linear(20, 16), nn.ReLU()), nn.Linear(16, 3)]
    iface = sg.BackwardInterface(NoiseSynthesizer(), sg.adam(1e-3), classifier=False, local_loss=True)
    dni = sg.DNI(stages, [iface], conditioned=True, num_classes=3, health=Health(every=5, window=3, warmup=20))
    with warnings.catch_warnings():
        warnings.simplefilter("error", HealthWarning)
        for _ in range(200):
            dni.step(x, y)
    stats = dni.step(x, y, diagnose=True)
    assert stats["grad_rel_error"][0] > 10  # the prediction: noise of 100 against a gradient of about 1
    assert stats["applied_rel_error"][0] < 0.95 and stats["applied_cosine"][0] > 0.5
    assert stats["mix_synthetic"][0] < 1e-3 < stats["mix_local"][0]


def test_the_warning_says_how_far_the_stage_updates_still_follow_the_true_ones() -> None:
    # DNI's stages' per-step updates follow the true ones closely early and barely later (zoo-notes, section 13):
    # the message gives the parameter-space cosine of the judged window, and a restored judge keeps it.
    health = Health(every=1, window=3, warmup=0)
    health.observe(0, [1.2], [1.0], param_cosine=[0.6])
    restored = Health(every=1, window=3, warmup=0)
    restored.load_state_dict(copy.deepcopy(health.state_dict()))
    restored.observe(1, [1.1], [1.0], param_cosine=[0.02])
    with pytest.warns(HealthWarning, match=r"median relative error 1.10; the stage's parameter updates follow the "
                      r"true ones at a median cosine of 0.03 over the same samples\)"):
        restored.observe(2, [1.0], [1.0], param_cosine=[0.03])
    old_state = {k: v for k, v in health.state_dict().items() if k != "param_cosines"}  # a checkpoint from before
    Health().load_state_dict(old_state)


def test_a_useless_mix_names_the_local_loss() -> None:
    health = Health(every=1, window=2, warmup=0)
    with pytest.warns(HealthWarning, match=r"its synthesizer's prediction mixed with its local loss's gradient"):
        for step in range(2):
            health.observe(step, [1.5], [1.0], conditioned=True, local=[True])


def test_a_true_gradient_synthesizer_is_healthy_and_sampled_on_schedule() -> None:
    x, y = _batch()
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Linear(20, 16), nn.ReLU()), nn.Linear(16, 3)]
    dni = sg.DNI(stages, [sg.BackwardInterface(Oracle(stages[1], y), sg.adam(1e-3))],
                 health=Health(every=3, window=2, warmup=0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sampled = [("grad_cosine" in dni.step(x, y)) for _ in range(7)]
    assert sampled == [True, False, False, True, False, False, True]
    stats = dni.step(x, y, diagnose=True)
    assert stats["grad_cosine"][0] == pytest.approx(1.0, abs=1e-5) and stats["act_rms"][0] > 0
    # DNI's defaults apply the prediction as it is: the applied gradient is the prediction.
    assert stats["applied_cosine"] == stats["grad_cosine"] and stats["applied_rel_error"] == stats["grad_rel_error"]
    # What the stage's update followed: the true parameter gradient.
    assert stats["param_cosine"][0] == pytest.approx(1.0, abs=1e-5) and stats["param_rel_error"][0] < 1e-4
    assert stats["act_rms_drift"][0] == pytest.approx(stats["act_rms"][0] / dni.health.first_rms[0])


def test_activations_that_run_away_are_warned_about() -> None:
    health = Health(every=1, window=3, warmup=0, runaway=5.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        health.observe(0, [0.5], [1.0])
        health.observe(1, [0.5], [4.0])  # 4x: not yet
    with pytest.warns(HealthWarning, match=r"activation above stage 1 has grown 6.0x in RMS"):
        drift = health.observe(2, [0.5], [6.0])["act_rms_drift"]
    assert drift == [6.0]
    restored = Health()
    restored.load_state_dict(copy.deepcopy(health.state_dict()))
    assert restored.warned == health.warned and restored.first_rms == [1.0]


def test_an_activation_that_grows_from_a_small_start_to_the_unit_scale_is_not_running_away() -> None:
    # A tanh MLP's last boundary grows 5.1x under backprop (health.py): learning, not a runaway.
    health = Health(every=1, window=3, warmup=0, runaway=5.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        health.observe(0, [0.5], [0.2])
        drift = health.observe(1, [0.5], [1.5])["act_rms_drift"]  # 7.5x its start, 1.5x the unit scale
    assert drift == [pytest.approx(7.5)]
    with pytest.warns(HealthWarning, match=r"has grown 30.0x in RMS"):
        health.observe(2, [0.5], [6.0])  # 6x the unit scale: running away


def test_the_trainer_logs_health_and_plots_it(fake_data_dir: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(model="fcn-2", method="dni", epochs=1, batch_size=32, width=32, synth_width=32, log_every=4,
                      diagnose_every=4, verify_md5=False).resolve()
    ds = data.load("mnist", fake_data_dir, cache_dir=tmp_path / "c", check_md5=False)
    t = Trainer(cfg, ds, tmp_path / "run", progress=Progress(enabled=False))
    t.start()
    t.fit()
    steps = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "step"]
    assert all(len(r["act_rms"]) == 2 and r["act_rms"][0] > 0 and r["diagnosed_step"] == r["step"] - 3
               and len(r["applied_cosine"]) == 2 and len(r["param_cosine"]) == 2 for r in steps[1:])
    from synthgrad.plots import plot_runs

    written = plot_runs([tmp_path / "run"], tmp_path / "run")
    assert tmp_path / "run" / "act_rms.png" in written and tmp_path / "run" / "param_cosine.png" in written
