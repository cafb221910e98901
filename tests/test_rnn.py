"""Synthetic gradients through time: oracle equivalence with full BPTT, zero synthesizers, curriculum, CLI."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from synthgrad import BackwardInterface, adam, checkpoint
from synthgrad.cli import main
from synthgrad.errors import ConfigError
from synthgrad.rnn import LSTMCore, TruncatedBPTT, build_rule, window_step
from synthgrad.seqdefaults import sequence_defaults
from synthgrad.tasks import CharCorpus, CopyTask, Curriculum, bit_errors, copy_loss, evaluate_bpc


class FixedSynthesizer(nn.Module):
    """Returns a given per-example gradient whatever the state: the oracle of a test."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value
        self.dummy = nn.Parameter(torch.zeros((), dtype=value.dtype))  # gives the interface's optimizer a parameter

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.value + 0 * self.dummy


def _episode(length: int = 3, batch: int = 6, seed: int = 0):
    ep = CopyTask().sample(length, batch, torch.Generator().manual_seed(seed))  # 2 * 3 + 1 = 7 steps
    return ep.x.double(), ep.target.double(), ep.mask.double()


def _model(seed: int = 0) -> LSTMCore:
    torch.manual_seed(seed)
    return LSTMCore(CopyTask().input_size, 16, CopyTask().output_size).double()


def test_true_future_gradient_makes_two_windows_equal_full_bptt() -> None:
    x, y, m = _episode()
    split = 4  # window 1: steps 0..3, window 2: steps 4..6
    full, windows = _model(), _model()
    opt_full = torch.optim.SGD(full.parameters(), lr=0.5)
    opt_win = torch.optim.SGD(windows.parameters(), lr=0.5)

    # Full BPTT over both windows, keeping the boundary state to read the true future gradient.
    logits1, s1 = full(x[:split])
    s1.retain_grad()
    logits2, _ = full(x[split:], s1)
    loss2 = copy_loss(logits2, y[split:], m[split:])
    (true_future,) = torch.autograd.grad(loss2, s1, retain_graph=True)  # dL2/ds1, batch-mean units
    (copy_loss(logits1, y[:split], m[:split]) + loss2).backward()
    opt_full.step()

    # Two windows, the first receiving the oracle's prediction B * dL2/ds1 as its future gradient.
    oracle = BackwardInterface(FixedSynthesizer(true_future * x.shape[1]), adam(1e-3))
    r1 = window_step(windows, None, x[:split], (y[:split], m[:split]), None, loss_fn=copy_loss, interface=oracle)
    r2 = window_step(windows, None, x[split:], (y[split:], m[split:]), r1.state, loss_fn=copy_loss,
                     interface=oracle, last=True, start_grad=True)
    opt_win.step()  # one update from the gradients accumulated over both windows

    assert r2.prediction is None  # the last window has no future
    # The bootstrap target reaching the second window's start is the true future gradient.
    torch.testing.assert_close(r2.start_grad, true_future)
    for (name, a), b in zip(full.named_parameters(), windows.parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=lambda s, n=name: f"{n}: {s}")


def test_plain_truncation_differs_from_full_bptt() -> None:
    # The control for the test above: without the future gradient, the first window's update is different.
    x, y, m = _episode()
    full, trunc = _model(), _model()
    logits, _ = full(x)
    copy_loss(logits, y, m).backward()
    for t in (0, 4):
        window_step(trunc, None, x[t:t + 4], (y[t:t + 4], m[t:t + 4]),
                    None if t == 0 else trunc(x[:4])[1], loss_fn=copy_loss)
    assert not torch.allclose(full.lstm.weight_ih_l0.grad, trunc.lstm.weight_ih_l0.grad)


def test_zero_initialised_synthesizer_makes_dni_equal_bptt_at_step_0() -> None:
    x, y, m = (t.float() for t in _episode(length=2))  # 5 steps, T = 3: two windows, the second the last
    rules = {}
    for method in ("bptt", "dni"):
        rules[method] = build_rule(_model().float(), method, 3, copy_loss, lr=1e-2, synth_hidden=2,
                                   synth_width=32, clip=1.0)
        out = rules[method].episode(x, y, m)
        assert out["windows"] == 2
    assert rules["dni"].steps == rules["bptt"].steps == 2
    for a, b in zip(rules["bptt"].model.parameters(), rules["dni"].model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # ...while its synthesizer did learn from the bootstrapped target of window 2.
    synth = rules["dni"].interface.synthesizer
    assert synth.net[-1].weight.abs().sum() > 0


@pytest.mark.parametrize("discount", [None, 0.0, 0.4, 1.0])
def test_bootstrap_discount_weighs_the_future_in_the_start_gradient_only(discount: float | None) -> None:
    """The start gradient (the previous synthesizer's target) is dL/ds0 + discount * J^T g / B, where the update
    applies scale * g: the discount re-weighs the bootstrapped future without changing the core's step."""
    x, y, m = _episode()
    scale = 0.25
    value = torch.randn(x.shape[1], 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    oracle = BackwardInterface(FixedSynthesizer(value), adam(1e-3), scale=scale)
    start = torch.randn(x.shape[1], 32, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    model, ref = _model(), _model()
    res = window_step(model, None, x[:4], (y[:4], m[:4]), start, loss_fn=copy_loss, interface=oracle,
                      start_grad=True, discount=discount)
    # By hand: the core's gradient takes the scale; the start gradient takes the discount (None: the scale).
    s0 = start.clone().requires_grad_(True)
    hidden, end = ref.hidden(x[:4], s0)
    loss = copy_loss(ref.readout(hidden), y[:4], m[:4])
    weight = scale if discount is None else discount
    (want_start,) = torch.autograd.grad(loss + (end * value).sum() * weight / x.shape[1], s0, retain_graph=True)
    (loss + (end * value).sum() * scale / x.shape[1]).backward()
    torch.testing.assert_close(res.start_grad, want_start)
    for (name, a), b in zip(ref.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, msg=lambda s, n=name: f"{n}: {s}")
    with pytest.raises(ConfigError, match=r"needs a backward interface \(DNI\)"):
        build_rule(_model(), "bptt", 3, copy_loss, synth_discount=0.5)


def test_auxiliary_task_adds_its_mse_to_the_window_loss() -> None:
    """DNI + Aux: the core's gradient is that of loss + w * MSE(head(h_t), synthetic gradient at the end)."""
    x, y, m = _episode()
    w = 0.7
    value = torch.randn(x.shape[1], 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    oracle = BackwardInterface(FixedSynthesizer(value), adam(1e-3))
    head = nn.Linear(16, 32).double()  # a non-zero head: the aux gradient reaches the core
    model, ref = _model(), _model()
    res = window_step(model, None, x[:4], (y[:4], m[:4]), None, loss_fn=copy_loss, interface=oracle, aux=head,
                      aux_weight=w)
    # By hand: the same objective, written out.
    hidden, end = ref.hidden(x[:4])
    aux_loss = ((head(hidden) - value) ** 2).mean()
    objective = copy_loss(ref.readout(hidden), y[:4], m[:4]) + w * aux_loss + (end * value / x.shape[1]).sum()
    objective.backward()
    assert res.aux_loss is not None and torch.isclose(res.aux_loss, aux_loss.detach())
    for (name, a), b in zip(ref.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, msg=lambda s, n=name: f"{n}: {s}")


def test_zero_initialised_aux_head_leaves_the_core_as_dni_at_step_0() -> None:
    x, y, m = _episode()
    value = torch.randn(x.shape[1], 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    rules = {w: TruncatedBPTT(_model(), 4, copy_loss, lr=1e-2, aux_weight=w,
                              interface=BackwardInterface(FixedSynthesizer(value), adam(1e-3))) for w in (0.0, 1.0)}
    for rule in rules.values():
        out = rule.window(x[:4], y[:4], m[:4])  # one window, the oracle's gradient at its end
    # The head starts at zero, so no aux gradient reaches the core yet: the same step as plain DNI...
    for a, b in zip(rules[0.0].model.parameters(), rules[1.0].model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # ...while the head itself learnt, from an aux loss of mean(value^2) (it predicted 0).
    assert out["aux_loss"] == pytest.approx((value ** 2).mean().item())
    assert rules[1.0].aux is not None and rules[1.0].aux.weight.abs().sum() > 0 and rules[0.0].aux is None
    with pytest.raises(ConfigError, match=r"needs a backward interface \(DNI\)"):
        build_rule(_model(), "bptt", 3, copy_loss, aux_weight=1.0)


def test_a_trusting_interface_through_time_is_refused_with_what_to_do() -> None:
    iface = BackwardInterface(FixedSynthesizer(torch.zeros(1, 16)), adam(1e-3), trust=True)
    with pytest.raises(ConfigError, match="build the interface with trust=False"):
        TruncatedBPTT(_model(), 3, copy_loss, interface=iface)


def test_dni_streams_carry_state_and_train_the_synthesizer() -> None:
    torch.manual_seed(0)
    model = LSTMCore(4, 8, 5, vocab=5)
    from synthgrad.tasks import char_loss

    rule = build_rule(model, "dni", 4, char_loss, synth_hidden=0, synth_scale=1.0)
    data = torch.randint(0, 5, (41, 3))
    losses = [rule.window(data[t:t + 4], data[t + 1:t + 5])["synth_loss"] for t in range(0, 36, 4)]
    assert losses[0] is None and all(v is not None for v in losses[1:])  # a target exists from window 2 on
    assert rule.state is not None and rule.pending is not None
    # A checkpoint round trip restores the carried state and the pending boundary.
    clone = build_rule(copy.deepcopy(model), "dni", 4, char_loss, synth_hidden=0)
    clone.load_state_dict(rule.state_dict())
    torch.testing.assert_close(clone.state, rule.state)
    assert isinstance(clone, TruncatedBPTT) and clone.steps == rule.steps


def test_curriculum_advances_only_when_the_current_length_is_solved() -> None:
    c = Curriculum(start=1, threshold=0.15, window=5)
    for _ in range(20):
        assert not c.record(1.0)  # unsolved: stays
    assert (c.length, c.solved) == (1, 0)
    for _ in range(4):
        assert not c.record(0.0)  # mean over the last 5 still above threshold (one 1.0 in the window)
    assert c.record(0.0)
    assert (c.length, c.solved) == (2, 1)
    assert not c.record(0.0)  # the history restarts at the new length
    for _ in range(3):
        c.record(0.1)
    assert c.record(0.1) and (c.length, c.solved) == (3, 2)
    capped = Curriculum(start=4, window=1, max_length=4)
    assert capped.record(0.0) and (capped.length, capped.solved) == (4, 4)


def test_copy_tasks_layout_and_bit_errors() -> None:
    ep = CopyTask().sample(3, 2, torch.Generator().manual_seed(0))
    assert ep.x.shape == (7, 2, 9) and ep.target.shape == (7, 2, 8)
    torch.testing.assert_close(ep.target[4:], ep.x[:3, :, :8])
    assert ep.x[3, :, 8].eq(1).all() and ep.mask[:4].sum() == 0
    perfect = (ep.target * 2 - 1) * 10  # logits that threshold to the target
    assert bit_errors(perfect, ep.target, ep.mask) == 0
    assert bit_errors(-perfect, ep.target, ep.mask) == 3 * 8  # every output bit wrong
    rep = CopyTask(repeat=True, max_repeats=2).sample(2, 3, torch.Generator().manual_seed(1))
    assert rep.x.shape[0] in (2 + 1 + 2 * 1 + 1, 2 + 1 + 2 * 2 + 1) and rep.target[-1, :, 8].eq(1).all()


def test_repeat_copy_episode_layout_and_repeat_code() -> None:
    task = CopyTask(repeat=True, max_repeats=3)
    codes = torch.tensor([task.repeat_code(r) for r in (1, 2, 3)])
    # Graves et al. 2014: the repeat number is standardised over its range (mean 0, variance 1)
    assert codes.mean().abs() < 1e-6 and codes.var(unbiased=False).item() == pytest.approx(1.0)
    assert codes[0] < codes[1] < codes[2]
    seq = torch.randint(0, 2, (2, 4, 8), generator=torch.Generator().manual_seed(0)).float()
    for reps in (1, 2, 3):
        ep = task.episode(seq, reps)
        assert ep.x.shape == (2 + 1 + 2 * reps + 1, 4, 10) and ep.target.shape == (2 + 1 + 2 * reps + 1, 4, 9)
        assert ep.x[2, :, 9].eq(codes[reps - 1]).all() and ep.x[3:].eq(0).all()  # no input after the delimiter
        torch.testing.assert_close(ep.target[3:3 + 2 * reps, :, :8], seq.repeat(reps, 1, 1))
        assert ep.target[-1, :, 8].eq(1).all() and ep.target[:-1, :, 8].eq(0).all() and ep.target[-1, :, :8].eq(0).all()
        assert ep.mask[:3].sum() == 0 and ep.mask[3:].eq(1).all()
    assert CopyTask(repeat=True, max_repeats=1).repeat_code(1) == 0.0


def test_char_corpus_split_and_bpc_of_uniform_model() -> None:
    corpus = CharCorpus("abcd" * 100, holdout=0.1)
    assert corpus.vocab == ["a", "b", "c", "d"] and len(corpus.valid) == 40
    torch.manual_seed(0)
    model = LSTMCore(4, 8, 4, vocab=4)
    nn.init.zeros_(model.readout.weight)
    nn.init.zeros_(model.readout.bias)
    assert evaluate_bpc(model, corpus.valid, batch=2, chunk=7) == pytest.approx(2.0)  # log2(4)


@pytest.mark.parametrize("task,method", [("copy", "dni"), ("repeat-copy", "bptt"), ("charlm", "dni")])
def test_cli_smoke_run_per_task(task: str, method: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    args = ["train", "--task", task, "--method", method, "--truncation", "3", "--width", "16", "--synth-width",
            "16", "--batch-size", "4", "--max-steps", "12", "--log-every", "4", "--checkpoint-every", "5",
            "--run-dir", str(run), "--quiet"]
    if task == "charlm":
        text = tmp_path / "tiny.txt"
        text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
        args += ["--text", str(text), "--eval-every", "6", "--eval-chars", "200"]
    assert main(args) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert str(run) in last and ("held-out bpc" in last if task == "charlm" else "longest length solved" in last)
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["task"], cfg["method"], cfg["truncation"], cfg["hidden"]) == (task, method, 3, 16)
    row = sequence_defaults(task, method)  # the task's defaults: a stable scale and warm-up through time
    assert (cfg["synth_scale"], cfg["synth_warmup"], cfg["clip"]) == (row["synth_scale"], row["synth_warmup"],
                                                                      row["clip"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [4, 8, 12]
    assert {"train_loss", "wall_time_s", "samples_per_s"} <= set(steps[0])
    key = "bpc" if task == "charlm" else "max_length_solved"
    assert records[-1]["kind"] == "final" and key in records[-1]
    names = {p.name for p in run.iterdir()}
    assert {"checkpoint.pt", "final.pt", "seq_loss.png", "bpc.png" if task == "charlm" else "length.png"} <= names
    # Resuming a finished run uses its saved config (12 steps) and has nothing left to do.
    assert main(["train", "--resume", str(run), "--quiet", "--no-plots"]) == 0
    assert main(["plot", str(run), "--out", str(tmp_path / "plots")]) == 0


def test_explicit_synthesizer_scale_and_warmup_win_over_the_sequence_defaults(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["train", "--task", "copy", "--width", "8", "--batch-size", "4", "--max-steps", "2",
                 "--synth-scale", "1", "--synth-warmup", "0", "--run-dir", str(run), "--quiet", "--no-plots"]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["synth_scale"], cfg["synth_warmup"], cfg["schedule"]) == (1.0, 0, "constant")


def test_cosine_schedule_decays_both_learning_rates_over_max_steps(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["train", "--task", "copy", "--method", "dni", "--width", "8", "--batch-size", "4", "--max-steps",
                 "4", "--schedule", "cosine", "--lr", "0.002", "--synth-lr", "0.001", "--run-dir", str(run),
                 "--quiet", "--no-plots"]) == 0
    rule = checkpoint.load(run / checkpoint.LATEST)["payload"]["rule"]
    last = 0.5 * (1 + math.cos(math.pi * 3 / 4))  # the factor of the 4th (last) step, 0-based step 3
    assert rule["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.002 * last)
    assert rule["interface"]["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.001 * last)


def test_cli_refuses_bad_sequence_flags(tmp_path: Path, capsys: pytest.CaptureFixture,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the default run directory is ./runs/...: never in the checkout
    assert main(["train", "--task", "charlm", "--method", "dni"]) == 2
    assert "--text" in capsys.readouterr().err
    assert main(["train", "--task", "copy", "--method", "cdni"]) == 2
    assert "bptt or dni" in capsys.readouterr().err
    assert main(["train", "--task", "copy", "--truncation", "0"]) == 2
    assert "--truncation" in capsys.readouterr().err
    assert main(["train", "--task", "charlm", "--text", str(tmp_path / "missing.txt")]) == 3
    assert "no such file" in capsys.readouterr().err
    assert main(["train", "--task", "copy", "--method", "bptt", "--synth-discount", "0.5"]) == 2
    assert "--synth-discount" in capsys.readouterr().err
    # Sequence-only flags on a classifier run: refused, not silently ignored.
    assert main(["train", "--model", "mlp", "--aux-weight", "10", "--truncation", "8"]) == 2
    err = capsys.readouterr().err
    assert "--truncation, --aux-weight apply to sequence tasks only" in err and "--task" in err
    assert not (tmp_path / "runs").exists()  # refused starts leave nothing behind


def test_resume_refuses_a_repeat_copy_run_with_the_old_repeat_code(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    assert main(["train", "--task", "repeat-copy", "--width", "8", "--batch-size", "4", "--max-steps", "2",
                 "--run-dir", str(run), "--quiet", "--no-plots"]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["extra"]["repeat_code"] == "standardised"
    del cfg["extra"]["repeat_code"]  # as written before the code changed
    cfg["max_steps"] = 4
    (run / "config.json").write_text(json.dumps(cfg))
    assert main(["train", "--resume", str(run), "--quiet", "--no-plots"]) == 2
    assert "Start a new run" in capsys.readouterr().err
