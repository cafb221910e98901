"""Links between two stages: a thread per direction moves messages between a bounded queue and the peer.

A stage never blocks on the network to poll: an `Inbox` thread receives into a queue, an
`Outbox` thread sends from one. Bounded queues give backpressure. A peer that stops answering for
`link_timeout()` seconds, or whose connection breaks, raises `LinkDown` in the stage.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from synthgrad.engine.packets import STOP

TICK_S = 0.005  # how often a waiting stage looks at arrived targets and at its links' health


def link_timeout() -> float:
    """Seconds a stage waits for a peer before it declares it lost (SYNTHGRAD_PIPELINE_TIMEOUT, default 120)."""
    return float(os.environ.get("SYNTHGRAD_PIPELINE_TIMEOUT", "120"))


class LinkDown(RuntimeError):
    """A peer stopped answering or closed its connection (a consequence, rarely the cause, of a failure)."""


class Inbox:
    """Messages from one peer, received by a thread into a bounded queue.

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
                buf = torch.empty(self.numel, device=self.link_device)  # one whole message, float32
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
