"""The decoupled engine: one process per stage over torch.distributed, running the per-stage rule of synthgrad.stage.

Where things are (transport and scheduling only; what a stage computes is `synthgrad.stage.StageRule`):

    api.py        Pipeline: the public entry point (your stages, your data, your evaluation)
    spec.py       PipelineSpec: what every process builds its stage, interfaces and optimizer from
    feed.py       Feed: rank 0's batches (tensors it shuffles, or your loader)
    packets.py    the wire format: message kinds and the layout of every message, in one place
    links.py      Inbox / Outbox: a thread and a bounded queue per link and direction; LinkDown
    worker.py     StageWorker: one rank's StageRule and links; a step, its targets (async or lockstep)
    loops.py      the loops: rank 0 walks the batches, the others take what comes from below; Hooks
    complete.py   the complete unlock's loop: own steps on synthetic inputs, the real chain beside
    snapshots.py  reports to rank 0 (states, positions, profiles), the last rank's step records
    rank.py       one process from start to end: shapes, building, resume, links, loop, final states
    process.py    a process's cores, threads, memory, device and link backend
    launch.py     local launch (one process per stage), torchrun, failure handling

The command line's `synthgrad train --stages K` is a client of `Pipeline`'s machinery
(synthgrad.pipeline: registry models, run directories, checkpoints, resume).
"""

from synthgrad.engine.api import Pipeline, PipelineResult
from synthgrad.engine.spec import PipelineSpec

__all__ = ["Pipeline", "PipelineResult", "PipelineSpec"]
