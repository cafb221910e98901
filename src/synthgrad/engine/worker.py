"""The per-rank worker: one stage's StageRule and its links; it runs the rule's methods as messages come and go.

Everything a stage computes is `StageRule`'s (synthgrad.stage); the worker only moves tensors:
it sends h_k up as soon as it exists, sends the gradient at its input down (the target of the
interface below), and hands the targets that come down to `StageRule.take_target`, either as
they arrive (asynchronous, the default) or waiting for each one before the next step (lockstep).
"""

from __future__ import annotations

import math
import time
from collections import deque

import torch

from synthgrad.engine.links import Inbox, Outbox
from synthgrad.engine.packets import DATA, NONE, STOP, BackwardLayout, ForwardLayout, StatsLayout
from synthgrad.engine.spec import PipelineSpec
from synthgrad.stage import StageRule


class StageWorker:
    """Rank `rank` of `world`: its StageRule, the links to its neighbours and its counters."""

    def __init__(self, spec: PipelineSpec, rank: int, world: int, rule: StageRule, device: torch.device,
                 batch: int, in_shape: tuple[int, ...], out_shape: tuple[int, ...], label_width: int = 0):
        self.spec, self.rank, self.world, self.rule, self.device = spec, rank, world, rule, device
        self.last = rank == world - 1
        self.locked = spec.method == "backprop"  # waits for the true gradient of each step
        self.delayed = spec.method == "ddg" and not self.last  # updates when the true gradient of a step comes
        self.local = spec.method == "dgl"  # trains on its own auxiliary loss: no backward messages at all
        self.complete = spec.complete
        self.draining = False  # inside drain_targets (DDG sends gradients down from there: no re-entry)
        self.in_shape, self.out_shape, self.batch = in_shape, out_shape, batch
        self.stats = StatsLayout(world - 1, world - 1 if self.complete else 0)
        # label_width: K for soft labels [B, K], 0 for class indices [B]
        self.fwd_in_layout = ForwardLayout(batch, in_shape, self.stats, label_width)
        self.fwd_out_layout = ForwardLayout(batch, out_shape, self.stats, label_width)
        self.bwd_in_layout = BackwardLayout(batch, out_shape)  # gradients at this stage's output
        self.bwd_out_layout = BackwardLayout(batch, in_shape)  # gradients at its input, sent below
        self.fwd_in: Inbox | None = None
        self.fwd_out: Outbox | None = None
        self.bwd_in: Inbox | None = None
        self.bwd_out: Outbox | None = None
        # Complete unlock: targets from a stage above that runs ahead wait here for their step.
        self.early: deque[torch.Tensor] = deque()
        self.early_max = 2 * spec.max_inflight + 8
        self.stopped_above = False
        # Position and counters (a checkpoint's "position" of this rank, see `position`).
        self.step = 0  # steps this stage has run
        self.next_batch = (0, 0)  # (epoch, batch) of the next batch this stage will run
        self.synth, self.idle = [0.0], [0.0]  # seconds regressing interfaces, seconds waiting for a peer
        self.my_stats = [math.nan, math.nan]  # (staleness, synth_loss) of this stage's latest target
        self.input_loss = math.nan  # complete unlock: the forward interface's latest loss
        self.stale_sum, self.stale_n, self.stale_max = 0.0, 0, 0
        self.not_sent = 0  # complete unlock: targets dropped because the link down was full
        self.received = 0  # messages with a target (DDG: a gradient) that came down to this stage
        self.steps_done_s = math.nan  # complete unlock: when this rank finished its own steps of the epoch
        self.elapsed0 = 0.0  # seconds of training before a resume
        self.t0 = time.perf_counter()

    # -- links -----------------------------------------------------------------------------------
    def connect(self, fwd_groups: list, bwd_groups: list, link: torch.device) -> None:
        """Open the links: a process group per link and direction, so that no two threads share one."""
        m, r = self.spec.max_inflight, self.rank
        if r > 0:
            self.fwd_in = Inbox(r - 1, fwd_groups[r - 1], self.fwd_in_layout.numel, self.device, 1, "activations",
                                link)
            if not self.local:
                self.bwd_out = Outbox(r - 1, bwd_groups[r - 1], m + 2, "targets", link)
        if not self.last:
            self.fwd_out = Outbox(r + 1, fwd_groups[r], m, "activations", link)
            if not self.local:
                self.bwd_in = Inbox(r + 1, bwd_groups[r], self.bwd_in_layout.numel, self.device, m + 2, "targets",
                                    link)

    def send_up(self, msg: torch.Tensor) -> None:
        assert self.fwd_out is not None
        self.fwd_out.put(msg, on_idle=self.drain_targets, idle=self.idle)

    # -- one step --------------------------------------------------------------------------------
    def run_step(self, x: torch.Tensor | None, y: torch.Tensor, epoch: int, batch: int,
                 stats: torch.Tensor | None, network_input: torch.Tensor | None = None) -> float | None:
        """The StageRule's step on one batch: h goes up inside (as soon as it exists), the gradient at the
        input goes down after. x: h_(k-1) from below (None under the complete unlock, which predicts it
        from network_input). Returns the loss (last stage) or None."""
        spec, step = self.spec, self.step
        if spec.fault is not None and spec.fault == (self.rank, step):
            raise RuntimeError(f"injected fault at step {step} (test hook)")
        if spec.slow is not None and spec.slow[0] == self.rank:
            time.sleep(spec.slow[1])  # test hook: a slow stage
        if spec.schedule is not None:
            self.rule.set_lr_factor(spec.schedule(step))
        ctx = spec.context(y)
        on_output = upstream = None
        # h goes up at once, except from a stage on a synthetic input (complete unlock, above the first):
        # its real h goes up later, from the real chain (synthgrad.engine.complete).
        if not self.last and not (self.complete and self.rank > 0):
            out_stats = self.stats_to_send(stats)

            def on_output(h: torch.Tensor) -> None:
                self.send_up(self.fwd_out_layout.pack(DATA, step, epoch, batch, 0, out_stats, y, h, self.device))

            if self.locked:
                upstream = self.wait_gradient
        res = self.rule.step(x, y, step, context=ctx, network_input=network_input, upstream=upstream,
                             on_output=on_output, input_grad=self.rank > 0 and not self.local,
                             keep_graph=spec.lockstep)
        self.step += 1
        self.next_batch = (epoch, batch + 1)
        if self.local and not self.last:  # DGL: the auxiliary classifier's loss stands for the synthesizer's
            self.my_stats = [math.nan, self.rule.interface.last_loss]  # type: ignore[union-attr]
        if not self.delayed:  # a delayed stage sends its input's gradient when its own comes (apply_gradient)
            self.send_down(step, res.input_grad)
        if not spec.lockstep:
            self.drain_targets()
        elif self.delayed or (self.rule.interface is not None and not self.local
                              and not (self.complete and self.rank > 0)):
            self.await_target(step)  # lockstep (a stage on a synthetic input first waits for its real input)
        return None if res.loss is None else res.loss.item()

    def stats_to_send(self, stats: torch.Tensor | None) -> torch.Tensor:
        """The stats block going up: what came from below, with this stage's latest values written in."""
        out = self.stats.empty(self.device) if stats is None else stats.clone()
        if not self.last:
            out[self.stats.interface(self.rank)] = torch.tensor(self.my_stats)
            self.my_stats = [math.nan, math.nan]
        if self.complete and self.rank > 0:
            out[self.stats.forward_interface(self.rank)] = self.input_loss
        return out

    # -- gradients and targets -------------------------------------------------------------------
    def wait_gradient(self, out: torch.Tensor) -> torch.Tensor:
        """Locked pipeline: block until the true gradient of this step comes down."""
        assert self.bwd_in is not None
        msg = self.bwd_in.get(idle=self.idle)
        assert msg is not None
        kind, step, grad = self.bwd_in_layout.unpack(msg)
        assert kind == DATA and step == self.step and grad is not None, "gradient out of order"
        return grad

    def send_down(self, step: int, grad: torch.Tensor | None) -> None:
        if self.bwd_out is None:
            return
        msg = self.bwd_out_layout.pack(DATA if grad is not None else NONE, step, grad, self.device)
        if self.complete:
            # Never wait for the stage below: when it is too slow to take its targets, drop them.
            if not self.bwd_out.offer(msg):
                self.not_sent += 1
            return
        # While draining (DDG sends from there) it waits without draining again: the stage below drains.
        self.bwd_out.put(msg, on_idle=None if self.draining else self.drain_targets, idle=self.idle)

    def drain_targets(self) -> None:
        """Apply every target that has arrived from above, without waiting for any."""
        if self.bwd_in is None or self.locked or self.stopped_above or self.draining:
            return
        self.draining = True
        try:
            while self.early and int(self.early[0][1]) < self.step:  # complete unlock: their step has run now
                self.apply_target(self.early.popleft())
            while not self.stopped_above and (msg := self.bwd_in.get(block=False)) is not None:
                self.apply_target(msg)
        finally:
            self.draining = False

    def _waiting_for(self, step: int) -> bool:
        """Lockstep: whether the target (DDG: the gradient) of `step` has yet to be taken."""
        if self.delayed:
            return bool(self.rule.stored) and self.rule.stored[0].step <= step  # type: ignore[attr-defined]
        return bool(self.rule.pending) and self.rule.pending[0].step <= step

    def await_target(self, step: int) -> None:
        """Lockstep: apply targets, waiting for them, until the one of `step` has been taken."""
        assert self.bwd_in is not None
        while not self.stopped_above and self._waiting_for(step):
            if self.early and int(self.early[0][1]) < self.step:  # it came before this stage ran its step
                self.apply_target(self.early.popleft())
                continue
            msg = self.bwd_in.get(idle=self.idle)
            assert msg is not None
            self.apply_target(msg)

    def apply_gradient(self, s: int, grad: torch.Tensor) -> None:
        """DDG: the true gradient of step s came down: the stage replays and updates, and its input's
        gradient goes on down."""
        t0 = time.perf_counter()
        below = self.rule.take_gradient(s, grad, input_grad=self.rank > 0)  # type: ignore[attr-defined]
        self.synth[0] += time.perf_counter() - t0
        staleness = self.step - 1 - s
        self.stale_sum, self.stale_n = self.stale_sum + staleness, self.stale_n + 1
        self.stale_max = max(self.stale_max, staleness)
        self.my_stats = [float(staleness), math.nan]
        if below is not None:
            was, self.draining = self.draining, True
            try:
                self.send_down(s, below)
            finally:
                self.draining = was

    def apply_target(self, msg: torch.Tensor) -> None:
        kind, s, target = self.bwd_in_layout.unpack(msg)
        if kind == STOP:
            self.stopped_above = True
            return
        self.received += kind == DATA
        if self.delayed:
            if target is not None:
                self.apply_gradient(s, target.clone())  # the message buffer is not ours to keep
            return
        if self.complete and s >= self.step:  # from a stage above that runs ahead: keep it until step s has run
            if len(self.early) < self.early_max:
                self.early.append(msg)
            else:
                self.rule.dropped += 1
            return
        t0 = time.perf_counter()
        synth_loss = self.rule.take_target(s, target)
        if synth_loss is not None:
            staleness = self.step - 1 - s  # this stage's updates between the activation and its target
            self.stale_sum, self.stale_n = self.stale_sum + staleness, self.stale_n + 1
            self.stale_max = max(self.stale_max, staleness)
            self.my_stats = [float(staleness), synth_loss]
        self.synth[0] += time.perf_counter() - t0

    # -- the end ---------------------------------------------------------------------------------
    def finish(self) -> None:
        """After STOP went up: take the last targets, send STOP down, flush every link."""
        if self.bwd_in is not None:
            while not self.stopped_above:
                msg = self.bwd_in.get(idle=self.idle)
                assert msg is not None
                if self.locked:
                    self.stopped_above = float(msg[0]) == STOP
                else:
                    self.apply_target(msg)  # late targets (DDG: late gradients, which still update)
        if self.bwd_out is not None:
            self.bwd_out.put(self.bwd_out_layout.pack(STOP, self.step, device=self.device))
            self.bwd_out.close()
        if self.fwd_out is not None:
            self.fwd_out.close()

    # -- position (what a resume restores) -------------------------------------------------------
    def position(self) -> dict:
        return {"step": self.step, "next_batch": list(self.next_batch), "torch_rng": torch.get_rng_state(),
                "idle_s": self.idle[0], "synth_s": self.synth[0]}

    def restore(self, pos: dict, elapsed: float) -> None:
        self.step, self.next_batch = pos["step"], tuple(pos["next_batch"])
        torch.set_rng_state(pos["torch_rng"])
        self.idle[0], self.synth[0], self.elapsed0 = pos["idle_s"], pos["synth_s"], elapsed
