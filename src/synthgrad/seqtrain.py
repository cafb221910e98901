"""Training sequence tasks (copy, repeat-copy, charlm) with truncated BPTT or DNI through time, into a run directory.

`synthgrad train --task ...` lands here: the run directory is the same kind as for
classification (config.json, metrics.jsonl, checkpoint.pt/final.pt, PNG plots).
Step units: for copy tasks a step is one batch of sequences (one episode, several
window updates); for charlm a step is one truncation window (one update).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import torch

from synthgrad import checkpoint
from synthgrad.config import lr_factor
from synthgrad.errors import ConfigError
from synthgrad.metrics import MetricsLog, RunningMeans
from synthgrad.rnn import LSTMCore, TruncatedBPTT, build_rule
from synthgrad.rundir import CONFIG, RunDir
from synthgrad.seqconfig import SequenceConfig, config_from_args
from synthgrad.stopping import StopRequests
from synthgrad.tasks import (
    REPEAT_CODE,
    CharCorpus,
    CopyTask,
    Curriculum,
    bit_errors,
    char_loss,
    copy_loss,
    evaluate_bpc,
    has_old_repeat_code,
    streams,
)

KIND = "sequence"  # the kind of run in this trainer's checkpoints


def cmd_train_sequence(a: argparse.Namespace, stop: StopRequests | None = None) -> int:
    """`synthgrad train --task ...`: train, write the run directory and plots, print one final line."""
    if a.resume is not None:
        try:
            cfg = SequenceConfig.from_saved(RunDir.read_config(a.resume))
        except TypeError as e:
            raise ConfigError(f"{a.resume / CONFIG} is unreadable ({e}); the run cannot be resumed") from e
        cfg.tensorboard = cfg.tensorboard or a.tensorboard
        run_dir = a.resume
    else:
        cfg = config_from_args(a)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = a.run_dir or Path("runs") / f"{stamp}-{cfg.task}-{cfg.method}-T{cfg.truncation}-s{cfg.seed}"
    if stop is not None:
        stop.run_dir = run_dir
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    trainer = SequenceTrainer(cfg, run_dir, quiet=a.quiet, stop=stop)  # reads the text: checks before the directory
    if a.resume is not None:
        trainer.resume(from_previous=a.from_previous)
    else:
        trainer.start(overwrite=a.overwrite)
    if stop is not None:
        stop.immediate = False  # from here on, a signal stops the loop after a step, with a checkpoint
    result = trainer.fit()
    if not a.no_plots:
        from synthgrad.seqplots import plot_sequence_runs

        plot_sequence_runs([run_dir], run_dir)
    print(f"{result}; {trainer.step} steps, {trainer.elapsed:.1f}s; run directory {run_dir}", flush=True)
    return 0


# -- trainer -----------------------------------------------------------------------------------

class SequenceTrainer:
    """Runs TruncatedBPTT on a sequence task, writing config, metrics and checkpoints to a run directory."""

    def __init__(self, cfg: SequenceConfig, run_dir: str | Path | RunDir, quiet: bool = True,
                 stop: StopRequests | None = None, on_step: Callable[[int], None] | None = None):
        self.cfg, self.quiet, self.stop, self.on_step = cfg, quiet, stop, on_step
        self.run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir, KIND)
        self.run_dir = self.run.path
        self.device = torch.device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.corpus: CharCorpus | None = None
        self.task: CopyTask | None = None
        if cfg.task == "charlm":
            self.corpus = CharCorpus.from_file(cfg.text, cfg.holdout)
            if len(self.corpus.train) < cfg.batch_size * (cfg.truncation + 1):
                raise ConfigError(f"--text {cfg.text} holds {len(self.corpus.train) + len(self.corpus.valid)} "
                                  f"characters; --batch-size {cfg.batch_size} streams of --truncation "
                                  f"{cfg.truncation} windows need at least {cfg.min_text_chars()}: give a longer "
                                  "text, or lower --batch-size or --truncation")
            v = self.corpus.vocab_size
            model = LSTMCore(cfg.embed, cfg.hidden, v, vocab=v)
            loss_fn = char_loss
            self.train_streams = streams(self.corpus.train, cfg.batch_size).to(self.device)  # [N, B]
        else:
            self.task = CopyTask(repeat=cfg.task == "repeat-copy", max_repeats=cfg.max_repeats)
            model = LSTMCore(self.task.input_size, cfg.hidden, self.task.output_size)
            loss_fn = copy_loss
        self.rule: TruncatedBPTT = build_rule(
            model.to(self.device), cfg.method, cfg.truncation, loss_fn, lr=cfg.lr, synth_lr=cfg.synth_lr,
            synth_hidden=cfg.synth_hidden, synth_width=cfg.synth_width, synth_scale=cfg.synth_scale,
            synth_warmup=cfg.synth_warmup, clip=cfg.clip, aux_weight=cfg.aux_weight,
            synth_discount=cfg.synth_discount)
        if self.rule.interface is not None:
            self.rule.interface.to(self.device)
        self.curriculum = Curriculum(threshold=cfg.solve_threshold, window=cfg.solve_window,
                                     max_length=cfg.max_length)
        self.generator = torch.Generator().manual_seed(cfg.seed)  # copy-task data
        self.step, self.position, self.elapsed = 0, 0, 0.0
        self.best_bpc: float | None = None
        self.last_bpc: float | None = None
        self.window = RunningMeans()  # stats since the last step record (in the checkpoint)
        self.window_samples = 0
        self.saved_at: int | None = None  # step of the last checkpoint written

    @property
    def metrics(self) -> MetricsLog | None:
        return self.run.metrics

    # -- run directory -------------------------------------------------------------------------
    def start(self, overwrite: bool = False) -> None:
        """Begin a new run: claim the directory, write config.json, open an empty metrics log, checkpoint step 0."""
        extra: dict = {}
        if self.task is not None and self.task.repeat:  # tells these runs from those with the old R / max code
            extra["repeat_code"] = REPEAT_CODE
        if self.corpus is not None:
            extra.update({"vocab_size": self.corpus.vocab_size, "train_chars": len(self.corpus.train),
                          "heldout_chars": len(self.corpus.valid)})
        with self.run.closing_on_error():
            self.run.begin(self.cfg, self.corpus.source if self.corpus else "generated", overwrite, **extra)
            self.save_checkpoint()

    def resume(self, from_previous: bool = False) -> None:
        """Continue from checkpoint.pt (or checkpoint.prev.pt) exactly where the run stopped."""
        if has_old_repeat_code(self.cfg.task, self.cfg.extra):
            raise ConfigError(f"{self.run_dir} is a Repeat Copy run from before 2026-11-27, which coded the repeat "
                              "count as R / max_repeats; resuming it with the standardised code would change its "
                              "task midway. Start a new run instead.")
        with self.run.closing_on_error():
            ckpt = self.run.resume(self.cfg, from_previous)
            state = ckpt.payload
            self.rule.load_state_dict(state["rule"])
            self.curriculum.load_state_dict(state["curriculum"])
            self.generator.set_state(state["generator"])
            self.step, self.position, self.elapsed = ckpt.step, state["position"], state["elapsed"]
            self.best_bpc, self.last_bpc = state["best_bpc"], state["last_bpc"]
            if "window" in state:  # absent in checkpoints written before it was saved: the window restarts
                self.window = RunningMeans.from_state(state["window"])
                self.window_samples = state["window_samples"]
            torch.set_rng_state(state["torch_rng"])

    def save_checkpoint(self) -> None:
        self.saved_at = self.step
        self.run.save_checkpoint(self.step, {
            "rule": self.rule.state_dict(), "curriculum": self.curriculum.state_dict(),
            "generator": self.generator.get_state(), "position": self.position,
            "elapsed": self.elapsed, "best_bpc": self.best_bpc, "last_bpc": self.last_bpc,
            "window": self.window.state(), "window_samples": self.window_samples,
            "torch_rng": torch.get_rng_state()})

    def _stop_if_asked(self) -> None:
        """Between steps: if SIGINT or SIGTERM came, checkpoint here (unless just done) and raise Interrupted."""
        if self.stop is not None:
            self.stop.check(self.step, self.run_dir, None if self.saved_at == self.step else self.save_checkpoint)

    # -- one step --------------------------------------------------------------------------------
    def _copy_step(self) -> dict:
        assert self.task is not None
        length = self.curriculum.length
        ep = self.task.sample(length, self.cfg.batch_size, self.generator)
        x, target, mask = ep.x.to(self.device), ep.target.to(self.device), ep.mask.to(self.device)
        out = self.rule.episode(x, target, mask)
        err = bit_errors(out["logits"], target, mask)
        self.curriculum.record(err)
        return {"train_loss": out["loss"], "bit_error": err, "length": length, "synth_loss": out["synth_loss"],
                "aux_loss": out["aux_loss"], "samples": self.cfg.batch_size}

    def _charlm_step(self) -> dict:
        t, s = self.cfg.truncation, self.train_streams
        if self.position + t + 1 > s.shape[0]:  # the streams ran out: start them again from zero state
            self.position = 0
            self.rule.reset()
        x, y = s[self.position:self.position + t], s[self.position + 1:self.position + t + 1]
        self.position += t
        out = self.rule.window(x, y)
        per_char = out["loss"] / t  # nats per character
        return {"train_loss": per_char, "train_bpc": per_char / 0.6931471805599453,
                "synth_loss": out["synth_loss"], "aux_loss": out["aux_loss"], "samples": t * s.shape[1]}

    def _eval(self) -> float:
        assert self.corpus is not None
        bpc = evaluate_bpc(self.rule.model, self.corpus.valid.to(self.device), max_chars=self.cfg.eval_chars)
        self.last_bpc = bpc
        if self.best_bpc is None or bpc < self.best_bpc:
            self.best_bpc = bpc
        return bpc

    # -- loop ------------------------------------------------------------------------------------
    def fit(self) -> str:
        """Train to max_steps (or to a stop request), then release the run directory; returns the summary."""
        assert self.metrics is not None, "call start() or resume() first"
        try:
            return self._fit()
        finally:
            self.run.close()

    def _fit(self) -> str:
        cfg, metrics = self.cfg, self.metrics
        assert metrics is not None
        charlm = cfg.task == "charlm"
        t_window = t_last = time.perf_counter()
        self.rule.model.train()
        while self.step < cfg.max_steps:
            if cfg.schedule != "constant":
                self.rule.set_lr_factor(lr_factor(cfg.schedule, self.step, cfg.max_steps))
            stats = self._charlm_step() if charlm else self._copy_step()
            self.step += 1
            now = time.perf_counter()
            self.elapsed += now - t_last
            t_last = now
            self.window_samples += stats.pop("samples")
            self.window.add(stats)
            if self.on_step is not None:
                self.on_step(self.step)
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                means = {k: v for k, v in self.window.means(scalar_keys=None).items() if v is not None}
                record = {"kind": "step", "step": self.step, **means, "wall_time_s": round(self.elapsed, 3),
                          "samples_per_s": round(self.window_samples / max(now - t_window, 1e-9), 1)}
                if not charlm:
                    record["length"] = self.curriculum.length
                    record["max_length_solved"] = self.curriculum.solved
                metrics.write(record)
                if not self.quiet:
                    shown = (f"length {self.curriculum.length} solved {self.curriculum.solved} "
                             f"bit_error {record['bit_error']:.2f}" if not charlm
                             else f"train_bpc {record['train_bpc']:.3f}")
                    print(f"step {self.step}  loss {record['train_loss']:.4f}  {shown}", file=sys.stderr, flush=True)
                self.window, self.window_samples, t_window = RunningMeans(), 0, now
            if charlm and (self.step % cfg.eval_every == 0 or self.step == cfg.max_steps):
                t0 = time.perf_counter()
                bpc = self._eval()
                metrics.write({"kind": "eval", "step": self.step, "bpc": bpc, "wall_time_s": round(self.elapsed, 3),
                               "eval_time_s": round(time.perf_counter() - t0, 3)})
                if not self.quiet:
                    print(f"step {self.step}  held-out bpc {bpc:.4f}", file=sys.stderr, flush=True)
                t_last = time.perf_counter()  # evaluation is not training time
            if self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint()
                t_last = time.perf_counter()
            self._stop_if_asked()
        # The last checkpoint comes before the final record, so resuming a finished run rewrites that record
        # (and final.pt) instead of adding another.
        if self.saved_at != self.step:
            self.save_checkpoint()
        final = {"kind": "final", "step": self.step, "wall_time_s": round(self.elapsed, 3)}
        if charlm:
            if self.last_bpc is None:
                self._eval()
            final.update({"bpc": self.last_bpc, "best_bpc": self.best_bpc})
            summary = f"held-out bpc {self.last_bpc:.4f} (best {self.best_bpc:.4f})"
        else:
            final.update({"max_length_solved": self.curriculum.solved, "length": self.curriculum.length,
                          "bit_error": self.curriculum.recent_error()})
            summary = f"longest length solved {self.curriculum.solved} (now training on {self.curriculum.length})"
        metrics.write(final)
        self.run.save_model(checkpoint.FINAL, self.step, {"model": self.rule.model.state_dict(), **{
            k: v for k, v in final.items() if k != "kind"}})
        return summary
