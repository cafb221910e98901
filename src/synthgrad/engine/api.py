"""The public API: train your own stages with one process per stage, locally or under torchrun."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from synthgrad.defaults import PIPELINE_STAGE_LR
from synthgrad.engine.feed import Feed
from synthgrad.engine.launch import launch, run_here, under_torchrun
from synthgrad.engine.loops import Hooks, Schedule
from synthgrad.engine.rank import Job, assemble
from synthgrad.engine.snapshots import Snapshot
from synthgrad.engine.spec import ForwardInterfaceFactory, InterfaceFactory, PipelineSpec, StageFactory
from synthgrad.interfaces import OptimizerFactory, adam
from synthgrad.stage import LossFn

Evaluate = Callable[[nn.Module], "dict | float"]  # the assembled network (eval mode) -> metrics


@dataclass
class PipelineResult:
    """What `Pipeline.fit` returns, in every process: the plain network (eval mode), the metrics records
    (kind "step": the loss and each interface's synth_loss and staleness; kind "epoch": samples_per_s,
    per-stage busy/idle seconds, your `evaluate`'s figures, ...), and every stage's final state."""

    network: nn.Sequential
    metrics: list[dict]
    states: list[dict]


class _Collect(Hooks):
    """The public API's rank-0 hooks: keep every record; evaluate the assembled network at each epoch's end."""

    def __init__(self, spec: PipelineSpec, evaluate: Evaluate | None):
        self.spec, self.evaluate, self.records = spec, evaluate, []

    def on_snapshot(self, snap: Snapshot) -> None:
        self.records.extend(snap.records)
        if snap.mid_epoch:
            return
        record = {"kind": "epoch", "epoch": snap.epoch, "step": snap.step, **snap.epoch_record,
                  "wall_time_s": round(snap.clock.wall(), 3)}
        if self.evaluate is not None:
            with snap.clock.paused():  # evaluation is not training time
                out = self.evaluate(assemble(self.spec, snap.states()))
            record.update(out if isinstance(out, dict) else {"test_accuracy": float(out)})
        self.records.append(record)

    def result(self) -> list[dict]:
        return self.records


class Pipeline:
    """Decouple your own model for real: one process per stage, over torch.distributed.

    The user owns the model, the data and the evaluation; the engine owns the processes. Every
    argument must pickle, since it travels to the stage processes: use module-level functions
    (and run your script under `if __name__ == "__main__":`), functools.partial, or objects of
    module-level classes, not lambdas.

    stage: k -> stage k (any nn.Module; the stages must chain). Each process builds only its own.
    num_stages: K, the number of stages and processes.
    method: "dni" (default), "cdni" (synthesizers see the label; needs num_classes) or "backprop"
        (the locked pipeline: every stage waits for the true gradient from above).
    interface: (k, per-example shape of h_k) -> the BackwardInterface above stage k, exactly as you
        would give `sg.DNI` (custom synthesizers welcome; for cDNI they receive the one-hot label as
        context; a BackwardInterface left at center=None centres their synthetic gradient, as cDNI's
        default does). None: the library's default synthesizers; for cDNI the pipeline's own, a rank-64
        synthesizer with the label embedded at Adam 1e-3, centred (cheap enough to keep the stages busy).
    optimizer: the stages' optimizer factory (`sg.adam(lr)`, `sg.sgd(lr)`); default Adam at `lr`, whose
        default is 3e-4 for dni and cdni (stages driven by late, noisy targets move more safely) and 1e-3
        otherwise.
    lower_optimizer: the factory for every stage but the last (those that follow synthetic gradients), as
        `sg.DNI`'s; default: `optimizer`.
    unlock, forward_interface: "complete" also removes the forward lock (synthetic inputs; needs the
        data as tensors); forward_interface: (k, input shape, shape of h_(k-1)) -> ForwardInterface.
    lockstep: each stage takes step t+1 only after its target for step t arrived: slower, and equal
        to `sg.DNI.step` bit for bit (for testing). Default: fully asynchronous.
    schedule: step -> learning-rate multiplier (e.g. `sg.cosine_schedule(total_steps)`).
    threads: torch threads per process (default: the cores divided among the stages); device:
        "cpu" or "cuda" (one GPU per local stage when there are enough: NCCL; else shared, over gloo).

    Under torchrun (one process per stage, on one machine or many) the same script runs unchanged:
    each process runs its own stage, and `fit` returns the same result in every one.
    """

    def __init__(self, stage: StageFactory, num_stages: int, *, method: str = "dni", num_classes: int | None = None,
                 interface: InterfaceFactory | None = None, optimizer: OptimizerFactory | None = None,
                 lr: float | None = None, loss_fn: LossFn = F.cross_entropy, unlock: str = "update",
                 forward_interface: ForwardInterfaceFactory | None = None, update_prob: float = 1.0,
                 seed: int = 0, schedule: Callable[[int], float] | None = None, lockstep: bool = False,
                 max_inflight: int = 2, threads: int | None = None, device: str = "cpu",
                 lower_optimizer: OptimizerFactory | None = None):
        if lr is None:
            lr = PIPELINE_STAGE_LR if method in ("dni", "cdni") else 1e-3
        self.spec = PipelineSpec(stage, num_stages, method, num_classes, optimizer or adam(lr), interface,
                                 forward_interface, unlock, loss_fn, update_prob, seed, schedule, lockstep,
                                 max_inflight, threads, device, lower_optimizer=lower_optimizer)
        self.spec.validate()

    @classmethod
    def from_spec(cls, spec: PipelineSpec) -> Pipeline:
        """A pipeline of a PipelineSpec built elsewhere (the command line builds one from its config)."""
        spec.validate()
        pipe = cls.__new__(cls)
        pipe.spec = spec
        return pipe

    def fit(self, data: object, *, epochs: int = 1, batch_size: int | None = None, max_steps: int | None = None,
            log_every: int = 50, evaluate: Evaluate | None = None, drop_last: bool = True,
            hooks: Hooks | None = None, resume: dict | None = None) -> PipelineResult:
        """Train on `data` and return the plain network and the metrics.

        data: (x, y) tensors (shuffled by the seed each epoch, in batches of batch_size); or a factory
            run in rank 0's process, called as factory(epoch) or factory(), returning an iterable of
            (x, y) batches (e.g. a torch DataLoader); or any re-iterable of (x, y) batches.
        max_steps: stop after this many steps (all epochs otherwise).
        evaluate: network -> {metric: value} (or one number: test_accuracy), run on rank 0 with the
            assembled network at each epoch's end, left out of the wall time.
        hooks: for clients that keep a run directory (the command line does): rank 0's
            `synthgrad.engine.loops.Hooks` (mid-epoch snapshots, evaluation, checkpoints) instead of the
            default ones, which keep the metrics and call `evaluate`. metrics is then hooks.result().
        resume: continue a run: {"ranks": [{"state": StageRule state, "position": ...} per stage],
            "elapsed": seconds}, as a checkpoint written by such hooks from snapshots holds them.
        """
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if hooks is not None and evaluate is not None:
            raise ValueError("give either hooks or evaluate: hooks do their own evaluation")
        feed = Feed(data, batch_size, self.spec.seed, drop_last)
        job = Job(Schedule(epochs, max_steps, log_every), feed, hooks or _Collect(self.spec, evaluate), resume)
        states, metrics = run_here(self.spec, job) if under_torchrun() else launch(self.spec, job)
        return PipelineResult(assemble(self.spec, states), list(metrics or []), states)

