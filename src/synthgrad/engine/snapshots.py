"""Snapshots and step records: how every rank's state and statistics reach rank 0.

At an epoch's end, and whenever rank 0's hooks ask, rank 0 sends a SNAPSHOT up the pipeline. Each
stage passes it on and sends rank 0 a report: its StageRule's state, its position (what a resume
restores) and its profile. The last stage also ships the step records it has logged since the
previous snapshot: it sees every step's loss, and the lower stages' statistics ride up to it in
the header of each activation (`packets.StatsLayout`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from synthgrad.engine.links import TICK_S, LinkDown
from synthgrad.engine.packets import EPOCH_END, MID_EPOCH, SNAPSHOT, Forward
from synthgrad.engine.worker import StageWorker


def cpu(obj: object) -> object:
    """A copy of a (nested) state dict with every tensor on the CPU, for sending and saving."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(cpu(v) for v in obj)
    return obj


class Clock:
    """Seconds of the run (across resumes); what rank 0's hooks do inside `paused()` is left out."""

    def __init__(self, elapsed: float = 0.0):
        self.t0 = time.perf_counter() - elapsed
        self.left_out = 0.0

    def wall(self) -> float:
        return time.perf_counter() - self.t0 - self.left_out

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.left_out += time.perf_counter() - t


@dataclass
class Snapshot:
    """What rank 0's hooks receive: every rank's report, and the step records logged since the last one.

    flag: MID_EPOCH (a snapshot inside the epoch), EPOCH_END (every stage has run the whole of `epoch`,
        the next batch opens epoch + 1) or RUN_END (the run stopped inside `epoch`).
    next_batch: rank 0's next (epoch, batch): where a resume from this snapshot continues.
    reports[k]: rank k's {"state": StageRule state, "position", "busy_s", "idle_s", "synth_s",
        "staleness", "staleness_max", "dropped_targets", ...}.
    epoch_record: at an epoch's end, the engine's figures of the epoch (samples_per_s, epoch_time_s,
        stage_busy_s, staleness, ...), ready for a metrics record.
    """

    epoch: int
    step: int
    flag: int
    next_batch: tuple[int, int]
    reports: list[dict]
    records: list[dict]
    clock: Clock
    epoch_record: dict = field(default_factory=dict)

    @property
    def epoch_end(self) -> bool:
        return self.flag == EPOCH_END

    @property
    def mid_epoch(self) -> bool:
        return self.flag == MID_EPOCH

    def states(self) -> list[dict]:
        """Every rank's StageRule state, stage by stage."""
        return [r["state"] for r in self.reports]


class StepLog:
    """The last rank's running sums: the loss, and the lower stages' stats carried up; a step record
    every `log_every` steps, shipped to rank 0 with the next report."""

    def __init__(self, worker: StageWorker, log_every: int, state: dict | None = None):
        self.w, self.log_every = worker, log_every
        n = worker.stats.numel
        self.window_t, self.window_n = time.perf_counter(), 0
        self.loss_sum = self.loss_n = self.epoch_loss_sum = self.epoch_loss_n = 0.0
        self.stats_sum = torch.zeros(n, dtype=torch.float64)
        self.stats_n = torch.zeros(n, dtype=torch.float64)
        self.records: list[dict] = []
        if state:
            self.loss_sum, self.loss_n = state["loss_sum"], state["loss_n"]
            self.epoch_loss_sum, self.epoch_loss_n = state["epoch_loss_sum"], state["epoch_loss_n"]
            self.stats_sum, self.stats_n = state["stats_sum"].clone(), state["stats_n"].clone()

    def add(self, loss: float, stats: torch.Tensor, epoch: int, step: int) -> None:
        self.loss_sum, self.loss_n = self.loss_sum + loss, self.loss_n + 1
        self.epoch_loss_sum, self.epoch_loss_n = self.epoch_loss_sum + loss, self.epoch_loss_n + 1
        st = stats.double().cpu()
        ok = ~torch.isnan(st)
        self.stats_sum[ok] += st[ok]
        self.stats_n[ok] += 1
        self.window_n += self.w.batch
        if step % self.log_every == 0:
            self.records.append(self.record(epoch, step))

    def record(self, epoch: int, step: int) -> dict:
        now = time.perf_counter()
        means = (self.stats_sum / self.stats_n.clamp_min(1)).tolist()
        have = self.stats_n.tolist()
        layout = self.w.stats
        n = layout.interfaces

        def pick(i: int) -> float | None:
            return means[i] if have[i] else None

        record = {"kind": "step", "epoch": epoch, "step": step, "train_loss": self.loss_sum / max(self.loss_n, 1),
                  "synth_loss": [pick(layout.interface(k).start + 1) for k in range(n)],
                  "staleness": [pick(layout.interface(k).start) for k in range(n)],
                  "wall_time_s": round(now - self.w.t0, 3),
                  "samples_per_s": round(self.window_n / max(now - self.window_t, 1e-9), 1)}
        if layout.forward_interfaces:
            record["input_loss"] = [pick(layout.forward_interface(k)) for k in range(1, n + 1)]
        self.loss_sum = self.loss_n = 0.0
        self.stats_sum.zero_()
        self.stats_n.zero_()
        self.window_t, self.window_n = now, 0
        return record

    def take(self, epoch_end: bool) -> dict:
        """The records since the last report, and the epoch's mean loss (restarted at an epoch's end)."""
        out = {"records": self.records,
               "epoch_loss": self.epoch_loss_sum / self.epoch_loss_n if self.epoch_loss_n else None}
        self.records = []
        if epoch_end:
            self.epoch_loss_sum = self.epoch_loss_n = 0.0
        self.window_t, self.window_n = time.perf_counter(), 0
        return out

    def state(self) -> dict:
        return {"loss_sum": self.loss_sum, "loss_n": self.loss_n, "epoch_loss_sum": self.epoch_loss_sum,
                "epoch_loss_n": self.epoch_loss_n, "stats_sum": self.stats_sum.clone(),
                "stats_n": self.stats_n.clone()}


def report(w: StageWorker, epoch_end: bool, log: StepLog | None) -> dict:
    """This rank's report to rank 0. epoch_end: it goes into an epoch record, so the staleness
    statistics (which cover the epoch, mid-epoch snapshots included) start again after it."""
    rule = w.rule
    out = {"state": cpu(rule.state_dict()), "position": w.position(),
           "busy_s": time.perf_counter() - w.t0 - w.idle[0], "idle_s": w.idle[0], "synth_s": w.synth[0],
           "staleness": w.stale_sum / w.stale_n if w.stale_n else None,
           "staleness_max": w.stale_max if w.stale_n else None, "dropped_targets": rule.dropped,
           "targets_received": w.received}
    if w.complete:
        out["steps_done_s"], out["targets_not_sent"] = w.steps_done_s, w.not_sent
    if log is not None:
        out["position"]["log"] = log.state()
        out.update(log.take(epoch_end))
    if epoch_end:
        w.stale_sum, w.stale_n, w.stale_max = 0.0, 0, 0
    return out


def send_report(w: StageWorker, f: Forward, log: StepLog | None) -> None:
    """A SNAPSHOT from below: pass it on, then send rank 0 this rank's report."""
    if w.fwd_out is not None:
        w.send_up(w.fwd_out_layout.pack(SNAPSHOT, f.step, f.epoch, f.batch, f.flag, f.stats, device=w.device))
    epoch_end = f.flag == EPOCH_END
    if epoch_end:  # every stage has run the epoch, the next batch opens the next one
        w.next_batch = (f.epoch + 1, 0)
    dist.send_object_list([report(w, epoch_end, log)], dst=0)


def gather(w: StageWorker, epoch: int, batch: int, flag: int, clock: Clock) -> Snapshot:
    """Rank 0: send a SNAPSHOT up and collect every rank's report."""
    w.send_up(w.fwd_out_layout.pack(SNAPSHOT, w.step, epoch, batch, flag, device=w.device))
    epoch_end = flag == EPOCH_END
    if epoch_end:
        w.next_batch = (epoch + 1, 0)
    reports = [report(w, epoch_end, None)]
    # The reports come in on the default process group, in a thread: meanwhile this rank keeps taking the
    # targets that still come down, or the stage above, blocked on a full link to it, would never reach
    # the snapshot and report (a deadlock seen with 3 stages on a loaded machine).
    got: list = [None] * w.world
    error: list[str] = []

    def receive() -> None:
        try:
            for k in range(1, w.world):
                box: list = [None]
                dist.recv_object_list(box, src=k)
                got[k] = box[0]
        except Exception as e:  # noqa: BLE001 (gloo raises RuntimeError on a timeout or a broken peer)
            error.append(f"stage {k + 1}'s report never came ({e})")

    thread = threading.Thread(target=receive, name="reports", daemon=True)
    thread.start()
    while thread.is_alive():
        w.drain_targets()
        thread.join(TICK_S)
    if error:
        raise LinkDown(error[0])
    reports += got[1:]
    return Snapshot(epoch, w.step, flag, w.next_batch, reports, reports[-1].get("records", []), clock)
