"""The complete unlock's loop: a stage on synthetic inputs runs its own steps without waiting for the stage below.

Every rank holds the training set (rank 0 broadcasts it once) and walks the same batches in the
same order, so stage k >= 1 runs step t at once, on the input its forward interface predicts
from the network input. The real activations still flow up, as a second chain: when the real
h_(k-1) of a past step arrives, the StageRule regresses the forward interface onto it and runs it
forward (`take_real_input`), and its real h_k goes up. Snapshots travel in that chain: a mid-epoch
one takes the stage as it is, ahead or behind; an epoch's end waits until the stage has run its
own steps of the epoch, since an evaluation runs the real network. In lockstep, a stage takes the
real input (then the target) of step t before it runs step t+1, as `DNI.step` does.
"""

from __future__ import annotations

import time

import torch

from synthgrad.batching import batches, epoch_order
from synthgrad.engine.loops import Schedule, pass_stop
from synthgrad.engine.packets import DATA, MID_EPOCH, SNAPSHOT, STOP, Forward
from synthgrad.engine.snapshots import StepLog, send_report
from synthgrad.engine.worker import StageWorker


class RealChain:
    """Rank k >= 1 under the complete unlock: the training set, the shared batch order, the real chain."""

    def __init__(self, w: StageWorker, train: tuple[torch.Tensor, torch.Tensor], batch_size: int, seed: int,
                 log: StepLog | None):
        self.w, self.train, self.batch_size, self.seed, self.log = w, train, batch_size, seed, log
        self.orders: dict[int, torch.Tensor] = {}  # epoch -> example order (the last two epochs)
        self.held: Forward | None = None  # an epoch-end SNAPSHOT or a STOP from below, not yet acted on

    def order(self, epoch: int) -> torch.Tensor:
        if epoch not in self.orders:
            if len(self.orders) >= 2:
                del self.orders[min(self.orders)]
            self.orders[epoch] = epoch_order(len(self.train[1]), self.seed, epoch).to(self.w.device)
        return self.orders[epoch]

    def network_input(self, epoch: int, batch: int) -> torch.Tensor:
        """The network input of (epoch, batch), from the order every rank shares (no buffer needed)."""
        b = self.batch_size
        return self.train[0][self.order(epoch)[batch * b:(batch + 1) * b]]

    def run_real(self, f: Forward) -> None:
        """The real h_(k-1) of a past step came from below: the StageRule takes it; the real h_k goes up."""
        w = self.w
        assert f.h is not None and f.labels is not None
        y = f.labels
        t0 = time.perf_counter()
        out, loss = w.rule.take_real_input(f.step, f.h, network_input=self.network_input(f.epoch, f.batch),
                                           context=w.spec.context(y))
        w.synth[0] += time.perf_counter() - t0
        if loss is not None:
            w.input_loss = loss
        stats = w.stats_to_send(f.stats)
        if self.log is not None:  # the last stage: log the real network's loss of that step
            self.log.add(w.rule.loss_fn(out, y).item(), stats, f.epoch, f.step + 1)
            return
        w.send_up(w.fwd_out_layout.pack(DATA, f.step, f.epoch, f.batch, 0, stats, y, out, w.device))

    def take(self, f: Forward, hold: bool) -> None:
        if f.kind == DATA:
            self.run_real(f)
        elif f.kind == SNAPSHOT and f.flag == MID_EPOCH:
            send_report(self.w, f, self.log)  # a mid-epoch snapshot takes this stage as it is
        elif hold:
            self.held = f  # acted on once this rank has run its own steps of the epoch
        else:
            raise AssertionError(f"stage {self.w.rank + 1}: unexpected message kind {f.kind} from below")

    def drain(self) -> None:
        """Take every real activation that has arrived from below, without waiting; hold an epoch end or STOP."""
        w = self.w
        assert w.fwd_in is not None
        while self.held is None and (msg := w.fwd_in.get(block=False)) is not None:
            self.take(w.fwd_in_layout.unpack(msg), hold=True)

    def next_from_below(self) -> Forward:
        """The held message, else the next one from below (waiting for it)."""
        if self.held is not None:
            f, self.held = self.held, None
            return f
        w = self.w
        assert w.fwd_in is not None
        msg = w.fwd_in.get(on_idle=w.drain_targets, idle=w.idle)
        assert msg is not None
        return w.fwd_in_layout.unpack(msg)

    def until_real(self, step: int) -> None:
        """Lockstep: take the chain until the real input of `step` has been taken."""
        while self.held is None and step in self.w.rule.synthetic_inputs:
            self.take(self.next_from_below(), hold=True)

    def until_control(self) -> Forward:
        """Own steps done: take the real chain (and mid-epoch snapshots) until an epoch end or a STOP."""
        while True:
            f = self.next_from_below()
            if f.kind == STOP or (f.kind == SNAPSHOT and f.flag != MID_EPOCH):
                return f
            self.take(f, hold=False)


def run_complete(w: StageWorker, chain: RealChain, plan: Schedule) -> None:
    """Ranks 1..K-1 under the complete unlock: this rank's own steps, on synthetic inputs."""
    x_train, y_train = chain.train
    start_epoch, start_batch = w.next_batch  # its own position: it runs ahead of (or behind) rank 0
    done = plan.done(w.step)
    for epoch in range(start_epoch, plan.epochs):
        first = start_batch if epoch == start_epoch else 0
        for batch, (xb, yb) in enumerate(batches(x_train, y_train, chain.batch_size, chain.order(epoch),
                                                 start=first), start=first):
            if done:
                break
            step = w.step
            w.run_step(None, yb, epoch, batch, None, network_input=xb)
            if w.spec.lockstep:
                chain.until_real(step)
                if w.rule.interface is not None:
                    w.await_target(step)
            else:
                chain.drain()
            done = plan.done(w.step)
        w.steps_done_s = time.perf_counter() - w.t0
        f = chain.until_control()
        if f.kind != SNAPSHOT:
            raise RuntimeError(f"stage {w.rank + 1}: STOP from below before the end of epoch {epoch}")
        send_report(w, f, chain.log)
        if done:
            break
    f = chain.until_control()
    if f.kind != STOP:
        raise RuntimeError(f"stage {w.rank + 1}: an epoch's end from below after the last epoch")
    pass_stop(w, f)
