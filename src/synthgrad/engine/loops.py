"""The loops: rank 0 walks the batches; every other rank takes what comes from below until STOP.

Scheduling is all here and in `complete` (the complete unlock's loop): when a stage runs its
step, when it takes its targets (as they come, or waiting for each one: lockstep), when rank 0
asks for a snapshot. What a step computes is the StageRule's (synthgrad.stage).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from synthgrad.engine.feed import Feed
from synthgrad.engine.packets import DATA, EPOCH_END, MID_EPOCH, RUN_END, SNAPSHOT, STOP, Forward
from synthgrad.engine.snapshots import Clock, Snapshot, StepLog, gather, send_report
from synthgrad.engine.worker import StageWorker
from synthgrad.errors import ConfigError


@dataclass(frozen=True)
class Schedule:
    """How long the run goes and how often the last stage logs: the same for every rank."""

    epochs: int
    max_steps: int | None = None
    log_every: int = 50

    def done(self, step: int) -> bool:
        return self.max_steps is not None and step >= self.max_steps


class Hooks:
    """Rank 0's callbacks, run in rank 0's process (so they must pickle): the client's say in the run.
    This base class takes no mid-epoch snapshots and keeps nothing."""

    def snapshot_due(self, step: int, epoch: int, batch: int) -> bool:
        """After rank 0's step `step` (the next batch is `batch` of `epoch`): take a mid-epoch snapshot?"""
        return False

    def on_snapshot(self, snap: Snapshot) -> None:
        """Evaluate, log, checkpoint: whatever the client does with a snapshot (inside snap.clock.paused()
        for what must not count as training time)."""

    def on_end(self) -> None:
        """Every stage has stopped: the last snapshot was the run's last."""

    def result(self) -> object:
        """What the run returns to its caller in every process (it must pickle)."""
        return None


def epoch_record(snap: Snapshot, n_examples: int, epoch_time: float, complete_unlock: bool) -> dict:
    """The engine's figures of one epoch, for its metrics record."""
    reports = snap.reports
    record = {"samples_per_s": round(n_examples / max(epoch_time, 1e-9), 1), "epoch_time_s": round(epoch_time, 3),
              "train_loss": reports[-1].get("epoch_loss"),
              "staleness": [r["staleness"] for r in reports[:-1]],
              "staleness_max": [r["staleness_max"] for r in reports[:-1]],
              "dropped_targets": [r["dropped_targets"] for r in reports[:-1]],
              "targets_received": [r["targets_received"] for r in reports[:-1]],
              "stage_busy_s": [round(r["busy_s"], 3) for r in reports],
              "stage_idle_s": [round(r["idle_s"], 3) for r in reports],
              "stage_synth_s": [round(r["synth_s"], 3) for r in reports]}
    if complete_unlock:  # when each stage had run its own steps of the epoch (s since the start)
        record["stage_steps_done_s"] = [round(r["steps_done_s"], 3) for r in reports]
        record["targets_not_sent"] = [r["targets_not_sent"] for r in reports[1:]]
    return record


def run_first(w: StageWorker, feed: Feed, plan: Schedule, hooks: Hooks, clock: Clock) -> None:
    """Rank 0: the batches, epoch by epoch; snapshots when the hooks ask and at each epoch's end."""
    per_epoch = feed.batches_per_epoch()
    start_epoch, start_batch = w.next_batch
    done = plan.done(w.step)
    for epoch in range(start_epoch, plan.epochs):
        batch = start_batch if epoch == start_epoch else 0
        t_epoch, n_epoch, exhausted = time.perf_counter(), 0, True
        for xb, yb in feed.epoch(epoch, batch):
            if done:
                exhausted = False
                break
            if len(yb) > w.batch:
                raise ConfigError(f"a batch of {len(yb)} examples came after batches of {w.batch}: the engine sizes "
                                  "its messages by the first batch, so no later batch may be larger")
            xb, yb = xb.to(w.device), yb.to(w.device)
            w.run_step(xb, yb, epoch, batch, None, network_input=xb)
            batch += 1
            n_epoch += len(yb)
            done = plan.done(w.step)
            if not done and (per_epoch is None or batch < per_epoch) and hooks.snapshot_due(w.step, epoch, batch):
                t_pause = time.perf_counter()  # a mid-epoch snapshot is left out of the epoch's samples/s
                hooks.on_snapshot(gather(w, epoch, batch, MID_EPOCH, clock))
                t_epoch += time.perf_counter() - t_pause
        w.steps_done_s = time.perf_counter() - w.t0
        finished = per_epoch is not None and batch >= per_epoch or per_epoch is None and exhausted
        epoch_time = time.perf_counter() - t_epoch
        snap = gather(w, epoch, batch, EPOCH_END if finished else RUN_END, clock)
        snap.epoch_record = epoch_record(snap, n_epoch, epoch_time, w.complete)
        hooks.on_snapshot(snap)
        if done:
            break
    w.send_up(w.fwd_out_layout.pack(STOP, w.step, device=w.device))
    w.finish()


def pass_stop(w: StageWorker, f: Forward) -> None:
    """STOP from below: pass it on, then end this stage."""
    if w.fwd_out is not None:
        w.send_up(w.fwd_out_layout.pack(STOP, f.step, f.epoch, f.batch, 0, f.stats, device=w.device))
    w.finish()


def run_upper(w: StageWorker, log: StepLog | None) -> None:
    """Ranks 1..K-1: take what comes from below until STOP. The last rank logs the steps."""
    assert w.fwd_in is not None
    while True:
        msg = w.fwd_in.get(on_idle=w.drain_targets, idle=w.idle)
        assert msg is not None
        f = w.fwd_in_layout.unpack(msg)
        if f.kind == DATA:
            loss = w.run_step(f.h, f.labels, f.epoch, f.batch, f.stats)  # type: ignore[arg-type]
            if log is not None:
                assert loss is not None
                log.add(loss, f.stats, f.epoch, w.step)
        elif f.kind == SNAPSHOT:
            send_report(w, f, log)
        elif f.kind == STOP:
            pass_stop(w, f)
            return
