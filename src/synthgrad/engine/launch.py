"""Launch and failure handling: one local process per stage, or this process under torchrun; a failure stops all.

Locally, `launch` spawns K processes on 127.0.0.1 and a free port and watches them: when one
raises or dies, the others are stopped within seconds and the error names the stage that failed
first (its own exception class for synthgrad errors, such as a divergence; `StageFailure`
otherwise). Under torchrun, `run_here` runs this process as the rank the environment names:

    RANK, WORLD_SIZE          this process's stage index (0..K-1) and K
    MASTER_ADDR, MASTER_PORT  the rendezvous (rank 0's host)
    LOCAL_RANK                picks the GPU (cuda:LOCAL_RANK modulo the GPUs) for a CUDA run
    LOCAL_WORLD_SIZE          processes on this machine: threads per process = cores // this, by default
    SYNTHGRAD_PIPELINE_TIMEOUT  seconds a stage waits for a peer before it gives up (default 120)
    SYNTHGRAD_PIN_CORES       0: do not pin each stage process to its own cores
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import multiprocessing.connection
import os
import pickle
import queue
import signal
import socket
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from synthgrad import errors
from synthgrad.engine.links import LinkDown, link_timeout
from synthgrad.engine.process import link_backend, set_up_stage_process, threads_per_stage
from synthgrad.engine.rank import Job, run_rank
from synthgrad.engine.spec import PipelineSpec
from synthgrad.errors import ConfigError, StageFailure

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def under_torchrun() -> bool:
    """True when torchrun (or any launcher setting its variables) started this process as one rank."""
    return all(v in os.environ for v in TORCHRUN_VARS)


def run_here(spec: PipelineSpec, job: Job) -> tuple[list[dict], object]:
    """Run this process as stage RANK of WORLD_SIZE (the environment above); returns every stage's final
    state and what rank 0's hooks collected (`hooks.result()`), the same in every process."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != spec.num_stages:
        raise ConfigError(f"the pipeline has {spec.num_stages} stages but {world} processes were started; start "
                          f"{spec.num_stages} processes (torchrun's nproc-per-node times nnodes) or cut the model into "
                          f"{world}")
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    set_up_stage_process(local_rank, local_world, threads_per_stage(spec.threads, local_world))
    dist.init_process_group(link_backend(spec.device, local_world), rank=rank, world_size=world,
                            timeout=timedelta(seconds=link_timeout()))
    try:
        return run_rank(spec, job, rank, world, local_rank)
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies, so no stage outlives a killed launcher."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _spawned(rank: int, world: int, port: int, spec: PipelineSpec, job: Job, reports: mp.Queue,
             results: mp.Queue) -> None:
    """Body of a locally spawned stage process: run the rank; report its result, or any error with its kind."""
    _die_with_parent()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        out = run_here(spec, job)
        if rank == 0:  # as bytes: tensors sent as themselves would live in this process's shared memory
            buf = io.BytesIO()
            torch.save(out, buf)
            results.put(buf.getvalue())
            results.close()
            results.join_thread()
    except BaseException as e:  # noqa: BLE001 (report everything, then die)
        link = isinstance(e, LinkDown) or "Connection closed" in str(e) or "Connection reset" in str(e)
        kind = type(e).__name__ if isinstance(e, errors.SynthgradError) else None
        fields = {k: getattr(e, k) for k in ("what", "stage", "step") if isinstance(e, errors.DivergenceError)}
        reports.put((rank, time.time(), link, kind, f"{type(e).__name__}: {e}", str(e), traceback.format_exc(),
                     fields))
        reports.close()
        reports.join_thread()
        os._exit(1)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_all(procs: list) -> None:
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


def failure(exitcodes: list[int | None], reports: list[tuple], world: int) -> errors.SynthgradError:
    """The error naming the stage that failed first: a death by signal, else a raise, else a lost link.
    A synthgrad error (a divergence, a bad argument) keeps its class, so it keeps its exit code.

    exitcodes: each stage process's exit code (None: running) as it was before the others were stopped, so
    that the stages stop_all terminated are not taken for ones that died.
    """
    died = [(k, code) for k, code in enumerate(exitcodes) if code is not None and code < 0]
    if died:
        k, code = died[0]
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        return StageFailure(f"stage {k + 1} of {world} died (signal {name}); the other stages were stopped. "
                            "If it was killed for memory, use a smaller batch or model")
    reports = sorted(reports, key=lambda r: (r[2], r[1]))  # raised errors before lost links, earliest first
    if reports:
        k, _, _, kind, msg, plain, tb, fields = reports[0]
        cls = getattr(errors, kind, None) if kind else None
        if cls is not None and issubclass(cls, errors.SynthgradError) and cls is not StageFailure:
            return cls(f"stage {k + 1} of {world}: {plain}; the other stages were stopped", **fields)
        last = tb.strip().splitlines()[-3:] if tb else []
        detail = "; ".join(line.strip() for line in last[:-1])
        return StageFailure(f"stage {k + 1} of {world} failed: {msg}" + (f" (at {detail})" if detail else "")
                            + "; the other stages were stopped")
    codes = {k + 1: code for k, code in enumerate(exitcodes) if code}
    k = min(codes) if codes else 1
    return StageFailure(f"stage {k} of {world} exited with status {codes.get(k)}; the other stages were stopped")


def check_picklable(spec: PipelineSpec, job: Job) -> None:
    """Refuse, before any process starts, what cannot travel to the stage processes."""
    for name, value in [*vars(spec).items(), ("data", job.feed), ("hooks", job.hooks)]:
        try:
            pickle.dumps(value)
        except Exception as e:  # noqa: BLE001 (pickle raises PicklingError, AttributeError, TypeError)
            raise ConfigError(f"{name} must pickle to reach the stage processes ({e}): use a module-level function "
                              "or class (not a lambda or a function defined inside another), functools.partial, "
                              "and run your script under `if __name__ == '__main__':`") from None


def launch(spec: PipelineSpec, job: Job) -> tuple[list[dict], object]:
    """Run the pipeline with one local process per stage; returns what rank 0's `run_here` returned."""
    check_picklable(spec, job)
    world = spec.num_stages
    ctx = mp.get_context("spawn")
    reports_q, results_q = ctx.Queue(), ctx.Queue()
    port = free_port()
    upper = Job(job.plan)  # the data, the hooks and the saved states go to rank 0 only
    procs = [ctx.Process(target=_spawned, name=f"synthgrad-stage{k + 1}", daemon=True,
                         args=(k, world, port, spec, job if k == 0 else upper, reports_q, results_q))
             for k in range(world)]
    reports: list[tuple] = []
    out = None
    try:
        for p in procs:
            p.start()
        while True:
            with contextlib.suppress(queue.Empty):
                while True:
                    reports.append(reports_q.get_nowait())
            with contextlib.suppress(queue.Empty):
                out = out or results_q.get_nowait()
            if reports or any(p.exitcode not in (None, 0) for p in procs):
                # Let the first error's consequences report too, then pick the cause among them.
                time.sleep(0.5)
                with contextlib.suppress(queue.Empty):
                    while True:
                        reports.append(reports_q.get_nowait())
                exitcodes = [p.exitcode for p in procs]  # before stop_all's own SIGTERMs
                stop_all(procs)
                raise failure(exitcodes, reports, world)
            alive = [p for p in procs if p.exitcode is None]
            if not alive:
                break
            multiprocessing.connection.wait([p.sentinel for p in alive], timeout=0.2)
        if out is None:
            out = results_q.get(timeout=10)
    finally:
        stop_all(procs)
        for q in (reports_q, results_q):
            q.close()
            q.cancel_join_thread()
    return torch.load(io.BytesIO(out), weights_only=False)
