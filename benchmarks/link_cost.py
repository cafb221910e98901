"""What a pipeline link costs a stage: two processes compute, with and without messages flowing both ways.

    python benchmarks/link_cost.py                # width 1024, batch 128: one [128, 1024] float32 message each way

Each of two gloo-connected processes (1 torch thread each, pinned to its own core as the pipeline engine
pins stages) runs a fixed loop of matrix products, about one stage step of fcn-4 at width 1024. With
`links`, every step also sends one message of the pipeline's size to the other process from a send
thread and receives one from it on a receive thread, as the engine's Outbox and Inbox do. The difference
in milliseconds per step is what the links take from the stage's own core. The two settings alternate
over --rounds rounds.
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import sys
import threading
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from synthgrad.engine.launch import free_port
from synthgrad.engine.process import pin_to_cores


def _rank(rank: int, port: int, links: bool, a: argparse.Namespace, out: mp.SimpleQueue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    pin_to_cores(rank, 2, 1)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        up, down = dist.new_group([0, 1]), dist.new_group([0, 1])  # one group per direction, as the engine
        numel = a.batch_size * a.width + 256  # activation + header, float32
        h, w = torch.randn(a.batch_size, a.width), torch.randn(a.width, a.width) / a.width ** 0.5
        outbox: queue.Queue[torch.Tensor] = queue.Queue(4)

        def send() -> None:
            for _ in range(a.steps):
                dist.send(outbox.get(), dst=1 - rank, group=up if rank == 0 else down)

        def recv() -> None:
            for _ in range(a.steps):
                dist.recv(torch.empty(numel), src=1 - rank, group=down if rank == 0 else up)

        threads = [threading.Thread(target=send), threading.Thread(target=recv)] if links else []
        for t in threads:
            t.start()
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(a.steps):
            for _ in range(a.matmuls):
                h = torch.tanh(h @ w)
            if links:
                outbox.put(torch.cat([torch.zeros(256), h.reshape(-1)]))
        compute = time.perf_counter() - t0
        for t in threads:
            t.join()
        out.put((rank, compute / a.steps * 1e3, (time.process_time() - c0) / a.steps * 1e3))
    finally:
        dist.destroy_process_group()


def measure(a: argparse.Namespace, links: bool) -> tuple[float, float]:
    """(ms per step of the compute loop, CPU ms per step of the process), mean of the two processes."""
    out = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_rank, args=(free_port(), links, a, out), nprocs=2)
    got = [out.get() for _ in range(2)]
    return statistics.mean(g[1] for g in got), statistics.mean(g[2] for g in got)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--matmuls", type=int, default=6, help="[batch, width] x [width, width] products per step")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    res: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for _ in range(a.rounds):
        for links in (False, True):
            res[links].append(measure(a, links))
    print(f"width {a.width}, batch {a.batch_size}: one {a.batch_size * a.width * 4 / 2**20:.2f} MiB message each "
          f"way per step; median of {a.rounds} rounds, mean of the 2 processes")
    for links in (False, True):
        wall = statistics.median(r[0] for r in res[links])
        cpu = statistics.median(r[1] for r in res[links])
        print(f"  {'with links' if links else 'no links  '}: {wall:6.2f} ms a step, {cpu:6.2f} ms CPU a step "
              f"(rounds: {', '.join(f'{r[0]:.2f}' for r in res[links])})")
    extra = statistics.median(r[0] for r in res[True]) - statistics.median(r[0] for r in res[False])
    print(f"  the links cost each stage {extra:.2f} ms a step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
