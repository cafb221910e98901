"""The engine's public API on a user's own model: lockstep equals DNI.step bit for bit; async trains; loaders,
torchrun, failures and the wire format."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import usermodel as um

import synthgrad as sg
from synthgrad.batching import batches, epoch_order
from synthgrad.engine.launch import free_port
from synthgrad.engine.packets import ALIGN, DATA, NONE, BackwardLayout, ForwardLayout, StatsLayout
from synthgrad.engine.spec import StageFactory
from synthgrad.errors import ConfigError, DivergenceError
from synthgrad.interfaces import OptimizerFactory
from synthgrad.rules import activation_shapes

TESTS = Path(__file__).parent


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the stage processes run one thread each: the same arithmetic
    yield
    torch.set_num_threads(before)


def _equal(a: object, b: object, where: str = "") -> list[str]:
    """Where two nested states differ (tensors compared bit for bit)."""
    if isinstance(a, torch.Tensor):
        return [] if isinstance(b, torch.Tensor) and torch.equal(a, b) else [where]
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return [where]
        return [d for k in a for d in _equal(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, list | tuple):
        if len(a) != len(b):  # type: ignore[arg-type]
            return [where]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _equal(x, y, f"{where}[{i}]")]
    return [] if a == b else [where]


def _single_process(num_stages: int, method: str, update_prob: float, unlock: str, x: torch.Tensor,
                    y: torch.Tensor, epochs: int, batch: int, seed: int, total: int, trust: bool = False,
                    lower: OptimizerFactory | None = None, factory: StageFactory | None = None) -> sg.DNI:
    factory = factory or (um.stage2 if num_stages == 2 else um.stage3)
    stages = [factory(k) for k in range(num_stages)]
    shapes = activation_shapes(stages, x[:2])
    make = um.Interfaces(method == "cdni", trust)
    interfaces = [make(k, shapes[k]) for k in range(num_stages - 1)]
    forward = ([um.forward_interface(k + 1, tuple(x.shape[1:]), shapes[k]) for k in range(num_stages - 1)]
               if unlock == "complete" else None)
    dni = sg.DNI(stages, interfaces, conditioned=method == "cdni", num_classes=um.NUM_CLASSES,
                 update_prob=update_prob, seed=seed, forward_interfaces=forward, schedule=sg.cosine_schedule(total),
                 lower_optimizer=lower)
    for epoch in range(epochs):
        for xb, yb in batches(x, y, batch, epoch_order(len(x), seed, epoch)):
            dni.step(xb, yb)
    return dni


@pytest.mark.parametrize("num_stages,method,update_prob,unlock,trust,lower", [
    (2, "dni", 1.0, "update", False, False), (3, "cdni", 1.0, "update", False, False),
    (3, "dni", 0.5, "update", False, False), (2, "cdni", 1.0, "complete", False, False),
    (3, "dni", 1.0, "complete", False, False), (3, "cdni", 1.0, "update", True, False),
    (3, "cdni", 1.0, "update", False, True)])
def test_lockstep_pipeline_equals_dni_step_bit_for_bit(num_stages: int, method: str, update_prob: float,
                                                       unlock: str, trust: bool, lower: bool,
                                                       one_thread: None) -> None:
    x, y = um.data()
    epochs, batch, seed = 2, 32, 3
    total = epochs * len(x) // batch
    pipe = sg.Pipeline(um.stage2 if num_stages == 2 else um.stage3, num_stages, method=method,
                       num_classes=um.NUM_CLASSES, interface=um.Interfaces(method == "cdni", trust),
                       forward_interface=um.forward_interface, unlock=unlock, update_prob=update_prob,
                       lr=1e-3, lockstep=True, threads=1, seed=seed, schedule=sg.cosine_schedule(total),
                       lower_optimizer=sg.adam(3e-3) if lower else None)
    piped = pipe.fit((x, y), epochs=epochs, batch_size=batch)
    plain = _single_process(num_stages, method, update_prob, unlock, x, y, epochs, batch, seed, total, trust,
                            sg.adam(3e-3) if lower else None)
    if lower:  # the lower stages' initial rate, in the optimizer states compared below
        assert [r.optimizer.param_groups[0]["initial_lr"] for r in plain.stage_rules] == [3e-3, 3e-3, 1e-3]
    moved = _equal(piped.states[0]["stage"], um.stages(num_stages)[0].state_dict())
    assert moved, "the comparison would be vacuous: training did not move the first stage"
    if method == "cdni":  # its default local loss is mixed in, and its state is among what is compared below
        assert all(i.local is not None and i.local.moments.abs().sum() > 0 for i in plain.interfaces)
        assert all("local" in piped.states[k]["interface"] for k in range(num_stages - 1))
    if trust:  # the stages' learning rates (in the optimizer states compared below) carry a factor below 1
        assert all(float(i.trust_factor) < 0.99 for i in plain.interfaces)
    for k, rule in enumerate(plain.stage_rules):
        assert _equal(piped.states[k], rule.state_dict(), f"stage {k + 1}") == []
    assert len(piped.network) == num_stages and not piped.network.training


@pytest.mark.parametrize("case,unlock", [("tokens", "update"), ("tokens", "complete"), ("mixup", "update"),
                                         ("mixup", "complete"), ("inplace", "update")])
def test_lockstep_pipeline_takes_data_and_stages_as_dni_step_does(case: str, unlock: str, one_thread: None) -> None:
    # tokens: the data's dtype reaches rank 0's stage, so an nn.Embedding reads int64 token indices, not floats.
    # mixup: soft labels [B, 3] travel up the chain (and, for the complete unlock, to every rank) as they are.
    # inplace: stages that begin with nn.ReLU(inplace=True) read their own copy of the message from below.
    if case == "tokens":
        (x, y), factory, num_stages = um.token_data(), um.token_stage, 2
        assert x.dtype == torch.int64
    elif case == "inplace":
        (x, y), factory, num_stages = um.data(), um.inplace_stage, 3
    else:
        (x, y), factory, num_stages = um.mixup_data(), um.stage3, 3
        assert y.shape == (len(x), um.NUM_CLASSES) and y.dtype == torch.float32
    epochs, batch, seed = 2, 32, 3
    total = epochs * len(x) // batch
    pipe = sg.Pipeline(factory, num_stages, method="cdni", num_classes=um.NUM_CLASSES, interface=um.Interfaces(True),
                       forward_interface=um.forward_interface, unlock=unlock, lr=1e-3, lockstep=True, threads=1,
                       seed=seed, schedule=sg.cosine_schedule(total))
    piped = pipe.fit((x, y), epochs=epochs, batch_size=batch)
    plain = _single_process(num_stages, "cdni", 1.0, unlock, x, y, epochs, batch, seed, total, factory=factory)
    assert _equal(piped.states[0]["stage"], factory(0).state_dict()), "training did not move stage 1"
    for k, rule in enumerate(plain.stage_rules):
        assert _equal(piped.states[k], rule.state_dict(), f"stage {k + 1}") == []


@pytest.mark.parametrize("method", ["cdni", "dni"])
def test_a_frozen_first_stage_is_run_forward_only_and_lockstep_still_equals_dni_step(method: str,
                                                                                     one_thread: None) -> None:
    # A pretrained backbone as stage 1, its parameters frozen: nothing below h_1 trains, so no backward pass there.
    x, y = um.data()
    epochs, batch, seed = 1, 32, 3
    total = epochs * len(x) // batch
    pipe = sg.Pipeline(um.frozen_first, 2, method=method, num_classes=um.NUM_CLASSES,
                       interface=um.Interfaces(method == "cdni"), lr=1e-3, lockstep=True, threads=1, seed=seed,
                       schedule=sg.cosine_schedule(total))
    piped = pipe.fit((x, y), epochs=epochs, batch_size=batch)
    plain = _single_process(2, method, 1.0, "update", x, y, epochs, batch, seed, total, factory=um.frozen_first)
    start = um.frozen_first(0).state_dict()
    weights = [k for k in start if k.endswith(("weight", "bias"))]
    assert all(torch.equal(piped.states[0]["stage"][k], start[k]) for k in weights)  # frozen: never moved
    assert _equal(piped.states[1]["stage"], um.frozen_first(1).state_dict()), "the stage above did not train"
    for k, rule in enumerate(plain.stage_rules):
        assert _equal(piped.states[k], rule.state_dict(), f"stage {k + 1}") == []


def test_a_frozen_first_stage_runs_under_every_pipeline_method() -> None:
    x, y = um.data()
    for method in ("backprop", "ddg", "dgl"):
        res = sg.Pipeline(um.frozen_first, 2, method=method, num_classes=um.NUM_CLASSES, threads=1,
                          interface=um.auxiliary if method == "dgl" else None).fit((x, y), epochs=1, batch_size=64)
        assert [r["epoch"] for r in res.metrics if r["kind"] == "epoch"] == [0], method
        start = um.frozen_first(0).state_dict()
        assert all(torch.equal(res.states[0]["stage"][k], v) for k, v in start.items()
                   if k.endswith(("weight", "bias"))), method  # frozen: never moved


def _double_stage(k: int) -> torch.nn.Module:
    return um.stage2(k).double()


def test_a_pipeline_refuses_float64_activations_with_what_to_do() -> None:
    x, y = um.data()
    with pytest.raises(ConfigError, match="stage 1 of 2: its output is float64.*keep the stages in float32"):
        sg.Pipeline(_double_stage, 2, method="dni").fit((x.double(), y), epochs=1, batch_size=32)


def test_an_upper_stage_refusing_its_build_is_the_error_not_the_stages_stopped_after_it() -> None:
    # Stage 2 raises while stage 1 waits for it; the launcher then stops stage 1 with SIGTERM, which is not the cause.
    with pytest.raises(ConfigError, match=r"stage 2 of 2: num_classes=5, but the model's last stage outputs 3 logits"):
        sg.Pipeline(um.stage2, 2, method="cdni", num_classes=5).fit(um.data(), batch_size=32)


@pytest.mark.parametrize("num_stages", [2, 3])
def test_async_pipeline_trains_a_user_model_with_custom_synthesizers(num_stages: int) -> None:
    x, y = um.data(2048)
    # lr 1e-3, the learning rate of the backprop and frozen figures below (the pipeline's default for cDNI,
    # 3e-4, trades this small model's speed for stability on residual ones: 0.742 here after 4 epochs).
    pipe = sg.Pipeline(um.stage2 if num_stages == 2 else um.stage3, num_stages, method="cdni",
                       num_classes=um.NUM_CLASSES, interface=um.Interfaces(True), lr=1e-3)
    res = pipe.fit((x, y), epochs=4, batch_size=32, evaluate=um.accuracy, log_every=16)
    epochs = [r for r in res.metrics if r["kind"] == "epoch"]
    steps = [r for r in res.metrics if r["kind"] == "step"]
    assert [r["epoch"] for r in epochs] == [0, 1, 2, 3]
    # Backprop reaches 0.83 on this model in 4 epochs; its lower stages frozen at init, 0.72 (2 stages), 0.61 (3).
    # cDNI's local loss (on by default) costs 3 stages 2 to 5 points at this budget and gains by 1,024 steps
    # (benchmarks/results/local-short-run.md: the asynchronous pipeline, 2 seeds, 0.727 and 0.746 with 3 stages,
    # 0.793 and 0.793 with 2).
    assert epochs[-1]["test_accuracy"] > 0.70 and um.accuracy(res.network) == epochs[-1]["test_accuracy"]
    assert all(len(r["synth_loss"]) == num_stages - 1 for r in steps) and steps[-1]["step"] == 4 * 64
    assert all(r["samples_per_s"] > 0 and len(r["stage_busy_s"]) == num_stages for r in epochs)
    assert any(v is not None for r in steps for v in r["staleness"])  # targets arrived, late by design


def test_a_dataloader_factory_feeds_rank_0_with_a_short_last_batch() -> None:
    res = sg.Pipeline(um.stage2, 2, method="dni").fit(um.loader, epochs=2, evaluate=um.accuracy, log_every=4)
    epochs = [r for r in res.metrics if r["kind"] == "epoch"]
    assert [r["step"] for r in epochs] == [16, 32]  # 15 batches of 32 and one of 20, per epoch
    assert epochs[-1]["test_accuracy"] > 0.4


def _dict_batches(epoch: int) -> list[dict]:
    x, y = um.data(64)
    return [{"x": x[:32], "y": y[:32]}, {"x": x[32:], "y": y[32:]}]


def test_a_loader_of_dicts_is_refused_with_how_to_adapt_it() -> None:
    with pytest.raises(ConfigError, match=r"each batch must be \(x, y\).*a dict with keys \['x', 'y'\]. Adapt"):
        sg.Pipeline(um.stage2, 2, method="dni", threads=1).fit(_dict_batches, epochs=1)


def _short_label_batches(epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = um.data(64)
    return [(x[:32], y[:31])]


def test_a_loader_batch_with_fewer_labels_than_inputs_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"a batch holds 32 inputs but 31 labels"):
        sg.Pipeline(um.stage2, 2, method="dni", threads=1).fit(_short_label_batches, epochs=1)


def _assert_backprop_epoch(states: list[dict], x: torch.Tensor, y: torch.Tensor) -> None:
    """The oracle: a 3-stage pipeline's stages after one epoch (batches of 32, seed 0) equal single-process
    backprop's, up to rounding."""
    bp = sg.Backprop(um.stages(3))
    for xb, yb in batches(x, y, 32, epoch_order(len(x), 0, 0)):
        bp.step(xb, yb)
    for k, stage in enumerate(bp.stages):
        for name, v in stage.state_dict().items():
            torch.testing.assert_close(states[k]["stage"][name], v, rtol=1e-5, atol=1e-6)


def test_locked_pipeline_equals_backprop(one_thread: None) -> None:
    x, y = um.data()
    res = sg.Pipeline(um.stage3, 3, method="backprop", threads=1).fit((x, y), epochs=1, batch_size=32)
    _assert_backprop_epoch(res.states, x, y)


def test_torchrun_runs_the_same_script_as_the_local_launch(tmp_path: Path, one_thread: None) -> None:
    script = tmp_path / "train.py"
    script.write_text(f"""
import sys
import torch
sys.path.insert(0, {str(TESTS)!r})
import usermodel as um
import synthgrad as sg

if __name__ == "__main__":
    res = sg.Pipeline(um.stage2, 2, method="cdni", num_classes=3, interface=um.Interfaces(True), lockstep=True,
                      threads=1).fit(um.data(), epochs=1, batch_size=32)
    torch.save(res.states, sys.argv[1] + "-" + __import__("os").environ.get("RANK", "local") + ".pt")
""")
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent / "src")}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(free_port()), str(script), str(tmp_path / "states")], env=env, capture_output=True,
                         text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    local = sg.Pipeline(um.stage2, 2, method="cdni", num_classes=3, interface=um.Interfaces(True), lockstep=True,
                        threads=1).fit(um.data(), epochs=1, batch_size=32)
    for rank in (0, 1):  # every process returns the whole run, equal to the local launch's
        assert _equal(torch.load(tmp_path / f"states-{rank}.pt", weights_only=False), local.states) == []


def test_a_diverging_stage_stops_the_run_with_a_divergence_error() -> None:
    x, y = um.data()
    with pytest.raises(DivergenceError, match=r"stage 1 of 2: non-finite synthetic gradient at stage 1, step 0") as e:
        sg.Pipeline(um.stage2, 2, interface=um.nan_interface).fit((x, y), batch_size=32)
    assert "File" not in str(e.value) and e.value.exit_code == 4


def test_a_stage_with_nothing_to_train_is_named_and_stops_the_run() -> None:
    with pytest.raises(ConfigError, match=r"stage 1 of 2: stage 1 \(Flatten\) has no parameters.*neighbouring"):
        sg.Pipeline(um.flatten_first, 2, threads=1).fit(um.data(), batch_size=32)


def test_what_cannot_pickle_is_refused_before_any_process_starts() -> None:
    with pytest.raises(ConfigError, match="stage must pickle"):
        sg.Pipeline(lambda k: um.stage2(k), 2).fit(um.data(), batch_size=32)
    with pytest.raises(ConfigError, match="num_classes"):
        sg.Pipeline(um.stage2, 2, method="cdni")


def test_packets_round_trip_with_aligned_blocks() -> None:
    stats = StatsLayout(interfaces=2, forward_interfaces=0)
    fwd = ForwardLayout(batch=8, shape=(3, 5), stats=stats)
    assert fwd.labels_at % ALIGN == 0 and fwd.h_at % ALIGN == 0
    h, labels = torch.randn(6, 3, 5), torch.tensor([0, 1, 2, 9, 4, 5])  # a short batch: padded
    s = stats.empty()
    s[stats.interface(1)] = torch.tensor([2.0, 0.5])
    f = fwd.unpack(fwd.pack(DATA, 7, 1, 4, 0, s, labels, h))
    assert (f.kind, f.step, f.epoch, f.batch, f.rows) == (DATA, 7, 1, 4, 6)
    assert torch.equal(f.h, h) and torch.equal(f.labels, labels) and torch.equal(f.stats[2:], torch.tensor([2.0, 0.5]))
    soft = ForwardLayout(batch=8, shape=(3, 5), stats=stats, label_width=4)  # soft labels [B, 4]
    assert soft.h_at % ALIGN == 0 and soft.h_at >= soft.labels_at + 8 * 4
    probs = torch.softmax(torch.randn(6, 4), 1)
    f = soft.unpack(soft.pack(DATA, 7, 1, 4, 0, s, probs, h))
    assert torch.equal(f.h, h) and torch.equal(f.labels, probs)
    bwd = BackwardLayout(batch=8, shape=(3, 5))
    assert bwd.HEAD % ALIGN == 0
    kind, step, grad = bwd.unpack(bwd.pack(DATA, 3, h))
    assert (kind, step) == (DATA, 3) and torch.equal(grad, h)
    assert bwd.unpack(bwd.pack(NONE, 4)) == (NONE, 4, None)


def test_ddg_without_delay_is_the_locked_pipeline_and_backprop(one_thread: None) -> None:
    """Lockstep DDG: each stage's gradient comes before its next step, so its replay sees the very parameters of
    its forward pass: the locked pipeline bit for bit, and backprop up to rounding."""
    x, y = um.data()
    ddg = sg.Pipeline(um.stage3, 3, method="ddg", lockstep=True, threads=1).fit((x, y), epochs=1, batch_size=32)
    locked = sg.Pipeline(um.stage3, 3, method="backprop", threads=1).fit((x, y), epochs=1, batch_size=32)
    assert [_equal(a["stage"], b["stage"]) for a, b in zip(ddg.states, locked.states, strict=True)] == [[], [], []]
    _assert_backprop_epoch(ddg.states, x, y)


def test_async_ddg_applies_late_true_gradients_and_trains() -> None:
    x, y = um.data(2048)
    res = sg.Pipeline(um.stage3, 3, method="ddg").fit((x, y), epochs=4, batch_size=32, evaluate=um.accuracy)
    epochs = [r for r in res.metrics if r["kind"] == "epoch"]
    assert epochs[-1]["test_accuracy"] > 0.75  # backprop: 0.83; the lower stages frozen: 0.61
    assert all(s is not None and s >= 1 for s in epochs[-1]["staleness"])  # the gradients came late
    assert all(n > 0 for n in epochs[-1]["targets_received"])


def test_dgl_stages_never_receive_a_message_from_above_and_equal_the_single_process_rule(one_thread: None) -> None:
    x, y = um.data()
    res = sg.Pipeline(um.stage3, 3, method="dgl", num_classes=um.NUM_CLASSES, interface=um.auxiliary,
                      lockstep=True, threads=1).fit((x, y), epochs=2, batch_size=32, log_every=8)
    epochs = [r for r in res.metrics if r["kind"] == "epoch"]
    assert all(r["targets_received"] == [0, 0] for r in epochs)
    steps = [r for r in res.metrics if r["kind"] == "step"]
    assert all(v is not None for v in steps[-1]["synth_loss"])  # the local losses, logged as the interfaces' losses
    stages = um.stages(3)
    shapes = activation_shapes(stages, x[:2])
    dgl = sg.DGL(stages, [um.auxiliary(k, shapes[k]) for k in range(2)], um.NUM_CLASSES)
    for epoch in range(2):
        for xb, yb in batches(x, y, 32, epoch_order(len(x), 0, epoch)):
            dgl.step(xb, yb)
    assert [_equal(res.states[k], r.state_dict()) for k, r in enumerate(dgl.stage_rules)] == [[], [], []]
