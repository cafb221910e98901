"""The sequence tasks' configuration (copy, repeat-copy, charlm): fields, per-task defaults, flags and checks."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from synthgrad.config import CommonConfig
from synthgrad.errors import ConfigError, require
from synthgrad.rnn import SEQUENCE_METHODS
from synthgrad.rundir import CONFIG
from synthgrad.seqdefaults import SEQUENCE_DEFAULTS, TRUNCATION, sequence_defaults

TASKS = ("copy", "repeat-copy", "charlm")


@dataclass
class SequenceConfig(CommonConfig):
    """A sequence run's resolved configuration; config.json is this, as JSON (with "task" set).

    The shared fields and their checks are CommonConfig's. None means "the default of this task and method":
    `resolve` fills it from seqdefaults.SEQUENCE_DEFAULTS, the one table of the sequence tasks' defaults."""

    task: str = "copy"
    truncation: int | None = None  # window length T; None: seqdefaults.TRUNCATION
    hidden: int | None = None  # LSTM units (--width)
    embed: int = 32  # charlm: character embedding size
    clip: float | None = None  # global gradient-norm clip of each window's update
    # Through time the model can exploit a young synthesizer: a linear prediction of the future loss is
    # unbounded below, and the carried state can grow along it (measured on charlm, T=8: synthesizer MSE
    # 0.3 -> 3,400 in 1,500 windows, BPC stuck at 3.7). A small scale and a warm-up keep it stable.
    synth_scale: float | None = None  # applied synthetic gradient x this
    synth_warmup: int | None = None  # windows over which the synthetic gradient's scale ramps up from 0
    # Weight of the next window's synthetic gradient in the bootstrapped target; resolved, None means synth_scale
    # (the target is then exactly the gradient the window received), as in configs saved before 2026-11-30.
    # Below 1 it shortens the horizon, as lambda in TD(lambda).
    synth_discount: float | None = None
    aux_weight: float | None = None  # DNI + Aux: weight of the auxiliary task (predicting synthetic gradients); 0: off
    # Learning rates of the LSTM and the synthesizer: constant, or cosine decay to 0 over max_steps (None: the task's).
    schedule: str | None = None
    # copy tasks
    solve_threshold: float = 0.15  # bits per sequence, mean over the last solve_window batches
    solve_window: int = 20
    max_length: int = 1000
    max_repeats: int = 3  # repeat-copy: R uniform in 1..max_repeats
    # charlm
    text: str | None = None
    holdout: float = 0.1
    eval_every: int = 500
    eval_chars: int | None = 50000

    def resolve(self) -> SequenceConfig:
        """Fill every unset (None) field from the task's and method's row of SEQUENCE_DEFAULTS, then validate."""
        if self.task not in TASKS:
            raise ConfigError(f"unknown task {self.task!r}; choose one of: {', '.join(TASKS)}")
        if self.method not in SEQUENCE_METHODS:
            raise ConfigError(f"--task {self.task} trains with --method bptt or dni, not {self.method!r}")
        out = dataclasses.replace(self, extra=dict(self.extra))
        if out.truncation is None:
            out.truncation = TRUNCATION
        for key, value in sequence_defaults(self.task, self.method).items():
            if getattr(out, key) is None:
                setattr(out, key, value)
        if out.method == "dni" and out.synth_discount is None:
            out.synth_discount = out.synth_scale  # the row sets none: the target's weight follows the scale
        out.validate()
        return out

    @classmethod
    def from_saved(cls, d: dict) -> SequenceConfig:
        """The configuration of a saved run (config.json), as it ran: nothing is filled in from today's defaults
        (in runs saved before 2026-11-30, a None synth_discount means the scale)."""
        cfg = cls.from_dict(d)
        if cfg.truncation is None or cfg.synth_scale is None or cfg.synth_warmup is None or cfg.aux_weight is None:
            raise ConfigError("the saved configuration lacks truncation, synth_scale, synth_warmup or aux_weight; "
                              "it was not written by `synthgrad train --task` and cannot be resumed")
        cfg.validate()
        return cfg

    def validate(self) -> None:
        super().validate()
        need = require
        need(self.task in TASKS, f"unknown task {self.task!r}; choose one of: {', '.join(TASKS)}")
        need(self.preset is None, f"--preset {self.preset} holds classifier settings (the paper's sequence-task "
                                  f"settings are not encoded): drop it with --task {self.task}")
        need(self.method in SEQUENCE_METHODS,
             f"--task {self.task} trains with --method bptt or dni, not {self.method!r}")
        need(self.truncation >= 1, f"--truncation must be >= 1, got {self.truncation}")
        need(self.hidden is not None and 1 <= self.hidden <= 65536, f"--width must be in 1..65536, got {self.hidden}")
        need(self.lr is not None, "--lr is missing from the configuration")
        need(None not in (self.synth_lr, self.synth_hidden, self.synth_width),
             "--synth-lr, --synth-hidden and --synth-width must be set for a sequence task")
        need(self.synth_discount is None or 0 <= self.synth_discount <= 100,
             f"--synth-discount must be in [0, 100], got {self.synth_discount}")
        need(self.synth_discount is None or self.method == "dni",
             "--synth-discount weighs DNI's bootstrapped target: use it with --method dni")
        need(self.clip is None or self.clip > 0, f"--clip must be > 0, got {self.clip}")
        need(self.aux_weight >= 0, f"--aux-weight must be >= 0, got {self.aux_weight}")
        need(self.aux_weight == 0 or self.method == "dni",
             "--aux-weight adds the auxiliary task of DNI (predicting synthetic gradients): use it with --method dni")
        need(self.max_steps is not None, "--max-steps is missing from the configuration")
        need(self.solve_threshold > 0, f"--solve-threshold must be > 0, got {self.solve_threshold}")
        need(self.max_length >= 1, f"--max-length must be >= 1, got {self.max_length}")
        need(0 < self.holdout < 1, f"holdout must be in (0, 1), got {self.holdout}")
        for key in ("eval_every", "solve_window", "max_repeats", "embed"):
            need(getattr(self, key) >= 1, f"--{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        need(self.eval_chars is None or self.eval_chars >= 100, f"--eval-chars must be >= 100, got {self.eval_chars}")
        if self.task == "charlm":
            need(self.text is not None, "--task charlm needs --text PATH: any plain-text file to model")
        else:
            need(self.text is None, f"--text applies to --task charlm only, not {self.task}")

    def min_text_chars(self) -> int:
        """charlm: the shortest text whose training part fills batch_size streams of one window and its target."""
        need = self.batch_size * (self.truncation + 1)  # one window of T inputs plus the next character, per stream
        chars = math.ceil(need / (1 - self.holdout))
        while int(chars * (1 - self.holdout)) < need:  # CharCorpus's split rounds down
            chars += 1
        return max(chars, 100)


# -- command line ------------------------------------------------------------------------------

# The flags only sequence tasks read, with their argparse defaults (None: the task's, from SEQUENCE_DEFAULTS).
SEQUENCE_ONLY: dict = {"truncation": None, "text": None, "eval_chars": 50000, "clip": None, "aux_weight": None,
                       "synth_discount": None, "solve_threshold": 0.15, "max_length": 1000}


def per_task(key: str, method: str | None = None) -> str:
    """What SEQUENCE_DEFAULTS gives `key`, task by task, for --help: "copy 1, repeat-copy 1, charlm 5"."""
    values: dict[str, object] = {}
    for (task, m), row in SEQUENCE_DEFAULTS.items():
        if method in (None, m) and key in row:
            values.setdefault(task, row[key])
    return ", ".join(f"{task} {value:g}" if isinstance(value, float) else f"{task} {value}"
                     for task, value in values.items())


def add_arguments(g: argparse._ActionsContainer) -> None:
    """The flags only sequence tasks use; the shared ones (--method, --width, --lr, ...) are cli.py's."""
    g.add_argument("--task", choices=TASKS, default=None,
                   help="train an LSTM on a sequence task instead of a classifier; --method bptt or dni, "
                        "--width sets the LSTM units. Every default of a task and method is the setting of its "
                        "README result (table: synthgrad/seqdefaults.py)")
    g.add_argument("--truncation", type=int, default=SEQUENCE_ONLY["truncation"], metavar="T",
                   help=f"truncated BPTT window length T; default {TRUNCATION}")
    g.add_argument("--text", type=Path, default=SEQUENCE_ONLY["text"], metavar="PATH",
                   help="charlm: the plain-text file to model (its last 10%% is held out)")
    g.add_argument("--eval-chars", type=int, default=SEQUENCE_ONLY["eval_chars"],
                   help="charlm: held-out characters per measurement (the start of the held-out split)")
    g.add_argument("--clip", type=float, default=SEQUENCE_ONLY["clip"],
                   help=f"clip each window's gradient norm to this; default: {per_task('clip')}")
    g.add_argument("--aux-weight", type=float, default=SEQUENCE_ONLY["aux_weight"], metavar="W",
                   help="DNI + Aux: the LSTM also predicts, at every step, the synthetic gradient of its window's "
                        "end; W weighs that MSE in the loss (0: off); default with dni: "
                        f"{per_task('aux_weight', 'dni')}")
    g.add_argument("--synth-discount", type=float, default=SEQUENCE_ONLY["synth_discount"], metavar="LAMBDA",
                   help="DNI: weight of the next window's synthetic gradient in the synthesizer's bootstrapped "
                        "target; below 1 it shortens the predicted horizon, as lambda in TD(lambda); default: "
                        f"{per_task('synth_discount', 'dni')}, else the --synth-scale (the gradient the window "
                        "received)")
    g.add_argument("--solve-threshold", type=float, default=SEQUENCE_ONLY["solve_threshold"],
                   help="copy tasks: a length is solved when the mean bit error per sequence over the last "
                        "20 batches is below this")
    g.add_argument("--max-length", type=int, default=SEQUENCE_ONLY["max_length"],
                   help="copy tasks: the curriculum stops at this length")


def sequence_flags_given(a: argparse.Namespace) -> list[str]:
    """The sequence-only flags that `a` sets away from their defaults, as --flag names (a classifier refuses them)."""
    return [f"--{k.replace('_', '-')}" for k, v in SEQUENCE_ONLY.items() if getattr(a, k, v) != v]


def wants_sequence(a: argparse.Namespace) -> bool:
    """True for `train --task ...`, or `train --resume DIR` of a sequence run."""
    if getattr(a, "task", None) is not None:
        return True
    resume = getattr(a, "resume", None)
    if resume is None:
        return False
    try:
        return "task" in json.loads((Path(resume) / CONFIG).read_text())
    except (OSError, json.JSONDecodeError):
        return False


def config_from_args(a: argparse.Namespace) -> SequenceConfig:
    for flag, value, default in (("--stages", a.stages, None), ("--epochs", a.epochs, None),
                                 ("--target", a.target, "bootstrap"), ("--update-prob", a.update_prob, 1.0),
                                 ("--optimizer", getattr(a, "optimizer", "adam"), "adam"),
                                 ("--lower-lr", getattr(a, "lower_lr", None), None),
                                 ("--synth-rank", getattr(a, "synth_rank", None), None),
                                 ("--synth-every", getattr(a, "synth_every", 1), 1),
                                 ("--synth-center", getattr(a, "synth_center", None), None),
                                 ("--synth-classifier", getattr(a, "synth_classifier", None), None),
                                 ("--synth-local", getattr(a, "synth_local", None), None),
                                 ("--synth-mean-token", getattr(a, "synth_mean_token", None), None),
                                 ("--synth-trust", getattr(a, "synth_trust", False), False),
                                 ("--preset", getattr(a, "preset", None), None)):
        if value != default:
            hint = " (use --max-steps for the length of a sequence run)" if flag == "--epochs" else ""
            raise ConfigError(f"{flag} applies to classification only; drop it with --task{hint}")
    # Flags left unset (None) take the task's and method's defaults in resolve().
    pick = {k: v for k, v in {
        "hidden": a.width, "batch_size": a.batch_size, "lr": a.lr, "synth_lr": a.synth_lr,
        "synth_hidden": a.synth_hidden, "synth_width": a.synth_width, "synth_scale": a.synth_scale,
        "synth_warmup": a.synth_warmup, "eval_every": a.eval_every, "schedule": a.schedule}.items() if v is not None}
    return SequenceConfig(
        task=a.task, method=a.method, truncation=a.truncation, seed=a.seed, device=a.device, threads=a.threads,
        max_steps=20 if a.dry_run else a.max_steps, log_every=a.log_every, checkpoint_every=a.checkpoint_every,
        clip=a.clip, aux_weight=a.aux_weight, synth_discount=a.synth_discount, solve_threshold=a.solve_threshold,
        max_length=a.max_length,
        text=str(a.text) if a.text else None, eval_chars=a.eval_chars, tensorboard=a.tensorboard, **pick,
    ).resolve()
