"""One process of the pipeline, from start to end: build this rank's stage and rule, connect, run its loop.

Start-up, in every process (the collective calls happen in the same order everywhere):
1. rank 0 learns the input shape and the batch size from its first batch and tells everyone,
   with the run's schedule; under the complete unlock it also broadcasts the training set;
2. each rank builds its own stage only (spec.stage(rank)) and its optimizer; the per-example
   activation shapes go up the chain, so that rank k builds the interface above it for h_k and
   sizes its messages;
3. on a resume, rank 0 sends every rank its saved StageRule state and position;
4. links, a barrier, and the loop (`loops`, `complete`).
At the end every rank returns every stage's final state, so that any of them can assemble the
plain network (the same way under torchrun as when launched locally).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from synthgrad.auxiliary import DefaultAuxiliaryClassifiers
from synthgrad.defaults import DefaultForwardInterfaces, pipeline_interfaces
from synthgrad.delayed import DelayedStageRule
from synthgrad.engine.complete import RealChain, run_complete
from synthgrad.engine.feed import Feed
from synthgrad.engine.loops import Hooks, Schedule, run_first, run_upper
from synthgrad.engine.process import stage_device
from synthgrad.engine.snapshots import Clock, StepLog, cpu
from synthgrad.engine.spec import PipelineSpec
from synthgrad.engine.worker import StageWorker
from synthgrad.errors import ConfigError
from synthgrad.interfaces import optimizer_to
from synthgrad.labels import check_num_classes, is_soft
from synthgrad.rules import activation_specs
from synthgrad.stage import StageRule, stage_factory, stage_optimizer


@dataclass
class Job:
    """What one run asks of the processes. Rank 0's part (feed, hooks, resume) reaches rank 0 only.

    resume: {"ranks": [{"state": StageRule state, "position": ...} per rank], "elapsed": seconds}.
    """

    plan: Schedule
    feed: Feed | None = None
    hooks: Hooks | None = None
    resume: dict | None = None


def build_rule(spec: PipelineSpec, rank: int, world: int, input_shape: tuple[int, ...],
               in_shape: tuple[int, ...], in_dtype: torch.dtype = torch.float32) -> tuple[StageRule, tuple[int, ...]]:
    """This rank's StageRule (on the CPU) and the per-example shape of its output.

    in_dtype: what the stage reads: the data's dtype for rank 0 (token indices for an nn.Embedding, say),
    float32 above it, which is what the wire carries (`packets`).
    """
    torch.manual_seed(spec.seed + rank)  # a factory that draws its initialisation gets the same one every run
    stage = spec.stage(rank)
    ((out_shape, out_dtype),) = activation_specs([stage], torch.zeros(2, *in_shape, dtype=in_dtype))
    if rank < world - 1 and out_dtype != torch.float32:
        raise ConfigError(f"its output is {str(out_dtype).removeprefix('torch.')}, but the pipeline "
                          "carries activations between processes as float32: keep the stages in float32 (sg.DNI "
                          "in one process takes any dtype)")
    if rank == world - 1 and spec.method in ("cdni", "dgl"):
        check_num_classes(out_shape, spec.num_classes, spec.loss_fn)
    interface = forward = None
    if spec.method in ("dni", "cdni", "dgl") and rank < world - 1:
        default = (DefaultAuxiliaryClassifiers(spec.num_classes or 0) if spec.method == "dgl"
                   else pipeline_interfaces(spec.method, spec.num_classes))
        make = spec.interface or default
        torch.manual_seed(spec.seed * 7919 + 1 + rank)
        interface = make(rank, out_shape)
    if spec.complete and rank > 0:
        make_input = spec.forward_interface or DefaultForwardInterfaces(spec.method == "cdni", spec.num_classes)
        torch.manual_seed(spec.seed * 7919 + 5003 + rank)
        forward = make_input(rank, input_shape, in_shape)
    kind = DelayedStageRule if spec.method == "ddg" and rank < world - 1 else StageRule
    factory = stage_factory(spec.optimizer, spec.lower_optimizer, rank, world)
    rule = kind(rank, stage, stage_optimizer(factory, stage, rank), interface=interface,
                     forward_interface=forward, loss_fn=spec.loss_fn, update_prob=spec.update_prob, seed=spec.seed,
                     keep=2 * spec.max_inflight + 8)
    return rule, out_shape


def _meta(job: Job, spec: PipelineSpec) -> dict:
    """Rank 0: what every rank needs to know before it builds anything."""
    assert job.feed is not None
    x0, y0 = job.feed.first_batch()
    tensors = job.feed.tensors
    if spec.complete and tensors is None:
        raise ConfigError("the complete unlock needs the training data as (x, y) tensors: every stage walks the "
                          "same batches itself; pass tensors instead of a loader, or use unlock='update'")
    if is_soft(y0) and y0.dtype != torch.float32:
        raise ConfigError(f"soft labels travel between stages as float32; the data gave {y0.dtype}: pass y.float()")
    return {"input_shape": tuple(x0.shape[1:]), "input_dtype": x0.dtype, "batch": len(y0), "plan": job.plan,
            "label_width": y0.shape[1] if is_soft(y0) else 0,
            "num_train": None if tensors is None else len(tensors[1]), "order_seed": job.feed.seed,
            "resumed": job.resume is not None}


def _broadcast_training_set(spec: PipelineSpec, rank: int, meta: dict, job: Job,
                            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    n = meta["num_train"]
    tx = torch.empty(n, *meta["input_shape"], dtype=meta["input_dtype"], device=device)
    width = meta["label_width"]  # soft labels [n, K], or class indices [n]
    ty = torch.empty(n, width, device=device) if width else torch.empty(n, dtype=torch.int64, device=device)
    if rank == 0:
        assert job.feed is not None and job.feed.tensors is not None
        tx.copy_(job.feed.tensors[0])
        ty.copy_(job.feed.tensors[1])
    dist.broadcast(tx, src=0)
    dist.broadcast(ty, src=0)
    return tx, ty


def run_rank(spec: PipelineSpec, job: Job, rank: int, world: int, local_rank: int) -> tuple[list[dict], object]:
    """Run this process as stage `rank` of `world` (the process group is up). Returns, in every process,
    every stage's final StageRule state (on the CPU) and what rank 0's hooks collected (`hooks.result()`)."""
    device = stage_device(spec.device, local_rank)
    got = [_meta(job, spec) if rank == 0 else None]
    dist.broadcast_object_list(got, src=0)
    meta: dict = got[0]  # type: ignore[assignment]
    input_shape, batch, plan = meta["input_shape"], meta["batch"], meta["plan"]
    train = _broadcast_training_set(spec, rank, meta, job, device) if spec.complete else None
    # The activation shapes go up the chain: each rank needs the shape of its input to build its stage's
    # messages, and the shape of its output to build the interface above it.
    in_shape = input_shape
    if rank > 0:
        box: list = [None]
        dist.recv_object_list(box, src=rank - 1)
        in_shape = box[0]
    rule, out_shape = build_rule(spec, rank, world, input_shape, in_shape,
                                 meta["input_dtype"] if rank == 0 else torch.float32)
    if rank < world - 1:
        dist.send_object_list([out_shape], dst=rank + 1)
    rule.stage.to(device)
    optimizer_to(rule.optimizer, device)
    for i in (rule.interface, rule.forward_interface):
        if i is not None:
            i.to(device)
    torch.manual_seed(spec.seed + 1_000_003 * rank)  # rank-local randomness (dropout, ...)
    w = StageWorker(spec, rank, world, rule, device, batch, in_shape, out_shape, meta["label_width"])
    saved = _scatter_resume(job, rank, world) if meta["resumed"] else None
    elapsed = 0.0
    if saved is not None:
        rule.load_state_dict(saved["state"])
        elapsed = saved["elapsed"]
        w.restore(saved["position"], elapsed)
    rule.stage.train()
    # Links: a process group per link and direction (created by every rank, in the same order).
    fwd_groups = [dist.new_group([k, k + 1]) for k in range(world - 1)]
    bwd_groups = [dist.new_group([k, k + 1]) for k in range(world - 1)]
    # gloo moves host tensors only: GPU stages that share GPUs stage their messages through the host.
    w.connect(fwd_groups, bwd_groups, torch.device("cpu") if dist.get_backend() == "gloo" else device)
    log = StepLog(w, plan.log_every, saved["position"].get("log") if saved else None) if rank == world - 1 else None
    dist.barrier()
    w.t0 = time.perf_counter() - elapsed  # wall times continue across a resume
    if rank == 0:
        assert job.feed is not None and job.hooks is not None
        run_first(w, job.feed, plan, job.hooks, Clock(elapsed))
    elif spec.complete:
        assert train is not None
        run_complete(w, RealChain(w, train, batch, meta["order_seed"], log), plan)
    else:
        run_upper(w, log)
    if rank == 0:
        assert job.hooks is not None
        job.hooks.on_end()
    states: list = [None] * world
    dist.all_gather_object(states, cpu(rule.state_dict()))
    result = [job.hooks.result() if rank == 0 and job.hooks is not None else None]
    dist.broadcast_object_list(result, src=0)
    return states, result[0]


def _scatter_resume(job: Job, rank: int, world: int) -> dict:
    """Rank 0 sends every rank its saved state and position; returns this rank's, with the run's elapsed time."""
    if rank == 0:
        assert job.resume is not None
        ranks = job.resume["ranks"]
        if len(ranks) != world:
            raise ConfigError(f"the saved run has {len(ranks)} stages, but {world} processes were started")
        for k in range(1, world):
            dist.send_object_list([{**ranks[k], "elapsed": job.resume["elapsed"]}], dst=k)
        return {**ranks[0], "elapsed": job.resume["elapsed"]}
    box: list = [None]
    dist.recv_object_list(box, src=0)
    return box[0]


def assemble(spec: PipelineSpec, states: list[dict]) -> torch.nn.Sequential:
    """The plain network from every stage's final state, built with the spec's stage factory, in eval mode."""
    stages = []
    for k, state in enumerate(states):
        torch.manual_seed(spec.seed + k)
        stage = spec.stage(k)
        stage.load_state_dict(state["stage"])
        stages.append(stage)
    return torch.nn.Sequential(*stages).eval()

