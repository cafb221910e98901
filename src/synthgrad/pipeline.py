"""The pipeline engine: one process per stage over torch.distributed, each running the rule of ``rules.stage_step``.

Stage k lives in process (rank) k. Rank 0 reads the batches; activations travel up
together with the labels, and each stage sends the gradient that reached its input
down, where it becomes the target of the synthesizer below. A DNI stage never waits
for that target: it updates with its synthetic gradient at once and regresses its
synthesizer onto targets as they arrive (their staleness is logged). Method
``backprop`` gives the *locked* pipeline: each stage waits for the true gradient
from above, through the very same code path.

With the complete unlock (``unlock="complete"``) stage k >= 1 does not wait for the
activation from below either. Rank 0 broadcasts the training set once; every rank
walks the same batches, and stage k runs its step at once on a synthetic input
that its forward interface predicts from the network input. The real activations
still flow up (forward-only passes, which also update BN running statistics):
when the one of a past step arrives, stage k regresses its forward interface onto
it and sends its own real activation up. Targets from a stage that runs ahead wait
for their step in a bounded buffer, and a stage drops the targets that the stage
below is too slow to take rather than wait. Only an evaluation, which runs the real
composed network, waits for the real chain to catch up.

Launch locally with ``run_pipeline`` (``synthgrad train --stages K`` calls it): it
spawns K processes on 127.0.0.1 and a free port. Across machines, run this module
under torchrun, one process per stage, with a config.json (for instance that of an
earlier run, or one holding only the keys you change; ``stages`` must equal the
number of processes)::

    torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m synthgrad.pipeline --config cfg.json --run-dir runs/pipe

Environment variables read by each process (torchrun sets them all):
    RANK          this process's stage index, 0..K-1 (stage RANK + 1 in messages)
    WORLD_SIZE    K, the number of stages
    MASTER_ADDR   host of rank 0 (the rendezvous), MASTER_PORT its port
    LOCAL_RANK    index on this machine: picks the GPU (cuda:LOCAL_RANK mod GPUs) when --device cuda
    LOCAL_WORLD_SIZE  processes on this machine: threads per process = cores // this, unless --threads
    SYNTHGRAD_PIPELINE_TIMEOUT  seconds a stage waits for a peer before it gives up (default 120)
    SYNTHGRAD_PIN_CORES  0: do not pin each stage process to its own cores (see `pin_to_cores`)

With --device cuda, links use NCCL when the machine has a GPU per local process. With fewer
GPUs than stages (NCCL cannot put two ranks on one GPU), the stages share the GPUs and the
links use gloo, with each message staged through host memory.

Only rank 0 touches the data and the run directory (config.json, metrics.jsonl,
checkpoint.pt, best.pt, final.pt, in the formats of the single-process trainer).
checkpoint.pt also holds each rank's position ("positions"): with --resume, rank 0
reads it and sends it to every rank, and each stage continues from where it was.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import multiprocessing.connection
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from synthgrad import __version__, checkpoint, data
from synthgrad.config import TrainConfig
from synthgrad.errors import ConfigError, StageFailure, SynthgradError, require
from synthgrad.interfaces import BackwardInterface, ForwardInterface, optimizer_to
from synthgrad.metrics import MetricsLog, read_metrics
from synthgrad.rules import DNI, StepRule, activation_shapes, frozen_batchnorm_stats, stage_step
from synthgrad.trainer import CONFIG, METRICS, RunResult, build_rule, evaluate

# Packet kinds: the first float of every message. SAVE: every stage reports its state, and rank 0
# writes checkpoint.pt (a mid-epoch snapshot, every --checkpoint-every steps); EVAL does the same and
# evaluates the composed network (at each epoch's end).
DATA, EVAL, STOP, NONE, SAVE = 0.0, 1.0, 2.0, 3.0, 4.0
FWD_HEAD = 4  # forward header: kind, step, epoch, batch (EVAL: 1 if the epoch is complete)
BWD_HEAD = 2  # backward header: kind (DATA or NONE: no gradient this step), step
TICK_S = 0.005  # how often a waiting stage looks at arrived targets and at its links' health
DEFAULT_INFLIGHT = 2  # activations a stage may have sent and not yet seen received (backpressure)


def link_timeout() -> float:
    """Seconds a stage waits for a peer before it declares it lost."""
    return float(os.environ.get("SYNTHGRAD_PIPELINE_TIMEOUT", "120"))


class LinkDown(RuntimeError):
    """A peer stopped answering or closed its connection (a consequence, rarely the cause, of a failure)."""


# ----------------------------------------------------------------------------- links

class Inbox:
    """Messages from one peer, received by a thread into a bounded queue (the stage never blocks to poll).

    Messages arrive on `link_device` (the host for gloo) and are queued on `device`, the stage's.
    """

    def __init__(self, src: int, group: dist.ProcessGroup, numel: int, device: torch.device,
                 maxsize: int, what: str, link_device: torch.device | None = None):
        self.src, self.group, self.numel, self.device, self.what = src, group, numel, device, what
        self.link_device = link_device or device
        self.q: queue.Queue[torch.Tensor] = queue.Queue(maxsize)
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, name=f"recv-{what}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                buf = torch.empty(self.numel, device=self.link_device)  # [header + payload], float32
                dist.recv(buf, src=self.src, group=self.group)
                self.q.put(buf.to(self.device))  # blocks while full: backpressure on the sender
                if float(buf[0]) == STOP:
                    return
        except Exception as e:  # noqa: BLE001 (gloo and NCCL raise RuntimeError and others)
            self.error = f"lost the link to stage {self.src + 1} ({self.what}): {e}"

    def get(self, block: bool = True, on_idle: Callable[[], None] | None = None,
            idle: list[float] | None = None) -> torch.Tensor | None:
        """The next message; None at once when not `block` and none has arrived. Waiting time goes to idle[0]."""
        deadline = time.monotonic() + link_timeout()
        t0 = time.perf_counter()
        try:
            while True:
                try:
                    return self.q.get(timeout=TICK_S) if block else self.q.get_nowait()
                except queue.Empty:
                    if self.error:
                        raise LinkDown(self.error) from None
                    if not block:
                        return None
                    if on_idle is not None:
                        on_idle()
                    if time.monotonic() > deadline:
                        raise LinkDown(f"no {self.what} from stage {self.src + 1} for {link_timeout():.0f} s; "
                                       "it is stuck or dead (set SYNTHGRAD_PIPELINE_TIMEOUT to wait longer)") from None
        finally:
            if idle is not None and block:
                idle[0] += time.perf_counter() - t0


class Outbox:
    """Messages to one peer, sent by a thread from a bounded queue: `put` blocks only when it is full.

    Each message is copied to `link_device` (the host for gloo) by the sending thread, off the stage's path.
    """

    def __init__(self, dst: int, group: dist.ProcessGroup, maxsize: int, what: str,
                 link_device: torch.device | None = None):
        self.dst, self.group, self.what, self.link_device = dst, group, what, link_device
        self.q: queue.Queue[torch.Tensor | None] = queue.Queue(maxsize)
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, name=f"send-{what}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                msg = self.q.get()
                if msg is None:
                    return
                if self.link_device is not None:
                    msg = msg.to(self.link_device)
                dist.send(msg, dst=self.dst, group=self.group)
                self.q.task_done()
        except Exception as e:  # noqa: BLE001
            self.error = f"lost the link to stage {self.dst + 1} ({self.what}): {e}"

    def _check(self, deadline: float) -> None:
        if self.error:
            raise LinkDown(self.error)
        if time.monotonic() > deadline:
            raise LinkDown(f"stage {self.dst + 1} took no {self.what} for {link_timeout():.0f} s; it is stuck or "
                           "dead (set SYNTHGRAD_PIPELINE_TIMEOUT to wait longer)")

    def put(self, msg: torch.Tensor, on_idle: Callable[[], None] | None = None,
            idle: list[float] | None = None) -> None:
        deadline = time.monotonic() + link_timeout()
        t0 = time.perf_counter()
        while True:
            try:
                self.q.put(msg, timeout=TICK_S)
                break
            except queue.Full:
                self._check(deadline)
                if on_idle is not None:
                    on_idle()
        if idle is not None:
            idle[0] += time.perf_counter() - t0

    def offer(self, msg: torch.Tensor) -> bool:
        """Queue `msg` if there is room, never waiting; False when the queue is full (the caller drops it)."""
        if self.error:
            raise LinkDown(self.error)
        try:
            self.q.put_nowait(msg)
        except queue.Full:
            return False
        return True

    def close(self, on_idle: Callable[[], None] | None = None) -> None:
        """Wait until every message is sent, then end the thread."""
        deadline = time.monotonic() + link_timeout()
        while self.q.unfinished_tasks:
            self._check(deadline)
            if on_idle is not None:
                on_idle()
            time.sleep(TICK_S)
        self.q.put(None)
        self.thread.join(timeout=5)


# ----------------------------------------------------------------------------- the stage process

class Boundary:
    """The interface above a stage, as `stage_step` sees it: sends h up as soon as it exists.

    dni: then predicts with the real BackwardInterface (`inner`).
    locked (inner None): then waits for the true gradient dL/dh from the stage above and
    returns it; `stage_gradient` passes it through unchanged (batch-mean units).
    """

    def __init__(self, inner: BackwardInterface | None, send: Callable[[torch.Tensor], None],
                 wait_gradient: Callable[[], torch.Tensor]):
        self.inner, self.send, self.wait_gradient = inner, send, wait_gradient
        self.sent = False

    def predict(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        self.send(h.detach())
        self.sent = True
        if self.inner is None:
            return self.wait_gradient()
        # No graph: the synthesizer regresses on a fresh prediction when the target arrives (`apply_target`).
        with torch.no_grad():
            return self.inner.predict(h, context)

    def stage_gradient(self, prediction: torch.Tensor, step: int = 0) -> torch.Tensor:
        return prediction if self.inner is None else self.inner.stage_gradient(prediction, step)


def _cpu(obj: object) -> object:
    """A copy of a (nested) state dict with every tensor on the CPU, for sending and saving."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_cpu(v) for v in obj)
    return obj


@dataclass
class StageOptions:
    """Knobs of the engine itself (not of the training run)."""

    max_inflight: int = DEFAULT_INFLIGHT
    quiet: bool = False
    fault: tuple[int, int] | None = None  # test hook: (rank, step) at which that rank raises
    slow: tuple[int, float] | None = None  # test hook: (rank, seconds) that rank sleeps in each of its steps
    resume: bool = False  # continue from the run directory's checkpoint.pt (rank 0 reads it, sends it to all)


class StageProcess:
    """One rank: its stage, optimizer and the interface above it; the loop that feeds `stage_step`."""

    def __init__(self, cfg: TrainConfig, rank: int, world: int, run_dir: Path,
                 dataset: data.Dataset | None, opts: StageOptions):
        self.cfg, self.rank, self.world, self.run_dir, self.opts = cfg, rank, world, run_dir, opts
        self.last = rank == world - 1
        self.locked = cfg.method == "backprop"
        cuda = cfg.device.startswith("cuda")
        local = int(os.environ.get("LOCAL_RANK", rank))
        self.device = torch.device(f"cuda:{local % torch.cuda.device_count()}") if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        # Rank 0 tells the others the data's shape and size (only it reads the data).
        meta = [None]
        if rank == 0:
            assert dataset is not None
            meta = [(tuple(dataset.input_shape), dataset.num_classes, len(dataset.train_y))]
        dist.broadcast_object_list(meta, src=0)
        self.input_shape, self.num_classes, self.num_train = meta[0]
        self.dataset = dataset
        # Complete unlock: a stage with a synthetic input predicts it from the network input, so every
        # rank needs the training batches itself; rank 0 broadcasts the training set once.
        self.complete = cfg.unlock == "complete" and not self.locked
        if self.complete:
            tx = torch.empty(self.num_train, *self.input_shape, device=self.device)
            ty = torch.empty(self.num_train, dtype=torch.int64, device=self.device)
            if rank == 0:
                assert dataset is not None
                tx.copy_(dataset.train_x)
                ty.copy_(dataset.train_y)
            dist.broadcast(tx, src=0)
            dist.broadcast(ty, src=0)
            self.train_xy = (tx, ty)
        self.orders: dict[int, torch.Tensor] = {}  # epoch -> example order (the last two epochs)
        # Every rank builds the whole model from cfg.seed (identical init), then keeps its own part.
        self.rule: StepRule = build_rule(cfg, self.input_shape, self.num_classes)
        # Resume: rank 0 reads checkpoint.pt and sends it to every rank (only rank 0 sees the run directory).
        self.resumed: dict | None = None
        if opts.resume:
            per_epoch = data.num_batches(self.num_train, cfg.batch_size)
            got = [load_resume_state(run_dir, world, per_epoch) if rank == 0 else None]
            dist.broadcast_object_list(got, src=0)
            self.resumed = got[0]
            self.rule.load_state_dict(self.resumed["rule"])
        # Message sizes: the per-example activation shape at every boundary (one CPU forward pass).
        shapes = activation_shapes(list(self.rule.stages), torch.zeros(2, *self.input_shape))
        self.stage = self.rule.stages[rank].to(self.device)
        self.optimizer = self.rule.optimizers[rank]
        optimizer_to(self.optimizer, self.device)
        self.interface = self.rule.interfaces[rank] if (not self.locked and not self.last) else None
        if self.interface is not None:
            self.interface.to(self.device)
        # Complete unlock: the forward interface in front of this stage (none in front of stage 1).
        self.forward_interface: ForwardInterface | None = None
        if self.complete and rank > 0:
            self.forward_interface = self.rule.forward_interfaces[rank - 1].to(self.device)  # type: ignore[assignment]
        if rank == 0:
            self.rule.stages.to(self.device)  # rank 0 assembles and evaluates the composed network
        self.rule.train()
        # Rank-local randomness (update_prob draws): a per-rank seed.
        torch.manual_seed(cfg.seed + 1_000_003 * rank)
        self.updates = torch.Generator().manual_seed(cfg.seed * 1009 + 7 + rank)
        self.in_shape = self.input_shape if rank == 0 else shapes[rank - 1]
        self.out_shape = shapes[rank]
        b = cfg.batch_size
        self.stats_len = 2 * (world - 1)  # per interface: staleness, synth_loss of the latest target
        if self.complete:
            self.stats_len += world - 1  # per forward interface: input_loss of its latest regression
        # Links: a process group per link and direction, so that no two threads share one.
        fwd_groups = [dist.new_group([k, k + 1]) for k in range(world - 1)]
        bwd_groups = [dist.new_group([k, k + 1]) for k in range(world - 1)]
        m = opts.max_inflight
        # gloo moves host tensors only: GPU stages that share GPUs (see run_rank) stage messages through the host.
        link = torch.device("cpu") if dist.get_backend() == "gloo" else self.device
        self.fwd_in = self.fwd_out = self.bwd_in = self.bwd_out = None
        if rank > 0:
            n_in = math.prod(self.in_shape)
            self.fwd_in = Inbox(rank - 1, fwd_groups[rank - 1], FWD_HEAD + self.stats_len + b + b * n_in,
                                self.device, 1, "activations", link)
            self.bwd_out = Outbox(rank - 1, bwd_groups[rank - 1], m + 2, "targets", link)
        if not self.last:
            n_out = math.prod(self.out_shape)
            self.fwd_out = Outbox(rank + 1, fwd_groups[rank], m, "activations", link)
            self.bwd_in = Inbox(rank + 1, bwd_groups[rank], BWD_HEAD + b * n_out, self.device, m + 2, "targets",
                                link)
            self.fwd_numel = FWD_HEAD + self.stats_len + b + b * n_out
        # DNI: (step, h, context) of recent steps, until their targets arrive.
        self.history: deque[tuple[int, torch.Tensor, torch.Tensor | None]] = deque(maxlen=2 * m + 8)
        # Complete unlock: the stage above may run ahead, so targets can come for steps this stage has
        # not run yet; up to this many wait here for their step (more are dropped).
        self.early: deque[torch.Tensor] = deque()
        self.early_max = 2 * m + 8
        self.held: torch.Tensor | None = None  # complete unlock: an EVAL or STOP from below, not yet acted on
        self.not_sent = 0  # complete unlock: targets dropped because the link down was full
        self.input_loss = math.nan  # complete unlock: this stage's latest forward interface regression loss
        self.steps_done_s = math.nan  # when this rank finished its own steps of the epoch (s since start)
        self.stopped_above = False
        # Bookkeeping.
        self.step = 0  # steps this stage has run
        self.next_batch = (0, 0)  # (epoch, batch) of the next batch this stage will run
        self.synth, self.idle = [0.0], [0.0]  # seconds in synthesizer updates, seconds waiting for a peer
        self.elapsed0 = 0.0  # seconds of training before a resume
        self.my_stats = [math.nan, math.nan]  # (staleness, synth_loss) of this stage's latest target
        self.stale_sum, self.stale_n, self.stale_max, self.dropped = 0.0, 0, 0, 0
        self.records: list[dict] = []  # last rank: step records, shipped to rank 0 at each EVAL or SAVE
        if self.resumed is not None:
            self.restore(self.resumed["positions"][rank], self.resumed["elapsed"])

    def restore(self, pos: dict, elapsed: float) -> None:
        """Take up this rank's position and counters from a checkpoint (see `report`)."""
        self.step, self.next_batch = pos["step"], tuple(pos["next_batch"])
        self.updates.set_state(pos["updates_rng"])
        torch.set_rng_state(pos["torch_rng"])
        self.idle[0], self.synth[0], self.elapsed0 = pos["idle_s"], pos["synth_s"], elapsed

    # -- messages ---------------------------------------------------------------------------
    def forward_packet(self, kind: float, step: int, epoch: int, batch: int, stats: torch.Tensor,
                       y: torch.Tensor | None = None, h: torch.Tensor | None = None) -> torch.Tensor:
        """[kind, step, epoch, batch, stats (2 per interface), labels [B], activation [B * D]] as float32."""
        head = torch.tensor([kind, step, epoch, batch], dtype=torch.float32, device=self.device)
        if y is None:
            return torch.cat([head, stats, torch.zeros(self.fwd_numel - FWD_HEAD - self.stats_len,
                                                       device=self.device)])
        return torch.cat([head, stats, y.float(), h.reshape(-1).float()])

    def drain_targets(self) -> None:
        """Apply every target that has arrived from above (DNI), without waiting for any."""
        if self.bwd_in is None or self.locked or self.stopped_above:
            return
        while self.early and int(self.early[0][1]) < self.step:  # complete unlock: their step has run now
            self.apply_target(self.early.popleft())
        while (msg := self.bwd_in.get(block=False)) is not None:
            self.apply_target(msg)

    def apply_target(self, msg: torch.Tensor) -> None:
        kind, s = float(msg[0]), int(msg[1])
        if kind == STOP:
            self.stopped_above = True
            return
        if self.complete and s >= self.step:  # from a stage above that runs ahead: keep it until step s has run
            if len(self.early) < self.early_max:
                self.early.append(msg)
            else:
                self.dropped += 1
            return
        while self.history and self.history[0][0] < s:
            self.history.popleft()  # steps whose target never came (the stage above skipped its update)
        if kind == NONE:
            return
        if not self.history or self.history[0][0] != s:
            self.dropped += 1  # its activation left the bounded history: too stale to use
            return
        t0 = time.perf_counter()
        _, h, ctx = self.history.popleft()
        target = msg[BWD_HEAD:].view(h.shape)  # dL/dh, batch-mean units, [B, ...]
        assert self.interface is not None
        # Predict again: the synthesizer has moved since step s, and graphs do not outlive a step.
        synth_loss = self.interface.update(self.interface.predict(h, ctx), target)
        staleness = self.step - 1 - s  # this stage's updates between the activation and its target
        self.stale_sum, self.stale_n = self.stale_sum + staleness, self.stale_n + 1
        self.stale_max = max(self.stale_max, staleness)
        self.my_stats = [float(staleness), synth_loss]
        self.synth[0] += time.perf_counter() - t0

    def wait_gradient(self) -> torch.Tensor:
        """Locked pipeline: block until the true gradient of this step comes down."""
        assert self.bwd_in is not None
        msg = self.bwd_in.get(idle=self.idle)
        assert msg is not None and int(msg[1]) == self.step and float(msg[0]) == DATA, "gradient out of order"
        return msg[BWD_HEAD:].view(self.cfg.batch_size, *self.out_shape)

    def send_down(self, step: int, grad: torch.Tensor | None) -> None:
        if self.bwd_out is None:
            return
        if grad is None:
            msg = torch.zeros(BWD_HEAD + grad_numel(self.cfg.batch_size, self.in_shape), device=self.device)
            msg[0], msg[1] = NONE, step
        else:
            msg = torch.cat([torch.tensor([DATA, step], dtype=torch.float32, device=self.device),
                             grad.reshape(-1).float()])
        if self.complete:
            # Never wait for the stage below: when it is too slow to take its targets, drop them.
            if not self.bwd_out.offer(msg):
                self.not_sent += 1
            return
        self.bwd_out.put(msg, on_idle=self.drain_targets, idle=self.idle)

    # -- one step ---------------------------------------------------------------------------
    def run_step(self, x: torch.Tensor, y: torch.Tensor, epoch: int, batch: int, stats: torch.Tensor) -> float | None:
        """stage_step on one batch; sends h up (inside, as soon as it exists) and the input gradient down."""
        cfg, step = self.cfg, self.step
        if self.opts.fault is not None and self.opts.fault == (self.rank, step):
            raise RuntimeError(f"injected fault at step {step} (test hook)")
        if self.opts.slow is not None and self.opts.slow[0] == self.rank:
            time.sleep(self.opts.slow[1])  # test hook: a slow stage
        if cfg.schedule != "constant":
            self.rule.set_lr_factor(cfg.lr_factor(step, cfg.total_steps(self.num_train)))
        update = cfg.update_prob >= 1.0 or bool(torch.rand(1, generator=self.updates) < cfg.update_prob)
        ctx = self.rule.context(y) if isinstance(self.rule, DNI) else None
        fi = self.forward_interface
        boundary: Boundary | BackwardInterface | None = None
        if fi is not None:
            # Complete unlock: run on a synthetic input predicted from the network input x, at once; the
            # real activation from below trains `fi` and goes up later (`run_real`), so nothing is sent here.
            with torch.no_grad():
                x = fi.predict(x, ctx)
            boundary = self.interface
        elif not self.last:
            stats = stats.clone()
            stats[2 * self.rank:2 * self.rank + 2] = torch.tensor(self.my_stats)
            self.my_stats = [math.nan, math.nan]

            def send(h: torch.Tensor) -> None:
                self.fwd_out.put(self.forward_packet(DATA, step, epoch, batch, stats, y, h),
                                 on_idle=self.drain_targets, idle=self.idle)

            boundary = Boundary(self.interface, send, self.wait_gradient)
        # Batch statistics of a synthetic input must not reach BN running statistics (the real pass does).
        with frozen_batchnorm_stats([self.stage]) if fi is not None else contextlib.nullcontext():
            res = stage_step(self.stage, self.optimizer, x, index=self.rank, step=step,
                             interface=boundary, context=ctx, labels=y,  # type: ignore[arg-type]
                             input_grad=self.rank > 0, update=update)
        if isinstance(boundary, Boundary) and not boundary.sent:  # no update: stage_step never predicted
            boundary.send(res.output)
        if self.interface is not None:
            self.history.append((step, res.output, ctx))
        self.step += 1
        self.next_batch = (epoch, batch + 1)
        self.send_down(step, res.input_grad)
        self.drain_targets()
        if fi is not None:
            self.drain_real()
        return None if res.loss is None else res.loss.item()

    # -- complete unlock: the real chain ------------------------------------------------------
    def epoch_order(self, epoch: int) -> torch.Tensor:
        if epoch not in self.orders:
            if len(self.orders) >= 2:
                del self.orders[min(self.orders)]
            self.orders[epoch] = data.epoch_order(self.num_train, self.cfg.seed, epoch).to(self.device)
        return self.orders[epoch]

    def drain_real(self) -> None:
        """Take every real activation that has arrived from below, without waiting; hold an EVAL or STOP."""
        assert self.fwd_in is not None
        while self.held is None and (msg := self.fwd_in.get(block=False)) is not None:
            if float(msg[0]) == DATA:
                self.run_real(msg)
            elif float(msg[0]) == SAVE:
                self.send_report(msg)  # a snapshot takes this stage as it is, ahead or behind
            else:
                self.held = msg  # acted on once this rank has run its own steps of the epoch

    def real_until_control(self) -> torch.Tensor:
        """Complete unlock, own steps done: take the real chain (and snapshots) until an EVAL or STOP."""
        while (kind := float((msg := self.next_from_below())[0])) in (DATA, SAVE):
            if kind == DATA:
                self.run_real(msg)
            else:
                self.send_report(msg)
        return msg

    def next_from_below(self) -> torch.Tensor:
        """The held EVAL or STOP, else the next message from below (waiting for it)."""
        assert self.fwd_in is not None
        if self.held is not None:
            msg, self.held = self.held, None
            return msg
        msg = self.fwd_in.get(on_idle=self.drain_targets, idle=self.idle)
        assert msg is not None
        return msg

    def run_real(self, msg: torch.Tensor) -> None:
        """The real activation of a past step came from below: regress the forward interface onto it, then
        run the forward-only real pass (it updates BN running statistics) and send its result up."""
        assert self.forward_interface is not None
        b, n = self.cfg.batch_size, self.stats_len
        _, s, epoch, batch = (int(v) for v in msg[:FWD_HEAD].tolist())
        stats = msg[FWD_HEAD:FWD_HEAD + n].clone()
        y = msg[FWD_HEAD + n:FWD_HEAD + n + b].long()
        real = msg[FWD_HEAD + n + b:].view(b, *self.in_shape)
        # The network input of step s, from the epoch order that every rank shares (no buffer needed).
        idx = self.epoch_order(epoch)[batch * b:(batch + 1) * b]
        x = self.train_xy[0][idx]
        ctx = self.rule.context(y) if isinstance(self.rule, DNI) else None
        t0 = time.perf_counter()
        # Predict again: the forward interface has moved since step s, and graphs do not outlive a step.
        self.input_loss = self.forward_interface.update(self.forward_interface.predict(x, ctx), real)
        self.synth[0] += time.perf_counter() - t0
        with torch.no_grad():
            out = self.stage(real)
        stats[2 * (self.world - 1) + self.rank - 1] = self.input_loss
        if self.last:
            self.log_step(self.rule.loss_fn(out, y).item(), stats, epoch, s + 1)
            return
        stats[2 * self.rank:2 * self.rank + 2] = torch.tensor(self.my_stats)
        self.my_stats = [math.nan, math.nan]
        self.fwd_out.put(self.forward_packet(DATA, s, epoch, batch, stats, y, out),
                         on_idle=self.drain_targets, idle=self.idle)

    # -- the loops --------------------------------------------------------------------------
    def run(self) -> None:
        dist.barrier()
        self.t0 = time.perf_counter() - self.elapsed0  # wall times continue across a resume
        self.paused = 0.0  # rank 0: seconds spent writing checkpoints (off the wall clock, see `wall`)
        if self.rank == 0:
            self.run_first()
        elif self.complete:
            self.run_complete()
        else:
            self.run_upper()

    def log_step(self, loss: float, stats: torch.Tensor, epoch: int, step: int) -> None:
        """Last rank: add one step's loss and the lower stages' stats (carried up in the headers); every
        log_every steps, a step record (shipped to rank 0 at the next EVAL)."""
        self.loss_sum, self.loss_n = self.loss_sum + loss, self.loss_n + 1
        self.epoch_loss_sum, self.epoch_loss_n = self.epoch_loss_sum + loss, self.epoch_loss_n + 1
        st = stats.double().cpu()
        ok = ~torch.isnan(st)
        self.stats_sum[ok] += st[ok]
        self.stats_n[ok] += 1
        self.window_n += self.cfg.batch_size
        if step % self.cfg.log_every == 0:
            now = time.perf_counter()
            means = (self.stats_sum / self.stats_n.clamp_min(1)).tolist()
            have = self.stats_n.tolist()
            n = self.world - 1
            record = {
                "kind": "step", "epoch": epoch, "step": step, "train_loss": self.loss_sum / self.loss_n,
                "synth_loss": [means[2 * i + 1] if have[2 * i + 1] else None for i in range(n)],
                "staleness": [means[2 * i] if have[2 * i] else None for i in range(n)],
                "wall_time_s": round(now - self.t0, 3),
                "samples_per_s": round(self.window_n / max(now - self.window_t, 1e-9), 1)}
            if self.complete:
                record["input_loss"] = [means[2 * n + i] if have[2 * n + i] else None for i in range(n)]
            self.records.append(record)
            self.loss_sum = self.loss_n = 0.0
            self.stats_sum.zero_()
            self.stats_n.zero_()
            self.window_t, self.window_n = now, 0

    def reset_log(self) -> None:
        """Start the last rank's running sums: empty, or as the checkpoint left them."""
        self.window_t, self.window_n = time.perf_counter(), 0
        self.loss_sum = self.loss_n = self.epoch_loss_sum = self.epoch_loss_n = 0.0
        self.stats_sum = torch.zeros(self.stats_len, dtype=torch.float64)
        self.stats_n = torch.zeros(self.stats_len, dtype=torch.float64)
        log = self.resumed["positions"][self.rank].get("log") if self.resumed is not None else None
        if log:
            self.loss_sum, self.loss_n = log["loss_sum"], log["loss_n"]
            self.epoch_loss_sum, self.epoch_loss_n = log["epoch_loss_sum"], log["epoch_loss_n"]
            self.stats_sum, self.stats_n = log["stats_sum"].clone(), log["stats_n"].clone()

    def log_state(self) -> dict:
        """The last rank's running sums, for the checkpoint."""
        return {"loss_sum": self.loss_sum, "loss_n": self.loss_n, "epoch_loss_sum": self.epoch_loss_sum,
                "epoch_loss_n": self.epoch_loss_n, "stats_sum": self.stats_sum.clone(),
                "stats_n": self.stats_n.clone()}

    def send_report(self, msg: torch.Tensor) -> None:
        """EVAL or SAVE from below: pass it on, then send rank 0 this rank's state (and the last rank's records)."""
        kind, step, epoch, batch = (int(v) for v in msg[:FWD_HEAD].tolist())
        stats = msg[FWD_HEAD:FWD_HEAD + self.stats_len]
        if self.fwd_out is not None:
            self.fwd_out.put(self.forward_packet(float(kind), step, epoch, batch, stats),
                             on_idle=self.drain_targets, idle=self.idle)
        epoch_end = kind == EVAL and bool(batch)  # every stage has run the whole epoch
        if epoch_end:  # the next batch opens the next epoch
            self.next_batch = (epoch + 1, 0)
        extra = {}
        if self.last:
            extra["records"], self.records = self.records, []
            extra["epoch_loss"] = self.epoch_loss_sum / self.epoch_loss_n if self.epoch_loss_n else None
            if epoch_end:
                self.epoch_loss_sum = self.epoch_loss_n = 0.0
        dist.send_object_list([{**self.report(epoch_end), **extra}], dst=0)
        self.window_t, self.window_n = time.perf_counter(), 0

    def pass_stop(self, msg: torch.Tensor) -> None:
        """STOP from below: pass it on, then end this stage (`finish`)."""
        _, step, epoch, batch = (int(v) for v in msg[:FWD_HEAD].tolist())
        if self.fwd_out is not None:
            self.fwd_out.put(self.forward_packet(STOP, step, epoch, batch, msg[FWD_HEAD:FWD_HEAD + self.stats_len]),
                             on_idle=self.drain_targets, idle=self.idle)
        self.finish()

    def run_complete(self) -> None:
        """Ranks 1..K-1 with the complete unlock: run this rank's own steps on synthetic inputs, never waiting
        for the stage below; the real chain from below is taken between steps. Only at an evaluation (which
        runs the real network) does this rank wait for the real chain to catch up."""
        cfg = self.cfg
        x_train, y_train = self.train_xy
        self.reset_log()
        # This rank's own position: it runs ahead of (or behind) rank 0, and resumes where it was.
        start_epoch, start_batch = self.next_batch
        done = cfg.max_steps is not None and self.step >= cfg.max_steps
        for epoch in range(start_epoch, cfg.epochs):
            order = self.epoch_order(epoch)
            first = start_batch if epoch == start_epoch else 0
            for batch, (xb, yb) in enumerate(data.batches(x_train, y_train, cfg.batch_size, order, start=first),
                                             start=first):
                if done:
                    break
                self.run_step(xb, yb, epoch, batch, None)  # type: ignore[arg-type]
                done = cfg.max_steps is not None and self.step >= cfg.max_steps
            self.steps_done_s = time.perf_counter() - self.t0
            msg = self.real_until_control()
            if float(msg[0]) != EVAL:
                raise RuntimeError(f"stage {self.rank + 1}: STOP from below before the evaluation of epoch {epoch}")
            self.send_report(msg)
            if done:
                break
        msg = self.real_until_control()
        if float(msg[0]) != STOP:
            raise RuntimeError(f"stage {self.rank + 1}: an evaluation from below after the last epoch")
        self.pass_stop(msg)

    def run_upper(self) -> None:
        """Ranks 1..K-1: take what comes from below until STOP."""
        b = self.cfg.batch_size
        self.reset_log()
        assert self.fwd_in is not None
        while True:
            msg = self.fwd_in.get(on_idle=self.drain_targets, idle=self.idle)
            assert msg is not None
            kind, step, epoch, batch = (int(v) for v in msg[:FWD_HEAD].tolist())
            stats = msg[FWD_HEAD:FWD_HEAD + self.stats_len]
            if kind == DATA:
                y = msg[FWD_HEAD + self.stats_len:FWD_HEAD + self.stats_len + b].long()
                x = msg[FWD_HEAD + self.stats_len + b:].view(b, *self.in_shape)
                loss = self.run_step(x, y, epoch, batch, stats)
                if self.last:  # the last rank logs: the loss, and the lower stages' stats carried up
                    assert loss is not None
                    self.log_step(loss, stats, epoch, self.step)
            elif kind in (EVAL, SAVE):
                self.send_report(msg)
            elif kind == STOP:
                self.pass_stop(msg)
                return

    def report(self, epoch_end: bool) -> dict:
        """What rank 0 needs from this rank at an evaluation or snapshot: parameters, optimizer states,
        profile, and the position and counters that a resume restores (`restore`).

        epoch_end: this report goes into an epoch record, so the staleness statistics (which cover
        the epoch, mid-epoch snapshots included) start again after it."""
        out = {"stage": _cpu(self.stage.state_dict()), "optimizer": _cpu(self.optimizer.state_dict()),
               "interface": None if self.interface is None else _cpu(self.interface.state_dict()),
               "busy_s": time.perf_counter() - self.t0 - self.idle[0], "idle_s": self.idle[0],
               "synth_s": self.synth[0],
               "staleness": self.stale_sum / self.stale_n if self.stale_n else None,
               "staleness_max": self.stale_max if self.stale_n else None, "dropped_targets": self.dropped,
               "position": {"step": self.step, "next_batch": list(self.next_batch),
                            "updates_rng": self.updates.get_state(), "torch_rng": torch.get_rng_state(),
                            "idle_s": self.idle[0], "synth_s": self.synth[0],
                            "log": self.log_state() if self.last else None}}
        if self.complete:
            out["forward_interface"] = (None if self.forward_interface is None
                                        else _cpu(self.forward_interface.state_dict()))
            out["steps_done_s"], out["targets_not_sent"] = self.steps_done_s, self.not_sent
        if epoch_end:
            self.stale_sum, self.stale_n, self.stale_max = 0.0, 0, 0
        return out

    def finish(self) -> None:
        """STOP came from below: send it on, take the last targets, send STOP down, flush every link."""
        if self.bwd_in is not None:
            while not self.stopped_above:
                msg = self.bwd_in.get(idle=self.idle)
                assert msg is not None
                if self.locked:
                    self.stopped_above = float(msg[0]) == STOP
                else:
                    self.apply_target(msg)
        if self.bwd_out is not None:
            msg = torch.zeros(BWD_HEAD + grad_numel(self.cfg.batch_size, self.in_shape), device=self.device)
            msg[0] = STOP
            self.bwd_out.put(msg)
            self.bwd_out.close()
        if self.fwd_out is not None:
            self.fwd_out.close()

    def run_first(self) -> None:
        """Rank 0: the data loop (the trainer's order), evaluations, metrics and checkpoints."""
        cfg, ds = self.cfg, self.dataset
        assert ds is not None and self.fwd_out is not None
        x_train, y_train = ds.train_x.to(self.device), ds.train_y.to(self.device)
        x_test, y_test = ds.test_x.to(self.device), ds.test_y.to(self.device)
        per_epoch = data.num_batches(len(x_train), cfg.batch_size)
        metrics = MetricsLog(self.run_dir / METRICS)
        best, final = -1.0, math.nan
        if self.resumed is not None:
            # Drop metric lines written after the checkpoint, including a line torn by a kill.
            metrics.truncate(self.resumed["metrics_offset"])
            best, final = self.resumed["best_accuracy"], self.resumed["final_accuracy"]
        if not self.opts.quiet:
            verb = f"resuming at step {self.step}" if self.resumed is not None else "training"
            print(f"{verb} {cfg.model} on {cfg.dataset} with {cfg.method}, a pipeline of {self.world} "
                  f"processes ({ds.source}); run directory {self.run_dir}", file=sys.stderr, flush=True)
        start_epoch, start_batch = self.next_batch
        done = cfg.max_steps is not None and self.step >= cfg.max_steps
        for epoch in range(start_epoch, cfg.epochs):
            order = data.epoch_order(len(x_train), cfg.seed, epoch).to(self.device)
            batch = start_batch if epoch == start_epoch else 0
            t_epoch, n_epoch = time.perf_counter(), 0
            for xb, yb in data.batches(x_train, y_train, cfg.batch_size, order, start=batch):
                if done:
                    break
                self.run_step(xb, yb, epoch, batch, self.no_stats)
                batch += 1
                n_epoch += len(xb)
                done = cfg.max_steps is not None and self.step >= cfg.max_steps
                want_eval = cfg.eval_every > 0 and self.step % cfg.eval_every == 0
                want_save = self.step % cfg.checkpoint_every == 0
                if not done and batch < per_epoch and (want_eval or want_save):
                    # A mid-epoch snapshot of every stage, as it is; the time it takes is left out of the
                    # epoch's samples/s (it stays in the wall time).
                    t_pause = time.perf_counter()
                    reports = self.gather(SAVE, epoch, batch, metrics)
                    if want_eval:
                        accuracy, test_loss = evaluate(self.rule.network(), x_test, y_test, cfg.eval_batch_size)
                        now = time.perf_counter()
                        metrics.write({"kind": "eval", "epoch": epoch, "step": self.step, "test_accuracy": accuracy,
                                       "test_loss": test_loss, "wall_time_s": round(self.wall(), 3),
                                       "eval_time_s": round(now - t_pause, 3)})
                    if want_save:
                        self.save(reports, metrics, best, final)
                    t_epoch += time.perf_counter() - t_pause
            self.steps_done_s = time.perf_counter() - self.t0
            complete = batch >= per_epoch
            # Evaluation: every stage reports its state once it has run all of this epoch's steps.
            reports = self.gather(EVAL, epoch, int(complete), metrics)
            t_eval = time.perf_counter()
            epoch_time = t_eval - t_epoch
            accuracy, test_loss = evaluate(self.rule.network(), x_test, y_test, cfg.eval_batch_size)
            record = {"kind": "epoch", "epoch": epoch, "step": self.step, "train_loss": reports[-1]["epoch_loss"],
                      "test_accuracy": accuracy, "test_loss": test_loss,
                      "wall_time_s": round(self.wall(), 3), "eval_time_s": round(time.perf_counter() - t_eval, 3),
                      "samples_per_s": round(n_epoch / max(epoch_time, 1e-9), 1),
                      "epoch_time_s": round(epoch_time, 3), "complete": complete,
                      "staleness": [r["staleness"] for r in reports[:-1]],
                      "staleness_max": [r["staleness_max"] for r in reports[:-1]],
                      "dropped_targets": [r["dropped_targets"] for r in reports[:-1]],
                      "stage_busy_s": [round(r["busy_s"], 3) for r in reports],
                      "stage_idle_s": [round(r["idle_s"], 3) for r in reports],
                      "stage_synth_s": [round(r["synth_s"], 3) for r in reports]}
            if self.complete:  # when each stage had run its own steps of the epoch (s since the start)
                record["stage_steps_done_s"] = [round(r["steps_done_s"], 3) for r in reports]
                record["targets_not_sent"] = [r["targets_not_sent"] for r in reports[1:]]
            metrics.write(record)
            if not self.opts.quiet:
                loss = record["train_loss"]
                print(f"epoch {epoch + 1}/{cfg.epochs}  step {self.step}  train_loss "
                      f"{loss if loss is None else f'{loss:.4f}'}  test_accuracy {accuracy:.4f}  "
                      f"{record['samples_per_s']:,.0f} samples/s  {epoch_time:.1f}s", file=sys.stderr, flush=True)
            final = accuracy
            if accuracy > best:
                best = accuracy
                self.save_model(checkpoint.BEST, accuracy)
            self.save(reports, metrics, best, final)
            if done:
                break
        self.fwd_out.put(self.forward_packet(STOP, self.step, 0, 0, self.no_stats),
                         on_idle=self.drain_targets, idle=self.idle)
        self.finish()
        self.save_model(checkpoint.FINAL, final)
        metrics.close()

    @property
    def no_stats(self) -> torch.Tensor:
        return torch.full((self.stats_len,), math.nan, device=self.device)

    def gather(self, kind: float, epoch: int, batch: int, metrics: MetricsLog) -> list[dict]:
        """Rank 0: send an EVAL or SAVE up, collect every rank's report, and assemble the whole rule here.

        batch: for EVAL, 1 if the epoch is complete; for SAVE, the position in the epoch."""
        assert self.fwd_out is not None
        self.fwd_out.put(self.forward_packet(kind, self.step, epoch, batch, self.no_stats),
                         on_idle=self.drain_targets, idle=self.idle)
        epoch_end = kind == EVAL and bool(batch)
        if epoch_end:
            self.next_batch = (epoch + 1, 0)
        reports = [self.report(epoch_end)]
        for k in range(1, self.world):
            got = [None]
            dist.recv_object_list(got, src=k)
            reports.append(got[0])
        for r in reports[-1].get("records", []):  # the last rank's step records since its previous report
            metrics.write(r)
        for k in range(1, self.world):
            self.rule.stages[k].load_state_dict(reports[k]["stage"])
            self.rule.optimizers[k].load_state_dict(reports[k]["optimizer"])
            if reports[k]["interface"] is not None:
                self.rule.interfaces[k].load_state_dict(reports[k]["interface"])
            if reports[k].get("forward_interface") is not None:
                self.rule.forward_interfaces[k - 1].load_state_dict(reports[k]["forward_interface"])
        return reports

    def save(self, reports: list[dict], metrics: MetricsLog, best: float, final: float) -> None:
        """checkpoint.pt: the trainer's layout (the whole rule's state, assembled by `gather`), plus each
        rank's position and counters ("positions"), which a pipeline resume restores rank by rank.

        Writing it is left out of the run's wall clock (`wall`), as the trainer leaves out its checkpoints,
        so that wall times compare across the two."""
        t_save = time.perf_counter()
        self.rule.steps = self.step
        metrics.sync()
        epoch, batch = self.next_batch
        checkpoint.save(self.run_dir / checkpoint.LATEST, {
            "rule": _cpu(self.rule.state_dict()), "epoch": epoch, "batch": batch, "step": self.step,
            "elapsed": self.wall(), "best_accuracy": best,
            "final_accuracy": final, "metrics_offset": metrics.offset(), "config": self.cfg.to_dict(),
            "pipeline": True, "positions": [r["position"] for r in reports]})
        self.paused += time.perf_counter() - t_save

    def save_model(self, name: str, accuracy: float) -> None:
        t_save = time.perf_counter()
        checkpoint.save(self.run_dir / name, {"config": self.cfg.to_dict(), "step": self.step,
                                              "test_accuracy": accuracy,
                                              "stages": _cpu(self.rule.stages.state_dict())})
        self.paused += time.perf_counter() - t_save  # off the wall clock, as in `save`

    def wall(self) -> float:
        """Rank 0: seconds of the run so far (across resumes), checkpoint writes left out."""
        return time.perf_counter() - self.t0 - self.paused


def load_resume_state(run_dir: Path, world: int, per_epoch: int) -> dict:
    """The run directory's checkpoint.pt, checked to be one a pipeline of `world` stages can resume from."""
    path = run_dir / checkpoint.LATEST
    state = checkpoint.load(path)
    positions = state.get("positions")
    if not state.get("pipeline") or positions is None:
        raise ConfigError(f"{path} was not written by the pipeline engine of this synthgrad version (no per-stage "
                          "positions); resume it without --stages, or start again with --overwrite")
    if len(positions) != world:
        raise ConfigError(f"{path} holds {len(positions)} stages, but {world} processes were started; "
                          f"resume with --stages {len(positions)}")
    for pos in positions:
        require(0 <= pos["next_batch"][1] <= per_epoch, f"{path}: a stage position {pos['next_batch']} lies "
                "outside the epoch; the checkpoint does not match this config (batch size or dataset changed?)")
    return state


def grad_numel(batch_size: int, shape: tuple[int, ...]) -> int:
    return batch_size * math.prod(shape)


# ----------------------------------------------------------------------------- process entry points

def _threads(cfg: TrainConfig, local_world: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cfg.threads or max(1, cores // local_world)


def link_backend(cfg: TrainConfig, local_world: int) -> str:
    """NCCL when every local stage has a GPU of its own; otherwise gloo, through host memory."""
    if cfg.device.startswith("cuda") and torch.cuda.device_count() >= local_world:
        return "nccl"
    return "gloo"


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)


def keep_freed_memory() -> None:
    """glibc: keep the memory a step frees for the next step, instead of handing it back to the OS.

    A stage step frees and reallocates the same multi-MB tensors (activations, gradients, messages).
    With glibc's default thresholds, a stage process (which allocates from several threads) returned
    them to the OS after every step and page-faulted them back in on the next: about 2,000 page faults
    a step per process and 15% of the CPU time in the kernel (fcn-4, width 1024, 2 stages), where
    single-process training has almost none. Fixed thresholds keep up to 256 MiB of freed memory in
    the process. A no-op where the C library is not glibc.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's documented maximum; a larger block (a data set) is mapped
        libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)


def pin_to_cores(local_rank: int, local_world: int, threads: int) -> set[int] | None:
    """Pin this stage process to its own `threads` cores: local rank r takes the r-th block of the cores it may use.

    A stage's send and receive threads then run beside its own compute thread instead of waking up on the
    core where another stage computes: +6% samples/s for fcn-4 width 1024 on 2 cores (5,375 -> 5,687,
    median of 3 runs each). Skipped (None) when the blocks do not fit the available cores, or when
    SYNTHGRAD_PIN_CORES=0.
    """
    if os.environ.get("SYNTHGRAD_PIN_CORES", "1") == "0" or not hasattr(os, "sched_setaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))
    if local_world * threads > len(cores):
        return None
    mine = set(cores[local_rank * threads:(local_rank + 1) * threads])
    os.sched_setaffinity(0, mine)
    return mine


def set_up_stage_process(local_rank: int, local_world: int, threads: int) -> None:
    """What every stage process does first: keep freed memory, take its own cores, use `threads` torch threads."""
    keep_freed_memory()
    pin_to_cores(local_rank, local_world, threads)
    torch.set_num_threads(threads)


def run_rank(cfg: TrainConfig, run_dir: Path, dataset: data.Dataset | None, opts: StageOptions) -> None:
    """Run this process as stage RANK of WORLD_SIZE (environment as in the module docstring)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if cfg.stages != world:
        raise ConfigError(f"the config asks for {cfg.stages} stages but {world} processes were started; "
                          f"start {cfg.stages} (torchrun --nproc-per-node) or set \"stages\": {world}")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    set_up_stage_process(int(os.environ.get("LOCAL_RANK", rank)), local_world, _threads(cfg, local_world))
    dist.init_process_group(link_backend(cfg, local_world), rank=rank, world_size=world,
                            timeout=timedelta(seconds=link_timeout()))
    try:
        StageProcess(cfg, rank, world, run_dir, dataset, opts).run()
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies, so no stage outlives a killed launcher."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _spawned(rank: int, world: int, port: int, cfg_dict: dict, run_dir: str, dataset: data.Dataset | None,
             opts: StageOptions, errors: mp.Queue) -> None:
    """Body of a locally spawned stage process: run the rank, report any error with its time and kind."""
    _die_with_parent()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        run_rank(TrainConfig.from_dict(cfg_dict), Path(run_dir), dataset, opts)
    except BaseException as e:  # noqa: BLE001 (report everything, then die)
        link = isinstance(e, LinkDown) or "Connection closed" in str(e) or "Connection reset" in str(e)
        errors.put((rank, time.time(), link, f"{type(e).__name__}: {e}", traceback.format_exc()))
        errors.close()
        errors.join_thread()
        os._exit(1)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(cfg: TrainConfig, run_dir: Path, source: str) -> None:
    """config.json, with the same extra fields as the single-process trainer writes."""
    cfg.extra.update({"synthgrad_version": __version__, "torch_version": torch.__version__,
                      "python_version": sys.version.split()[0], "data_source": source,
                      "started": datetime.now().isoformat(timespec="seconds"), "engine": "pipeline"})
    (run_dir / CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")


def result_from_metrics(run_dir: Path) -> RunResult:
    """RunResult of a finished pipeline run, read back from its metrics.jsonl."""
    epochs = [r for r in read_metrics(run_dir / METRICS) if r.get("kind") == "epoch"]
    if not epochs:
        raise StageFailure(f"the pipeline ended without evaluating; see {run_dir / METRICS}")
    accs = [r["test_accuracy"] for r in epochs]
    return RunResult(run_dir, accs[-1], max(accs), epochs[-1]["step"], epochs[-1]["wall_time_s"])


def _stop(procs: list) -> None:
    """Terminate, then kill, every stage process still alive; never hangs."""
    procs = [p for p in procs if p.pid is not None]  # a start that failed left the rest unstarted
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 3
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(timeout=3)


def _failure(procs: list, reports: list[tuple], world: int) -> StageFailure:
    """The error naming the stage that failed first: a death by signal, else a raise, else a lost link."""
    died = [(k, p.exitcode) for k, p in enumerate(procs) if p.exitcode is not None and p.exitcode < 0]
    if died:
        k, code = died[0]
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        return StageFailure(f"stage {k + 1} of {world} died (signal {name}); the other stages were stopped. "
                            "If it was killed for memory, lower --batch-size or --width")
    reports = sorted(reports, key=lambda r: (r[2], r[1]))  # raised errors before lost links, earliest first
    if reports:
        k, _, _, msg, tb = reports[0]
        last = tb.strip().splitlines()[-3:] if tb else []
        detail = "; ".join(line.strip() for line in last[:-1])
        return StageFailure(f"stage {k + 1} of {world} failed: {msg}" + (f" (at {detail})" if detail else "")
                            + "; the other stages were stopped")
    codes = {k + 1: p.exitcode for k, p in enumerate(procs) if p.exitcode}
    k = min(codes) if codes else 1
    return StageFailure(f"stage {k} of {world} exited with status {codes.get(k)}; the other stages were stopped")


def run_pipeline(cfg: TrainConfig, dataset: data.Dataset, run_dir: str | Path, resume: bool = False,
                 quiet: bool = False, max_inflight: int = DEFAULT_INFLIGHT,
                 _fault: tuple[int, int] | None = None, _slow: tuple[int, float] | None = None) -> RunResult:
    """Train with one local process per stage (cfg.stages of them); the run directory as the trainer's."""
    run_dir = Path(run_dir)
    if cfg.stages is None or cfg.stages < 2:
        raise ConfigError("the pipeline engine needs --stages K with K >= 2")
    if cfg.method == "backprop" and cfg.update_prob < 1:
        raise ConfigError("--update-prob below 1 is not supported by the locked pipeline (--method backprop "
                          "--stages K); use --method dni or cdni, or drop --stages")
    if max_inflight < 1:
        raise ConfigError(f"max_inflight must be >= 1, got {max_inflight}")
    world = cfg.stages
    if resume:  # refuse an unusable checkpoint here, before any process starts
        load_resume_state(run_dir, world, data.num_batches(len(dataset.train_y), cfg.batch_size))
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(cfg, run_dir, dataset.source)
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    opts = StageOptions(max_inflight=max_inflight, quiet=quiet, fault=_fault, slow=_slow, resume=resume)
    port = free_port()
    procs = [ctx.Process(target=_spawned, name=f"synthgrad-stage{k + 1}", daemon=True,
                         args=(k, world, port, cfg.to_dict(), str(run_dir), dataset if k == 0 else None,
                               opts, errors))
             for k in range(world)]
    reports: list[tuple] = []
    try:
        for p in procs:
            p.start()
        while True:
            with contextlib.suppress(queue.Empty):
                while True:
                    reports.append(errors.get_nowait())
            failed = reports or any(p.exitcode not in (None, 0) for p in procs)
            if failed:
                # Let the first error's consequences report too, then pick the cause among them.
                time.sleep(0.5)
                with contextlib.suppress(queue.Empty):
                    while True:
                        reports.append(errors.get_nowait())
                _stop(procs)
                raise _failure(procs, reports, world)
            alive = [p for p in procs if p.exitcode is None]
            if not alive:
                break
            multiprocessing.connection.wait([p.sentinel for p in alive], timeout=0.2)
    finally:
        _stop(procs)
        errors.close()
        errors.cancel_join_thread()
    return result_from_metrics(run_dir)


def main(argv: list[str] | None = None) -> int:
    """Entry point under torchrun: `python -m synthgrad.pipeline --config cfg.json --run-dir DIR`."""
    p = argparse.ArgumentParser(prog="python -m synthgrad.pipeline",
                                description="Run one stage of a synthgrad pipeline (start one process per stage "
                                            "with torchrun; see the module docstring for the environment).")
    p.add_argument("--config", type=Path, required=True,
                   help="a config.json (a run's, or one with only the keys to change; 'stages' = processes)")
    p.add_argument("--run-dir", type=Path, required=True, help="where rank 0 writes the run")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --run-dir")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir from its checkpoint.pt (with the same number of processes)")
    p.add_argument("--max-inflight", type=int, default=DEFAULT_INFLIGHT,
                   help="activations a stage may send ahead of the stage above (backpressure)")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            print(f"error: {var} is not set; start this module with torchrun (or use `synthgrad train --stages K` "
                  "to run all stages on this machine)", file=sys.stderr)
            return 2
    try:
        raw = json.loads(a.config.read_text())
        raw.pop("extra", None)
        cfg = TrainConfig.from_dict(raw).resolve()
        if cfg.stages is None:
            cfg.stages = int(os.environ["WORLD_SIZE"])
            cfg.validate()
        dataset = None
        if int(os.environ["RANK"]) == 0:
            from synthgrad.trainer import prepare_run_dir

            if not a.resume:
                prepare_run_dir(a.run_dir, a.overwrite)
            dataset = data.load(cfg.dataset, cfg.data_dir, cfg.cache_dir, check_md5=cfg.verify_md5)
            if not a.resume:
                write_config(cfg, a.run_dir, dataset.source)
        run_rank(cfg, a.run_dir, dataset, StageOptions(max_inflight=a.max_inflight, quiet=a.quiet, resume=a.resume))
    except (SynthgradError, OSError, json.JSONDecodeError, TypeError) as e:
        print(f"error (stage {int(os.environ['RANK']) + 1}): {e}", file=sys.stderr)
        return getattr(e, "exit_code", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
