"""`synthgrad train --stages K`: the command line's client of the decoupled engine (synthgrad.engine).

It turns a TrainConfig into the engine's spec (registry stages, default interfaces, the
schedule), and gives rank 0 hooks that write the run directory exactly as the single-process
trainer does: config.json, metrics.jsonl, checkpoint.pt (plus each rank's position, for
resume), best.pt and final.pt. Launch locally with `run_pipeline`; across machines, run this
module under torchrun, one process per stage, with a config.json (an earlier run's, or one
holding only the keys you change; `stages` must equal the number of processes)::

    torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m synthgrad.pipeline --config cfg.json --run-dir runs/pipe

The environment each process reads is described in synthgrad.engine.launch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from synthgrad import checkpoint, data, idx
from synthgrad.config import TrainConfig
from synthgrad.engine.api import Pipeline
from synthgrad.engine.launch import run_here
from synthgrad.engine.loops import Hooks, Schedule
from synthgrad.engine.rank import Job
from synthgrad.engine.snapshots import Snapshot
from synthgrad.engine.spec import PipelineSpec
from synthgrad.errors import ConfigError, StageFailure, SynthgradError, require
from synthgrad.interfaces import BackwardInterface, ForwardInterface
from synthgrad.metrics import read_metrics
from synthgrad.rules import StepRule
from synthgrad.rundir import METRICS, Checkpoint, RunDir
from synthgrad.schedules import lr_factor
from synthgrad.trainer import RunResult, build_rule, evaluate, stage_optimizers

KIND = "pipeline"  # the run directory's kind of run

DEFAULT_INFLIGHT = 2  # activations a stage may have sent and not yet seen received (backpressure)


class RegistryModel:
    """The factories of a registry model's run: every process builds the whole rule from the run's seed,
    as the single-process trainer does, and keeps its own stage and interfaces. So a pipeline starts
    from exactly the single-process initialisation (and a lockstep run would equal it bit for bit)."""

    def __init__(self, cfg: TrainConfig, input_shape: tuple[int, ...], num_classes: int):
        self.cfg, self.input_shape, self.num_classes = cfg.to_dict(), tuple(input_shape), num_classes
        self._rule: StepRule | None = None  # built once per process, never pickled

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_rule": None}

    def rule(self) -> StepRule:
        if self._rule is None:
            self._rule = build_rule(TrainConfig.from_dict(self.cfg), self.input_shape, self.num_classes)
        return self._rule

    def stage(self, k: int) -> torch.nn.Module:
        return self.rule().stage_rules[k].stage

    def interface(self, k: int, shape: tuple[int, ...]) -> BackwardInterface:
        interface = self.rule().stage_rules[k].interface
        assert interface is not None
        return interface

    def forward_interface(self, k: int, input_shape: tuple[int, ...], shape: tuple[int, ...]) -> ForwardInterface:
        forward = self.rule().stage_rules[k].forward_interface
        assert forward is not None
        return forward


@dataclass(frozen=True)
class ConfigSchedule:
    """A run's learning-rate schedule (cosine or constant over its total steps), picklable."""

    schedule: str
    total: int

    def __call__(self, step: int) -> float:
        return lr_factor(self.schedule, step, self.total)


def spec_from_config(cfg: TrainConfig, input_shape: tuple[int, ...], num_classes: int, num_train: int,
                     max_inflight: int = DEFAULT_INFLIGHT, fault: tuple[int, int] | None = None,
                     slow: tuple[int, float] | None = None) -> PipelineSpec:
    """The engine's spec of a CLI run: the registry model cut into cfg.stages, the default interfaces."""
    assert cfg.stages is not None
    model = RegistryModel(cfg, input_shape, num_classes)
    optimizer, lower = stage_optimizers(cfg)
    return PipelineSpec(
        model.stage, cfg.stages, cfg.method, num_classes, optimizer, model.interface,
        model.forward_interface, cfg.unlock, update_prob=cfg.update_prob, seed=cfg.seed,
        schedule=None if cfg.schedule == "constant" else ConfigSchedule(cfg.schedule, cfg.total_steps(num_train)),
        max_inflight=max_inflight, threads=cfg.threads, device=cfg.device, fault=fault, slow=slow,
        lower_optimizer=lower)


class RunHooks(Hooks):
    """Rank 0's hooks of a CLI run: evaluations, metrics.jsonl, checkpoints, best.pt and final.pt, all through
    the run directory (synthgrad.rundir) that the launcher claimed (or, under torchrun, rank 0 itself)."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, dataset: data.Dataset, resumed: dict | None, quiet: bool,
                 claimed: RunDir | None = None):
        self.cfg, self.run_dir, self.dataset, self.resumed, self.quiet = cfg, run_dir, dataset, resumed, quiet
        self.claimed = claimed  # under torchrun: the RunDir rank 0 claimed; locally the launcher holds it
        self.best = resumed["best_accuracy"] if resumed else -1.0
        self.final = resumed["final_accuracy"] if resumed else math.nan
        self.rule: StepRule | None = None  # the whole rule, assembled from the reports (built in rank 0)
        self.run: RunDir | None = None
        self.step = 0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "claimed": None}  # a claim (its lock) stays with the process that made it

    def _open(self) -> tuple[StepRule, RunDir]:
        if self.run is None:
            ds = self.dataset
            self.rule = build_rule(self.cfg, ds.input_shape, ds.num_classes)
            run = self.claimed
            if run is None:
                run = RunDir(self.run_dir, KIND)
                run.attach()
            if self.resumed is not None:
                run.resume(self.cfg)  # metrics.jsonl cut back to what the checkpoint had seen
            else:
                run.begin(self.cfg, ds.source, engine="pipeline", num_train=len(ds.train_y))
            self.run = run
            if not self.quiet:
                verb = f"resuming at step {self.resumed['step']}" if self.resumed else "training"
                print(f"{verb} {self.cfg.model} on {self.cfg.dataset} with {self.cfg.method}, a pipeline of "
                      f"{self.cfg.stages} processes ({ds.source}); run directory {self.run_dir}", file=sys.stderr,
                      flush=True)
        assert self.rule is not None
        return self.rule, self.run

    def snapshot_due(self, step: int, epoch: int, batch: int) -> bool:
        return self._wants(step) != (False, False)

    def _wants(self, step: int) -> tuple[bool, bool]:
        cfg = self.cfg
        return cfg.eval_every > 0 and step % cfg.eval_every == 0, step % cfg.checkpoint_every == 0

    def _evaluate(self, rule: StepRule) -> tuple[float, float]:
        ds = self.dataset
        return evaluate(rule.network(), ds.test_x, ds.test_y, self.cfg.eval_batch_size)

    def on_snapshot(self, snap: Snapshot) -> None:
        rule, run = self._open()
        assert run.metrics is not None
        for r in snap.records:  # the last stage's step records since the previous snapshot
            run.metrics.write(r)
        for stage_rule, state in zip(rule.stage_rules, snap.states(), strict=True):
            stage_rule.load_state_dict(state)
        rule.steps = self.step = snap.step
        t0 = time.perf_counter()
        if snap.mid_epoch:
            want_eval, want_save = self._wants(snap.step)
            if want_eval:
                accuracy, test_loss = self._evaluate(rule)
                run.metrics.write({"kind": "eval", "epoch": snap.epoch, "step": snap.step, "test_accuracy": accuracy,
                                   "test_loss": test_loss, "wall_time_s": round(snap.clock.wall(), 3),
                                   "eval_time_s": round(time.perf_counter() - t0, 3)})
            if want_save:
                self._save(snap)
            return
        accuracy, test_loss = self._evaluate(rule)
        er = snap.epoch_record
        record = {"kind": "epoch", "epoch": snap.epoch, "step": snap.step, "train_loss": er["train_loss"],
                  "test_accuracy": accuracy, "test_loss": test_loss, "wall_time_s": round(snap.clock.wall(), 3),
                  "eval_time_s": round(time.perf_counter() - t0, 3), "complete": snap.epoch_end,
                  **{k: v for k, v in er.items() if k != "train_loss"}}
        run.metrics.write(record)
        if not self.quiet:
            loss = record["train_loss"]
            print(f"epoch {snap.epoch + 1}/{self.cfg.epochs}  step {snap.step}  train_loss "
                  f"{loss if loss is None else f'{loss:.4f}'}  test_accuracy {accuracy:.4f}  "
                  f"{record['samples_per_s']:,.0f} samples/s  {record['epoch_time_s']:.1f}s", file=sys.stderr,
                  flush=True)
        self.final = accuracy
        if accuracy > self.best:
            self.best = accuracy
            with snap.clock.paused():
                run.save_model(checkpoint.BEST, snap.step, {"test_accuracy": accuracy,
                                                            "stages": rule.stages.state_dict(),
                                                            "model": rule.model_state_dict()})
        self._save(snap)

    def _save(self, snap: Snapshot) -> None:
        """checkpoint.pt: the whole rule (assembled from the reports) and each rank's position, which a pipeline
        resume restores rank by rank. Left out of the wall clock, as the trainer leaves out its checkpoints,
        so that wall times compare across the two."""
        rule, run = self._open()
        with snap.clock.paused():
            epoch, batch = snap.next_batch
            run.save_checkpoint(snap.step, {
                "rule": rule.state_dict(), "epoch": epoch, "batch": batch, "elapsed": snap.clock.wall(),
                "best_accuracy": self.best, "final_accuracy": self.final,
                "positions": [r["position"] for r in snap.reports]})

    def on_end(self) -> None:
        rule, run = self._open()
        run.save_model(checkpoint.FINAL, self.step, {"test_accuracy": self.final, "stages": rule.stages.state_dict(),
                                                     "model": rule.model_state_dict()})
        if run.metrics is not None:
            run.metrics.close()
            run.metrics = None


def load_resume_state(run_dir: Path, world: int, per_epoch: int) -> dict:
    """The run directory's checkpoint.pt, checked to be one a pipeline of `world` stages can resume from:
    its payload, with the step."""
    path = run_dir / checkpoint.LATEST
    ckpt = Checkpoint.from_state(checkpoint.load(path), path)
    positions = ckpt.payload.get("positions")
    if ckpt.kind != KIND or positions is None:
        raise ConfigError(f"{path} was not written by the pipeline engine of this synthgrad version (no per-stage "
                          "positions); resume it without --stages, or start again with --overwrite")
    if len(positions) != world:
        raise ConfigError(f"{path} holds {len(positions)} stages, but {world} processes were started; "
                          f"resume with --stages {len(positions)}")
    for pos in positions:
        require(0 <= pos["next_batch"][1] <= per_epoch, f"{path}: a stage position {pos['next_batch']} lies "
                "outside the epoch; the checkpoint does not match this config (batch size or dataset changed?)")
    return {**ckpt.payload, "step": ckpt.step}


def _resume_job(state: dict, world: int) -> dict:
    """The engine's resume: each rank's StageRule state and position, and the run's elapsed seconds."""
    rule = state["rule"]
    if "stage_rules" not in rule:  # a checkpoint from before the per-stage layout
        from synthgrad.rules import _from_flat_state

        rule = _from_flat_state(rule, world)
    return {"ranks": [{"state": s, "position": p} for s, p in zip(rule["stage_rules"], state["positions"],
                                                                  strict=True)],
            "elapsed": state["elapsed"]}


def result_from_metrics(run_dir: Path) -> RunResult:
    """RunResult of a finished pipeline run, read back from its metrics.jsonl."""
    epochs = [r for r in read_metrics(run_dir / METRICS) if r.get("kind") == "epoch"]
    if not epochs:
        raise StageFailure(f"the pipeline ended without evaluating; see {run_dir / METRICS}")
    accs = [r["test_accuracy"] for r in epochs]
    return RunResult(run_dir, accs[-1], max(accs), epochs[-1]["step"], epochs[-1]["wall_time_s"])


def _hooks(cfg: TrainConfig, dataset: data.Dataset, run_dir: Path, resume: bool, quiet: bool,
           claimed: RunDir | None = None) -> tuple[RunHooks, dict | None]:
    """Rank 0's hooks of a CLI run and, to resume, what every rank takes up (refusing an unusable checkpoint)."""
    assert cfg.stages is not None
    per_epoch = data.num_batches(len(dataset.train_y), cfg.batch_size)
    state = load_resume_state(run_dir, cfg.stages, per_epoch) if resume else None
    return RunHooks(cfg, run_dir, dataset, state, quiet, claimed), _resume_job(state, cfg.stages) if state else None


def _fit(pipe: Pipeline, cfg: TrainConfig, dataset: data.Dataset, hooks: RunHooks, resume: dict | None) -> None:
    pipe.fit((dataset.train_x, dataset.train_y), epochs=cfg.epochs, batch_size=cfg.batch_size,
             max_steps=cfg.max_steps, log_every=cfg.log_every, hooks=hooks, resume=resume)


def run_pipeline(cfg: TrainConfig, dataset: data.Dataset, run_dir: str | Path | RunDir, resume: bool = False,
                 quiet: bool = False, max_inflight: int = DEFAULT_INFLIGHT,
                 _fault: tuple[int, int] | None = None, _slow: tuple[int, float] | None = None) -> RunResult:
    """Train with one local process per stage (cfg.stages of them); the run directory as the trainer's.

    run_dir: a path (claimed here for the run's life: a new run, or with `resume` an existing one), or a
        RunDir its caller has claimed already (the CLI claims it before it loads the data)."""
    if cfg.stages is None or cfg.stages < 2:
        raise ConfigError("the pipeline engine needs --stages K with K >= 2")
    if cfg.method == "backprop" and cfg.update_prob < 1:
        raise ConfigError("--update-prob below 1 is not supported by the locked pipeline (--method backprop "
                          "--stages K); use --method dni or cdni, or drop --stages")
    if max_inflight < 1:
        raise ConfigError(f"max_inflight must be >= 1, got {max_inflight}")
    if cfg.input_shape is None:  # bind the config to its data, as the CLI does
        cfg = cfg.with_data(dataset.input_shape, dataset.num_classes, len(dataset.train_y))
    claim = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir, KIND)
    path = claim.path
    hooks, state = _hooks(cfg, dataset, path, resume, quiet)  # refuses an unusable checkpoint before any start
    pipe = Pipeline.from_spec(spec_from_config(cfg, dataset.input_shape, dataset.num_classes, len(dataset.train_y),
                                               max_inflight, _fault, _slow))
    owned = not claim.claimed
    if owned:
        claim.reopen() if resume else claim.create()
    try:
        _fit(pipe, cfg, dataset, hooks, state)  # rank 0 attaches to the directory this process holds
    finally:
        if owned:
            claim.close()
    return result_from_metrics(path)


def data_shape(cfg: TrainConfig) -> tuple[tuple[int, ...], int, int]:
    """(input shape, classes, training examples) of a run's data without reading it: from the config, or for
    a known dataset from its description. Ranks other than 0 use it under torchrun."""
    known = idx.DATASETS.get(cfg.dataset)
    shape = tuple(cfg.input_shape) if cfg.input_shape else data.INPUT_SHAPES.get(cfg.dataset)
    classes = cfg.num_classes or (len(known.classes) if known else None)
    num_train = cfg.extra.get("num_train") or (known.counts["train"] if known else None)
    if shape is None or classes is None or num_train is None:
        raise ConfigError(f"stages other than the first do not read {cfg.dataset}: give its input_shape, "
                          "num_classes and extra.num_train in the config (a run's config.json has them)")
    return shape, classes, num_train


def main(argv: list[str] | None = None) -> int:
    """Entry point under torchrun: `python -m synthgrad.pipeline --config cfg.json --run-dir DIR`."""
    p = argparse.ArgumentParser(prog="python -m synthgrad.pipeline",
                                description="Run one stage of a synthgrad pipeline (start one process per stage "
                                            "with torchrun; see synthgrad.engine.launch for the environment).")
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
    rank = int(os.environ["RANK"])
    try:
        raw = json.loads(a.config.read_text())
        extra = raw.pop("extra", None) or {}  # versions and dates are this run's; the data's size is kept
        cfg = TrainConfig.from_dict(raw).resolve()
        if "num_train" in extra:
            cfg.extra["num_train"] = extra["num_train"]
        if cfg.stages is None:
            cfg.stages = int(os.environ["WORLD_SIZE"])
            cfg.validate()
        # Every rank needs the data's shape and size to build its stage and schedule; only rank 0 reads the data,
        # the others take them from the config (written by an earlier run, or given): see `data_shape`.
        dataset = data.load(cfg.dataset, cfg.data_dir, cfg.cache_dir, check_md5=cfg.verify_md5) if rank == 0 else None
        input_shape, num_classes, num_train = data_shape(cfg)
        claim = None
        if dataset is not None:  # rank 0 claims the run directory, and holds it for the run's life
            cfg = cfg.with_data(dataset.input_shape, dataset.num_classes, len(dataset.train_y))
            input_shape, num_classes, num_train = dataset.input_shape, dataset.num_classes, len(dataset.train_y)
            claim = RunDir(a.run_dir, KIND)
            claim.reopen() if a.resume else claim.create(a.overwrite)
        pipe = Pipeline.from_spec(spec_from_config(cfg, input_shape, num_classes, num_train, a.max_inflight))
        try:
            if dataset is None:  # ranks other than 0: the engine gives them their part of the run
                run_here(pipe.spec, Job(Schedule(cfg.epochs, cfg.max_steps, cfg.log_every)))
            else:
                _fit(pipe, cfg, dataset, *_hooks(cfg, dataset, a.run_dir, a.resume, a.quiet, claim))
        finally:
            if claim is not None:
                claim.close()
    except (SynthgradError, OSError, json.JSONDecodeError, TypeError) as e:
        print(f"error (stage {rank + 1}): {e}", file=sys.stderr)
        return getattr(e, "exit_code", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
