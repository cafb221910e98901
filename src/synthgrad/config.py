"""TrainConfig: every knob of a run in one place, validated, resolved and saved with the run."""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from typing import Self

import torch

from synthgrad import data, models
from synthgrad.defaults import (
    CDNI_MEAN_TOKEN,
    CDNI_SYNTH_LR,
    DNI_SYNTH_LR,
    PIPELINE_CDNI_CLASSIFIER,
    PIPELINE_CDNI_LOCAL_LOSS,
    PIPELINE_CDNI_RANK,
    PIPELINE_STAGE_LR,
)
from synthgrad.errors import ConfigError, require
from synthgrad.interfaces import CDNI_CENTER, CDNI_CLASSIFIER, CDNI_LOCAL_LOSS, OPTIMIZERS
from synthgrad.presets import preset_values
from synthgrad.rules import TARGETS, UNLOCKS
from synthgrad.schedules import lr_factor

SCHEDULES = ("constant", "cosine")

# Defaults tuned for results in minutes rather than the paper's 500k steps at lr 3e-5
# (see benchmarks/results/ for what they reach). None in TrainConfig means "take these".
METHOD_DEFAULTS = {
    "backprop": {},
    # Adam normalises the step size, so a small, noisy synthetic gradient still moves a stage at the full
    # learning rate: DNI (no label, so a noisier gradient) trains better with a lower stage lr.
    "dni": {"lr": 3e-4, "synth_lr": DNI_SYNTH_LR, "synth_hidden": 2},  # two hidden layers of 1024, as in the paper
    # A linear synthesizer, as in the paper, trained 10x faster than the paper's rate so that it keeps up with
    # the stage below, and the synthetic gradient centred over the batch: robust on the zoo of user-like models
    # and as good or better on the paper's (issue 17; benchmarks/results/zoo-notes.md, reproduction.md).
    "cdni": {"synth_lr": CDNI_SYNTH_LR, "synth_hidden": 0, "synth_center": CDNI_CENTER,
             "synth_classifier": CDNI_CLASSIFIER,  # and a local classifier's gradient term (interfaces.py)
             "synth_local": CDNI_LOCAL_LOSS,  # and a local loss's gradient mixed in (localloss.py)
             "synth_mean_token": CDNI_MEAN_TOKEN},  # and token synthesizers mix the positions (synthesizers.py)
}
# The classifier's methods: the rules of synthgrad.rules, and two decoupling baselines: delayed true gradients
# (ddg, pipeline only) and decoupled greedy learning with auxiliary classifiers (dgl; synth_lr is theirs).
METHODS = ("backprop", "dni", "cdni", "ddg", "dgl")
METHOD_DEFAULTS["ddg"] = {}
METHOD_DEFAULTS["dgl"] = {"synth_lr": 1e-3}
# What --stages changes: the pipeline's cDNI synthesizers are low-rank and its stages slower (defaults.PIPELINE_*,
# sg.Pipeline's too).
# --synth-rank 0 asks for the full linear synthesizer.
PIPELINE_DEFAULTS = {"cdni": {"synth_rank": PIPELINE_CDNI_RANK, "lr": PIPELINE_STAGE_LR, "synth_lr": CDNI_SYNTH_LR,
                              "synth_center": CDNI_CENTER,  # (these two also for models whose own differ)
                              "synth_classifier": PIPELINE_CDNI_CLASSIFIER, "synth_local": PIPELINE_CDNI_LOCAL_LOSS}}
# A resumed run keeps what it was started with: a field its config.json lacks (written before the field
# existed) takes the value every run had then, not today's default.
# Before 2026-11-30 no stage centred its synthetic gradient; before 2026-12-01 no synthesizer had a classifier term;
# before 2026-12-01 (seventh session) no stage mixed in a local loss; before the eighth session no token
# synthesizer had the mean-token term. Those options are also what every method but cDNI has off.
SYNTH_OPTIONS_OFF = {"synth_center": False, "synth_classifier": False, "synth_local": False,
                     "synth_mean_token": False}
ABSENT_IN_OLD_CONFIGS = SYNTH_OPTIONS_OFF
SGD_LR = 0.01  # the stage learning rate with --optimizer sgd (Nesterov momentum 0.9), for every method


class JSONConfig:
    """to_dict / from_dict for a config dataclass, as saved in a run's config.json."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict) -> Self:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"config has unknown keys {sorted(unknown)}; was it written by a newer synthgrad?")
        return cls(**d)


@dataclass
class CommonConfig(JSONConfig):
    """The fields and checks every run shares, classifier or sequence task; subclasses set their own defaults."""

    method: str = "dni"
    batch_size: int | None = None
    lr: float | None = None
    synth_lr: float | None = None
    synth_hidden: int | None = None
    synth_width: int | None = None  # classifier default: 1024 for vectors, 64 channels for feature maps
    synth_scale: float = 1.0
    synth_warmup: int = 0
    schedule: str | None = None  # learning-rate schedule: cosine decay to 0 over the run, or constant; None: default
    preset: str | None = None  # a named set of settings (presets.py) that filled what was left unset
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None  # torch intra-op threads; None: torch's default
    max_steps: int | None = None  # stop after this many steps (smoke tests, --dry-run)
    log_every: int = 50
    checkpoint_every: int = 500
    eval_every: int = 0  # steps between mid-run evaluations (classifier: 0, at epoch ends only)
    tensorboard: bool = False  # mirror metrics.jsonl as TensorBoard scalars into RUN_DIR/tensorboard/
    extra: dict = field(default_factory=dict)  # versions etc., filled in when the run starts

    def validate(self) -> None:
        """Refuse values of the shared fields that cannot work, before any work starts."""
        need = require
        need(self.batch_size is not None and self.batch_size >= 2,
             f"--batch-size must be >= 2 (BatchNorm needs two examples), got {self.batch_size}")
        for key in ("lr", "synth_lr", "lower_lr"):
            v = getattr(self, key, None)
            need(v is None or 0 < v <= 10, f"--{key.replace('_', '-')} must be in (0, 10], got {v}")
        need(self.synth_hidden is None or 0 <= self.synth_hidden <= 16,
             f"--synth-hidden must be in 0..16, got {self.synth_hidden}")
        need(self.synth_width is None or 1 <= self.synth_width <= 65536,
             f"--synth-width must be in 1..65536, got {self.synth_width}")
        need(0 < self.synth_scale <= 100, f"--synth-scale must be in (0, 100], got {self.synth_scale}")
        need(self.synth_warmup >= 0, f"--synth-warmup must be >= 0, got {self.synth_warmup}")

        need(self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        need(self.seed >= 0, f"--seed must be >= 0, got {self.seed}")
        need(self.threads is None or 1 <= self.threads <= 1024, f"--threads must be >= 1, got {self.threads}")
        need(self.max_steps is None or self.max_steps >= 1, f"--max-steps must be >= 1, got {self.max_steps}")
        for key in ("log_every", "checkpoint_every"):
            need(getattr(self, key) >= 1, f"--{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        need(self.eval_every >= 0, f"--eval-every must be >= 1, got {self.eval_every}")
        need(self.device == "cpu" or self.device.startswith("cuda"),
             f"--device must be cpu or cuda[:N], got {self.device!r}")
        if self.device.startswith("cuda"):
            need(torch.cuda.is_available(), "--device cuda asked for, but no CUDA GPU is visible; use --device cpu")
        need(not self.tensorboard or importlib.util.find_spec("tensorboard") is not None,
             "--tensorboard needs the tensorboard package: pip install 'synthgrad[tensorboard]'")

    def lr_factor(self, step: int, total: int) -> float:
        """The schedule's multiplier of every learning rate at `step` (0-based) of `total`."""
        return lr_factor(self.schedule, step, total)


@dataclass
class TrainConfig(CommonConfig):
    """A classifier run's resolved configuration; `config.json` in the run directory is this, as JSON."""

    model: str = "mlp"
    dataset: str = "mnist"
    target: str = "bootstrap"
    epochs: int | None = None
    width: int | None = None  # hidden width (FCN/MLP) or base channels (CNN)
    optimizer: str = "adam"  # the stages' optimizer: adam or sgd (synthesizers always use Adam)
    lower_lr: float | None = None  # the stages below an interface's rate (same optimizer); None: lr
    synth_rank: int | None = None  # low-rank linear synthesizers of this rank (vector activations), label embedded
    synth_every: int = 1  # each synthesizer regresses onto every this-many-th target
    synth_center: bool | None = None  # stages apply the synthetic gradient minus its batch mean; None: default
    synth_classifier: bool | None = None  # synthesizers carry a local classifier's gradient term; None: default
    synth_local: bool | None = None  # stages mix a local loss's gradient into their synthetic one; None: default
    synth_mean_token: bool | None = None  # token synthesizers add a map of the mean token; None: default
    synth_trust: bool = False  # each stage moves at its rate times its interface's trust factor (interfaces.py)
    update_prob: float = 1.0
    unlock: str = "update"  # update: synthetic gradients; complete: also synthetic inputs (forward interfaces)
    input_hidden: int = 1  # hidden layers of each input synthesizer (complete unlock)
    input_width: int = 1024
    stages: int | None = None  # None: one stage per layer, single process; K: pipeline of K processes
    diagnose_every: int = 200  # cosine/relative error vs the true gradient (DNI, cDNI)
    eval_batch_size: int = 1000
    data_dir: str | None = None
    cache_dir: str | None = None
    verify_md5: bool = True
    # Taken from the data when the run starts (`with_data`), so that the model can be rebuilt from config.json.
    input_shape: list[int] | None = None  # one example's [C, H, W]
    num_classes: int | None = None

    def resolve(self) -> TrainConfig:
        """Fill None fields from the preset (if any), the pipeline's, the model's and the method's defaults, then
        the model's own, and validate."""
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        spec = models.get_spec(self.model)
        out = dataclasses.replace(self, extra=dict(self.extra))
        # Sources of defaults, the first that has a field wins; a field given explicitly is never touched.
        layers = [
            preset_values(out.preset, out.method, out.model) if out.preset is not None else {},
            {"schedule": "cosine"},
            {"lr": SGD_LR} if out.optimizer == "sgd" else {},
            PIPELINE_DEFAULTS.get(self.method, {}) if out.stages is not None else {},  # the pipeline's own
            spec.method_defaults.get(self.method, {}),  # where this model differs
            METHOD_DEFAULTS[self.method],
            SYNTH_OPTIONS_OFF,
            {key: spec.defaults[key] for key in ("epochs", "batch_size", "lr", "width")},
        ]
        for layer in layers:
            for key, value in layer.items():
                if getattr(out, key) is None:
                    setattr(out, key, value)
        out.validate()
        return out

    def validate(self) -> None:
        """Refuse values and combinations that cannot work, before any work starts."""
        super().validate()
        need = require
        need(self.dataset in data.DATASET_NAMES or data.is_npz(self.dataset),
             f"unknown dataset {self.dataset!r}; choose one of: {', '.join(data.DATASET_NAMES)}, or an .npz file")
        need(not (data.is_npz(self.dataset) and self.data_dir),
             "--data-dir applies to mnist, fashion-mnist and cifar10; an .npz dataset is the file itself: drop it")
        need(self.synth_rank is None or 0 <= self.synth_rank <= 65536,
             f"--synth-rank must be in 0..65536 (0: full linear), got {self.synth_rank}")
        need(self.synth_every >= 1, f"--synth-every must be >= 1, got {self.synth_every}")
        need(self.target in TARGETS, f"unknown target {self.target!r}; choose one of: {', '.join(TARGETS)}")
        need(self.epochs is not None and self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        need(self.batch_size is not None and self.batch_size <= 60000,
             f"--batch-size must be between 2 (BatchNorm needs two examples) and 60000, got {self.batch_size}")
        need(self.optimizer in OPTIMIZERS,
             f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        need(self.width is None or 1 <= self.width <= 65536, f"--width must be in 1..65536, got {self.width}")
        need(0 <= self.update_prob <= 1, f"--update-prob must be in [0, 1], got {self.update_prob}")
        for key in ("diagnose_every", "eval_batch_size"):
            need(getattr(self, key) >= 1, f"--{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        need(self.unlock in UNLOCKS, f"--unlock must be one of {', '.join(UNLOCKS)}, got {self.unlock!r}")
        need(0 <= self.input_hidden <= 16, f"--input-hidden must be in 0..16, got {self.input_hidden}")
        need(1 <= self.input_width <= 65536, f"--input-width must be in 1..65536, got {self.input_width}")
        need(not (self.synth_local and self.method != "cdni"),
             f"--synth-local needs the label at every stage: use --method cdni, or drop it for {self.method}")
        if self.method in ("backprop", "ddg", "dgl"):
            need(self.target == "bootstrap", f"--target applies to dni and cdni only; drop it for {self.method}")
            need(self.unlock == "update", "--unlock complete needs synthetic gradients: use --method dni or cdni")
        if self.method in ("ddg", "dgl"):
            need(self.update_prob == 1, f"--update-prob applies to backprop, dni and cdni, not {self.method}")
        need(self.method != "ddg" or self.stages is not None,
             "--method ddg delays the true gradients between the processes of a pipeline: add --stages K")
        # Any valid shape counts the layers; the data's own is checked once it is loaded (`with_data`).
        shape = tuple(self.input_shape) if self.input_shape else data.INPUT_SHAPES.get(self.dataset, (1, 28, 28))
        n_layers = len(models.build_layers(self.model, shape, self.num_classes or 10, self.width))
        if self.stages is not None:
            need(2 <= self.stages <= n_layers,
                 f"--stages {self.stages}: {self.model} has {n_layers} layers, so use 2..{n_layers} stages")
            need(self.target == "bootstrap",
                 "--target backprop needs a full backward pass, which the pipeline engine exists to avoid; "
                 "use --target bootstrap with --stages")
        elif self.method != "backprop":
            need(n_layers >= 2, f"{self.model} has a single layer: nothing to decouple")

    def with_data(self, input_shape: tuple[int, ...], num_classes: int, num_train: int) -> TrainConfig:
        """This config bound to its data: the input shape and class count saved in config.json, checked
        against the model (and, on resume, against the shape the run was trained on)."""
        shape = [int(d) for d in input_shape]
        if self.input_shape is not None and (list(self.input_shape) != shape or self.num_classes != num_classes):
            raise ConfigError(f"this run was trained on inputs {list(self.input_shape)} with {self.num_classes} "
                              f"classes, but {self.dataset} now gives {shape} with {num_classes}: resume it with "
                              "the data it was trained on")
        models.check_input(self.model, tuple(shape), num_classes, self.width)
        require(self.batch_size is not None and self.batch_size <= num_train,
                f"--batch-size {self.batch_size} is larger than the {num_train} training examples; "
                f"use at most {num_train}")
        return dataclasses.replace(self, input_shape=shape, num_classes=num_classes, extra=dict(self.extra))

    def total_steps(self, num_train: int) -> int:
        """Steps in the whole run: epochs x batches per epoch, capped by max_steps."""
        steps = self.epochs * (num_train // self.batch_size)
        return min(steps, self.max_steps) if self.max_steps else steps
