"""The single-process trainer: loop, evaluation, metrics, checkpoints and resume."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from synthgrad import checkpoint, data, models
from synthgrad.auxiliary import DGL
from synthgrad.config import TrainConfig
from synthgrad.interfaces import OPTIMIZERS, OptimizerFactory
from synthgrad.metrics import MetricsLog, RunningMeans
from synthgrad.rules import DNI, Backprop, StepRule
from synthgrad.rundir import CONFIG, METRICS, RunDir, read_model
from synthgrad.stopping import StopRequests

__all__ = ["CONFIG", "METRICS", "KIND", "Progress", "RunResult", "Trainer", "build_rule", "evaluate", "load_network",
           "new_run_dir", "prepare_run_dir"]

KIND = "classifier"  # the kind of run in this trainer's checkpoints
HEALTH_KEYS = ("grad_cosine", "grad_rel_error", "applied_cosine", "applied_rel_error",  # a diagnosed step's stats
               "param_cosine", "param_rel_error", "act_rms", "act_rms_drift", "mix_synthetic", "mix_local")


def stage_optimizers(cfg: TrainConfig) -> tuple[OptimizerFactory, OptimizerFactory | None]:
    """The run's optimizer factory at --lr, and at --lower-lr for every stage but the last (None: not given)."""
    make = OPTIMIZERS[cfg.optimizer]
    return make(cfg.lr), None if cfg.lower_lr is None else make(cfg.lower_lr)


def build_rule(cfg: TrainConfig, input_shape: tuple[int, ...], num_classes: int) -> StepRule:
    """The model's stages and the method's step rule, initialised from cfg.seed."""
    torch.manual_seed(cfg.seed)
    stages = models.build_stages(cfg.model, input_shape, num_classes, cfg.stages, cfg.width)
    optimizer, lower = stage_optimizers(cfg)
    sample = torch.zeros(2, *input_shape)
    if cfg.method in ("backprop", "ddg"):  # ddg: the pipeline delays backprop's gradients (synthgrad.delayed)
        return Backprop(stages, optimizer=optimizer, update_prob=cfg.update_prob, seed=cfg.seed, lower_optimizer=lower)
    if cfg.method == "dgl":
        return DGL.build(stages, sample, num_classes, optimizer=optimizer, lower_optimizer=lower, aux_lr=cfg.synth_lr,
                         seed=cfg.seed)
    return DNI.build(stages, sample, conditioned=cfg.method == "cdni", num_classes=num_classes,
                     optimizer=optimizer, lower_optimizer=lower, synth_lr=cfg.synth_lr, synth_hidden=cfg.synth_hidden,
                     synth_width=cfg.synth_width, synth_scale=cfg.synth_scale,
                     synth_warmup=cfg.synth_warmup, synth_rank=cfg.synth_rank, synth_every=cfg.synth_every,
                     synth_center=cfg.synth_center, synth_classifier=cfg.synth_classifier,
                     synth_trust=cfg.synth_trust, synth_local=cfg.synth_local, synth_mean_token=cfg.synth_mean_token,
                     target=cfg.target, unlock=cfg.unlock,
                     input_hidden=cfg.input_hidden, input_width=cfg.input_width,
                     update_prob=cfg.update_prob, seed=cfg.seed)


@torch.no_grad()
def evaluate(network: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> tuple[float, float]:
    """(accuracy in 0..1, mean cross-entropy) of the plain network in eval mode."""
    was = network.training
    network.eval()
    correct, loss_sum = 0, 0.0
    for xb, yb in data.batches(x, y, batch_size, drop_last=False):
        logits = network(xb)
        loss_sum += F.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(1) == yb).sum().item()
    network.train(was)
    return correct / len(y), loss_sum / len(y)


def new_run_dir(cfg: TrainConfig, root: str | Path = "runs") -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{stamp}-{cfg.model}-{cfg.method}-s{cfg.seed}"


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Create the run directory; never overwrite an existing run unless told to (it is not kept claimed)."""
    claim = RunDir(run_dir, KIND)
    claim.create(overwrite)
    claim.close()


@dataclass
class RunResult:
    run_dir: Path
    final_accuracy: float
    best_accuracy: float
    steps: int
    wall_time_s: float


class Progress:
    """A tqdm bar per epoch on a terminal; plain lines otherwise (CI, logs, pipes)."""

    def __init__(self, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.fancy = enabled and self.stream.isatty()
        self.bar = None

    def start_epoch(self, epoch: int, epochs: int, total: int, initial: int) -> None:
        if self.fancy:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{epochs}",
                            file=self.stream, leave=True, dynamic_ncols=True)

    def update(self, n: int, loss: float | None, samples_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{samples_per_s:,.0f}", refresh=False)

    def end_epoch(self, line: str) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.enabled:
            print(line, file=self.stream, flush=True)


class Trainer:
    """Runs a StepRule over a dataset, writing config, metrics and checkpoints to a run directory."""

    def __init__(self, cfg: TrainConfig, dataset: data.Dataset, run_dir: str | Path | RunDir,
                 rule: StepRule | None = None, progress: Progress | None = None,
                 on_step: Callable[[int], None] | None = None, stop: StopRequests | None = None):
        if cfg.input_shape is None:  # not bound by the CLI: record the data's shape for load_network
            cfg = cfg.with_data(dataset.input_shape, dataset.num_classes, len(dataset.train_y))
        self.cfg, self.dataset = cfg, dataset
        self.run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir, KIND)
        self.run_dir = self.run.path
        self.device = torch.device(cfg.device)
        self.rule = rule or build_rule(cfg, dataset.input_shape, dataset.num_classes)
        self.rule.to(self.device)
        self.progress = progress or Progress()
        self.on_step = on_step  # test hook: called after every step with the global step
        self.stop = stop  # SIGINT/SIGTERM seen: checkpoint after the current step and raise Interrupted
        # Position and bookkeeping, all part of the checkpoint.
        self.epoch = self.batch = self.step = 0
        self.elapsed = 0.0
        self.best_accuracy = -1.0
        self.final_accuracy = float("nan")
        self.epoch_mean = RunningMeans()  # this epoch's training loss so far
        self.window = RunningMeans()  # stats since the last step record
        self.pending_diag: dict = {}  # the last diagnostic step's agreement, written with the next record
        self.saved_at: tuple[int, int, int] | None = None  # (epoch, batch, step) of the last checkpoint written

    @property
    def metrics(self) -> MetricsLog | None:
        return self.run.metrics

    # -- run directory ---------------------------------------------------------------------
    def start(self, overwrite: bool = False) -> None:
        """Begin a new run: claim the directory, write config.json, open an empty metrics log, checkpoint step 0."""
        with self.run.closing_on_error():
            self.run.begin(self.cfg, self.dataset.source, overwrite)
            self.save_checkpoint()

    def resume(self, from_previous: bool = False) -> None:
        """Continue from checkpoint.pt (or checkpoint.prev.pt): same parameters, optimizers, RNG and data position."""
        with self.run.closing_on_error():
            ckpt = self.run.resume(self.cfg, from_previous)
            state = ckpt.payload
            self.rule.load_state_dict(state["rule"])
            self.rule.to(self.device)
            self.step = ckpt.step
            self.epoch, self.batch = state["epoch"], state["batch"]
            self.elapsed, self.best_accuracy = state["elapsed"], state["best_accuracy"]
            self.final_accuracy = state.get("final_accuracy", float("nan"))
            self.epoch_mean = RunningMeans.from_state(state["epoch_mean"])
            self.window = RunningMeans.from_state(state["window"])
            self.pending_diag = state.get("pending_diag", {})
            torch.set_rng_state(state["torch_rng"])

    def save_checkpoint(self) -> None:
        self.saved_at = (self.epoch, self.batch, self.step)
        self.run.save_checkpoint(self.step, {
            "rule": self.rule.state_dict(), "epoch": self.epoch, "batch": self.batch,
            "elapsed": self.elapsed, "best_accuracy": self.best_accuracy,
            "final_accuracy": self.final_accuracy, "epoch_mean": self.epoch_mean.state(),
            "window": self.window.state(), "pending_diag": self.pending_diag, "torch_rng": torch.get_rng_state()})

    def _save_model(self, name: str, accuracy: float) -> None:
        self.run.save_model(name, self.step, {"test_accuracy": accuracy, "stages": self.rule.stages.state_dict(),
                                              "model": self.rule.model_state_dict()})

    def _stop_if_asked(self) -> None:
        """Between steps: if SIGINT or SIGTERM came, checkpoint here (unless just done) and raise Interrupted."""
        if self.stop is not None:
            self.stop.check(self.step, self.run_dir, None if self.saved_at == (self.epoch, self.batch, self.step)
                            else self.save_checkpoint)

    def _log_window(self, samples_per_s: float) -> None:
        """Write one step record: the means since the last one, and any pending diagnostics."""
        assert self.metrics is not None
        record = {"kind": "step", "epoch": self.epoch, "step": self.step, **self.window.means(),
                  "wall_time_s": round(self.elapsed, 3), "samples_per_s": round(samples_per_s, 1),
                  **self.pending_diag}
        self.metrics.write(record)
        self.progress.update(0, record["train_loss"], samples_per_s)
        self.window, self.pending_diag = RunningMeans(), {}

    def _log_eval(self, x_test: torch.Tensor, y_test: torch.Tensor) -> float:
        """Measure test accuracy mid-epoch and write an "eval" record; returns the seconds it took.

        Only epoch-end evaluations choose best.pt and the final accuracy; these trace the curve between them."""
        assert self.metrics is not None
        t0 = time.perf_counter()
        accuracy, test_loss = evaluate(self.rule.network(), x_test, y_test, self.cfg.eval_batch_size)
        seconds = time.perf_counter() - t0
        self.elapsed += seconds
        self.metrics.write({"kind": "eval", "epoch": self.epoch, "step": self.step, "test_accuracy": accuracy,
                            "test_loss": test_loss, "wall_time_s": round(self.elapsed, 3),
                            "eval_time_s": round(seconds, 3)})
        return seconds

    # -- loop ------------------------------------------------------------------------------
    def fit(self) -> RunResult:
        """Train to the end (or to a stop request), then release the run directory."""
        assert self.metrics is not None, "call start() or resume() first"
        try:
            return self._fit()
        finally:
            self.run.close()

    def _fit(self) -> RunResult:
        cfg, ds = self.cfg, self.dataset
        assert self.metrics is not None
        x_train, y_train = ds.train_x.to(self.device), ds.train_y.to(self.device)
        x_test, y_test = ds.test_x.to(self.device), ds.test_y.to(self.device)
        per_epoch = data.num_batches(len(x_train), cfg.batch_size)
        total_steps = cfg.total_steps(len(x_train))
        diagnose = isinstance(self.rule, DNI)  # the health sampling of synthetic gradients
        self.rule.train()
        done = cfg.max_steps is not None and self.step >= cfg.max_steps
        while self.epoch < cfg.epochs and not done:
            order = data.epoch_order(len(x_train), cfg.seed, self.epoch).to(self.device)
            self.progress.start_epoch(self.epoch, cfg.epochs, per_epoch, self.batch)
            t_window, n_window = time.perf_counter(), 0
            t_epoch, n_epoch = time.perf_counter(), 0
            t_last = time.perf_counter()
            for xb, yb in data.batches(x_train, y_train, cfg.batch_size, order, start=self.batch):
                want_diag = diagnose and self.step % cfg.diagnose_every == 0  # the health sampling
                if cfg.schedule != "constant":
                    self.rule.set_lr_factor(cfg.lr_factor(self.step, total_steps))
                stats = self.rule.step(xb, yb, diagnose=want_diag)
                self.step += 1
                self.batch += 1
                now = time.perf_counter()
                self.elapsed += now - t_last
                t_last = now
                self.window.add(stats)
                self.epoch_mean.add({"train_loss": stats["train_loss"]})
                n_window += len(xb)
                n_epoch += len(xb)
                if self.on_step is not None:
                    self.on_step(self.step)
                if want_diag:  # this step's health (agreement, activation RMS), logged with the next record
                    self.pending_diag = {k: stats[k] for k in HEALTH_KEYS if k in stats}
                    self.pending_diag["diagnosed_step"] = self.step
                if self.step % cfg.log_every == 0:
                    self._log_window(n_window / max(now - t_window, 1e-9))
                    t_window, n_window = now, 0
                self.progress.update(1, None, 0.0)
                if cfg.max_steps is not None and self.step >= cfg.max_steps:
                    done = True
                    break
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.batch < per_epoch:
                    # A mid-epoch evaluation: it counts in the wall time, not in the samples/s.
                    seconds = self._log_eval(x_test, y_test)
                    t_last = time.perf_counter()
                    t_window, t_epoch = t_window + seconds, t_epoch + seconds
                if self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                    t_last = time.perf_counter()
                self._stop_if_asked()
            if self.window.sums:  # the epoch's last steps since the previous record
                self._log_window(n_window / max(time.perf_counter() - t_window, 1e-9))
            t_eval = time.perf_counter()
            epoch_time = t_eval - t_epoch
            accuracy, test_loss = evaluate(self.rule.network(), x_test, y_test, cfg.eval_batch_size)
            self.elapsed += time.perf_counter() - t_last
            finished_epoch = self.batch >= per_epoch
            record = {"kind": "epoch", "epoch": self.epoch, "step": self.step,
                      "train_loss": self.epoch_mean.means()["train_loss"],
                      "test_accuracy": accuracy, "test_loss": test_loss,
                      "wall_time_s": round(self.elapsed, 3), "eval_time_s": round(time.perf_counter() - t_eval, 3),
                      "samples_per_s": round(n_epoch / max(epoch_time, 1e-9), 1),
                      "epoch_time_s": round(epoch_time, 3), "complete": finished_epoch}
            self.metrics.write(record)
            self.progress.end_epoch(
                f"epoch {self.epoch + 1}/{cfg.epochs}  step {self.step}  "
                f"train_loss {record['train_loss']:.4f}  test_accuracy {accuracy:.4f}  "
                f"{record['samples_per_s']:,.0f} samples/s  {epoch_time:.1f}s")
            self.final_accuracy = accuracy
            if accuracy > self.best_accuracy:
                self.best_accuracy = accuracy
                self._save_model(checkpoint.BEST, accuracy)
            if finished_epoch:
                self.epoch += 1
                self.batch = 0
                self.epoch_mean = RunningMeans()
            self.save_checkpoint()
            t_last = time.perf_counter()
            self._stop_if_asked()
        self._save_model(checkpoint.FINAL, self.final_accuracy)
        return RunResult(self.run_dir, self.final_accuracy, self.best_accuracy, self.step, self.elapsed)


def load_network(path: str | Path) -> tuple[nn.Sequential, TrainConfig]:
    """The plain network saved in final.pt or best.pt, in eval mode, with its config."""
    saved = read_model(path)
    cfg = TrainConfig.from_dict(saved.config)
    # Runs from before the shape was saved in config.json trained on MNIST or Fashion-MNIST.
    shape = tuple(cfg.input_shape) if cfg.input_shape else data.INPUT_SHAPES[cfg.dataset]
    num_classes = cfg.num_classes or data.NUM_CLASSES[cfg.dataset]
    stages = models.build_stages(cfg.model, shape, num_classes, cfg.stages, cfg.width)
    net = models.compose(stages)
    net.load_state_dict(saved.payload["stages"])
    return net.eval(), cfg
