"""The `synthgrad` command: train, plot, data and models."""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
import warnings
from pathlib import Path

from synthgrad import __version__, cache, data, models, seqconfig
from synthgrad.checkpoint import LATEST as CHECKPOINT
from synthgrad.config import ABSENT_IN_OLD_CONFIGS, METHOD_DEFAULTS, METHODS, PIPELINE_DEFAULTS, SCHEDULES, TrainConfig
from synthgrad.errors import ConfigError, DivergenceError, Interrupted, SynthgradError
from synthgrad.interfaces import OPTIMIZERS
from synthgrad.presets import describe as describe_preset
from synthgrad.presets import preset_names
from synthgrad.rules import TARGETS, UNLOCKS
from synthgrad.stopping import StopRequests


def _int(lo: int, hi: int | None = None):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v} is out of range: allowed {lo}..{hi if hi is not None else 'inf'}")
        return v
    return parse


def _float(lo: float, hi: float, lo_open: bool = False):
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        if not (lo < v if lo_open else lo <= v) or not v <= hi or v != v:
            raise argparse.ArgumentTypeError(
                f"{s} is out of range: allowed {'(' if lo_open else '['}{lo}, {hi}]")
        return v
    return parse


def _model(s: str) -> str:
    try:
        models.get_spec(s)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return s


def _dataset(s: str) -> str:
    if s in data.DATASET_NAMES or data.is_npz(s):
        return s
    raise argparse.ArgumentTypeError(f"unknown dataset {s!r}: choose one of {', '.join(data.DATASET_NAMES)}, "
                                     "or give the path of an .npz file")


def _device(s: str) -> str:
    if s == "cpu" or s == "cuda" or (s.startswith("cuda:") and s[5:].isdigit()):
        return s
    raise argparse.ArgumentTypeError(f"{s!r} is not a device: use cpu, cuda or cuda:N")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(prog="synthgrad", formatter_class=fmt,
                                description="Train neural networks with Decoupled Neural Interfaces "
                                            "(synthetic gradients).")
    p.add_argument("--version", action="version", version=f"synthgrad {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,plot,data,models}")

    t = sub.add_parser("train", formatter_class=fmt, help="train a model; writes a run directory",
                       description="Train a registered model. Model-dependent defaults (epochs, "
                                   "batch size, lr, width) are listed by `synthgrad models`.")
    g = t.add_argument_group("what to train")
    g.add_argument("--model", type=_model, default="mlp", help=", ".join(models.model_names()))
    g.add_argument("--dataset", type=_dataset, default="mnist",
                   help=f"{', '.join(data.DATASET_NAMES)}, or PATH.npz: your own images and labels "
                        "(layout in the README)")
    g.add_argument("--method", choices=(*METHODS, "bptt"), default="dni",
                   help="backprop; dni (synthetic gradients); cdni (conditioned on the label); baselines: ddg "
                        "(delayed true gradients, with --stages) and dgl (local auxiliary classifiers); bptt "
                        "(truncated BPTT, with --task only)")
    g.add_argument("--target", choices=TARGETS, default="bootstrap",
                   help="what synthesizers regress onto: bootstrap (paper) or backprop (true gradient "
                        "of a full backward pass, the original reimplementation's simulation)")
    g.add_argument("--width", type=_int(1, 65536), default=None,
                   help="hidden width (mlp/fcn) or base channels (cnn); default: the model's")
    g.add_argument("--stages", type=_int(2, 64), default=None,
                   help="run the pipeline engine: cut the model into K stages, one process each")
    g.add_argument("--preset", choices=preset_names(), default=None,
                   help="fill every setting not given on the command line from a named set instead of our defaults "
                        "(classifiers; recorded in config.json). "
                        + "; ".join(describe_preset(n).replace("%", "%%") for n in preset_names()))
    o = t.add_argument_group("optimisation")
    o.add_argument("--epochs", type=_int(1, 100000), default=None, help="default: the model's")
    o.add_argument("--batch-size", type=_int(2, 60000), default=None, help="default: the model's")
    o.add_argument("--optimizer", choices=tuple(OPTIMIZERS), default="adam",
                   help="the stages' optimizer: adam, or sgd with Nesterov momentum 0.9 (synthesizers use Adam)")
    o.add_argument("--lr", type=_float(0, 10, lo_open=True), default=None,
                   help="learning rate of the stages; default: 0.01 with sgd; with adam 3e-4 for dni, "
                        "else the model's; with --task 3e-3")
    o.add_argument("--lower-lr", type=_float(0, 10, lo_open=True), default=None,
                   help="learning rate of every stage but the last (under dni and cdni the stages that follow "
                        "synthetic gradients), with the same optimizer; default: --lr")
    o.add_argument("--schedule", choices=SCHEDULES, default=None,
                   help="learning-rate schedule of stages and synthesizers: cosine decay to 0 over the run, or "
                        "constant (default: cosine; with --task: constant for the copy tasks, whose curriculum "
                        "has no fixed end, cosine for charlm)")
    o.add_argument("--update-prob", type=_float(0, 1), default=1.0,
                   help="each stage's backward pass and update happen with this probability per step")
    o.add_argument("--seed", type=_int(0, 2**31 - 1), default=0)
    s = t.add_argument_group("synthesizers (dni, cdni)")
    s.add_argument("--synth-lr", type=_float(0, 10, lo_open=True), default=None,
                   help=f"Adam learning rate of the synthesizers; default {METHOD_DEFAULTS['dni']['synth_lr']} "
                        f"for dni, {METHOD_DEFAULTS['cdni']['synth_lr']} for cdni")
    s.add_argument("--synth-hidden", type=_int(0, 16), default=None,
                   help="hidden layers per synthesizer; default 2 for dni, 0 (linear) for cdni")
    s.add_argument("--synth-width", type=_int(1, 65536), default=None,
                   help="synthesizer hidden width; default 1024 (vectors) or 64 channels (feature maps)")
    s.add_argument("--synth-rank", type=_int(0, 65536), default=None,
                   help="low-rank linear synthesizers of this rank (vector activations), the label embedded for "
                        "cdni; default 64 for cdni with --stages (0: full linear), none otherwise")
    s.add_argument("--synth-every", type=_int(1), default=1,
                   help="each synthesizer regresses onto every this-many-th target only")
    s.add_argument("--synth-center", action=argparse.BooleanOptionalAction, default=None,
                   help="the stages apply the synthetic gradient minus its mean over the batch, which a "
                        "synthesizer learns first and a true gradient barely has; default on for cdni, off for "
                        "dni")
    s.add_argument("--synth-classifier", action=argparse.BooleanOptionalAction, default=None,
                   help="each synthesizer also carries a local classifier's input gradient, U (softmax(V h) - y), "
                        "learned like the rest of it; default on for cdni in one process, off for dni and "
                        "--stages")
    s.add_argument("--synth-local", action=argparse.BooleanOptionalAction, default=None,
                   help="each stage below an interface mixes in the gradient of a local loss (an auxiliary "
                        "classifier on its output), a c + b l with (a, b) the least-squares fit of its targets; "
                        "default on for cdni in one process, off for dni and --stages")
    s.add_argument("--synth-mean-token", action=argparse.BooleanOptionalAction, default=None,
                   help="token synthesizers ([N, D] activations) also add a linear map of the mean token to every "
                        "position, a term that mixes positions as attention does; default on for cdni, off for dni")
    s.add_argument("--synth-trust", action="store_true",
                   help="each stage below an interface moves at its learning rate times the interface's trust "
                        "factor, the least-squares scale from its predictions to their targets, in [0, 1]: it holds "
                        "activations that run away (the health warning says when) and slows a short run")
    s.add_argument("--synth-scale", type=_float(0, 100, lo_open=True), default=None,
                   help="multiply the synthetic gradient the stage applies; default 1 (through time, --task: 0.1, "
                        "charlm dni 0.3)")
    s.add_argument("--synth-warmup", type=_int(0), default=None,
                   help="ramp the synthetic gradient's scale from 0 over this many steps; default 0 (500 "
                        "windows through time, --task)")
    s.add_argument("--unlock", choices=UNLOCKS, default="update",
                   help="update: synthetic gradients remove the update lock; complete: synthetic inputs "
                        "predicted from the network input also remove the forward lock")
    s.add_argument("--input-hidden", type=_int(0, 16), default=1, help="hidden layers of input synthesizers")
    s.add_argument("--input-width", type=_int(1, 65536), default=1024, help="width of input synthesizers")
    r = t.add_argument_group("run")
    r.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N")
    r.add_argument("--threads", type=_int(1, 1024), default=None,
                   help="torch intra-op threads per process; default: torch's choice")
    r.add_argument("--run-dir", type=Path, default=None, help="default: runs/<time>-<model>-<method>-s<seed>")
    r.add_argument("--overwrite", action="store_true", help="replace an existing run in --run-dir")
    r.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last checkpoint (its saved config is used)")
    r.add_argument("--from-previous", action="store_true",
                   help="with --resume: continue from the checkpoint before the last (checkpoint.prev.pt), when "
                        "the last is damaged; the damaged one is kept as checkpoint.damaged.pt")
    r.add_argument("--max-steps", type=_int(1), default=None,
                   help="stop after this many steps; with --task, the run's length (default: "
                        f"{seqconfig.per_task('max_steps')})")
    r.add_argument("--dry-run", action="store_true", help="a 20-step smoke run (sets --max-steps 20)")
    r.add_argument("--log-every", type=_int(1), default=50, help="steps between metric records")
    r.add_argument("--diagnose-every", type=_int(1), default=200,
                   help="steps between measurements of the synthetic gradient against the true one")
    r.add_argument("--checkpoint-every", type=_int(1), default=500, help="steps between checkpoints")
    r.add_argument("--eval-every", type=_int(1), default=None, metavar="N",
                   help="steps between test evaluations: classifiers also measure test accuracy every N steps "
                        "(records of kind 'eval'; default: at epoch ends only); charlm measures held-out BPC "
                        "(default 500)")
    r.add_argument("--no-plots", action="store_true", help="do not write the PNG plots at the end")
    r.add_argument("--tensorboard", action="store_true",
                   help="also write every metric as TensorBoard scalars into RUN_DIR/tensorboard/ (needs "
                        "pip install 'synthgrad[tensorboard]'); with --resume, turns it on for that run")
    r.add_argument("--quiet", action="store_true", help="no progress output, only the final line")
    d = t.add_argument_group("data")
    _data_args(d)
    seqconfig.add_arguments(t.add_argument_group("sequence tasks (LSTM, truncated BPTT or DNI through time)"))

    pl = sub.add_parser("plot", formatter_class=fmt, help="plot one or more runs")
    pl.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    pl.add_argument("--out", type=Path, default=None,
                    help="output folder; default: the run directory for one run, ./plots for several")

    da = sub.add_parser("data", formatter_class=fmt, help="fetch or inspect datasets")
    da.add_argument("action", choices=["fetch", "info"])
    da.add_argument("--dataset", type=lambda s: s if s == "all" else _dataset(s), default="all",
                    help=f"{', '.join(data.DATASET_NAMES)}, PATH.npz, or all")
    _data_args(da)

    sub.add_parser("models", formatter_class=fmt, help="list the models and their defaults")
    return p


def _data_args(g: argparse._ActionsContainer) -> None:
    g.add_argument("--data-dir", type=Path, default=None,
                   help="your copy, tried first and never fetched again: the folder holding the four IDX files "
                        "(raw or .gz) for mnist and fashion-mnist; cifar-10-python.tar.gz, its folder or the "
                        "extracted cifar-10-batches-py/ for cifar10")
    g.add_argument("--cache-dir", type=Path, default=None,
                   help=f"data cache; default ${cache.CACHE_ENV} or ~/.cache/synthgrad")
    g.add_argument("--no-verify-md5", action="store_true",
                   help="accept files whose MD5 differs from the published one (CIFAR-10 batches are still read "
                        "with a restricted unpickler)")


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    if given := seqconfig.sequence_flags_given(a):
        raise ConfigError(f"{', '.join(given)} apply to sequence tasks only; add --task copy|repeat-copy|charlm, "
                          "or drop them to train a classifier")
    return TrainConfig(
        model=a.model, dataset=data.dataset_id(a.dataset), method=a.method, target=a.target, epochs=a.epochs,
        batch_size=a.batch_size, optimizer=a.optimizer, lr=a.lr, lower_lr=a.lower_lr, width=a.width,
        synth_lr=a.synth_lr, synth_hidden=a.synth_hidden, synth_width=a.synth_width,
        synth_scale=1.0 if a.synth_scale is None else a.synth_scale, synth_rank=a.synth_rank,
        synth_every=a.synth_every, synth_center=a.synth_center, synth_classifier=a.synth_classifier,
        synth_trust=a.synth_trust, synth_local=a.synth_local, synth_mean_token=a.synth_mean_token,
        synth_warmup=0 if a.synth_warmup is None else a.synth_warmup, schedule=a.schedule, preset=a.preset,
        unlock=a.unlock,
        input_hidden=a.input_hidden,
        input_width=a.input_width, update_prob=a.update_prob, seed=a.seed, device=a.device,
        threads=a.threads, stages=a.stages, max_steps=20 if a.dry_run else a.max_steps,
        log_every=a.log_every, diagnose_every=a.diagnose_every, checkpoint_every=a.checkpoint_every,
        eval_every=a.eval_every or 0, data_dir=str(a.data_dir) if a.data_dir else None,
        cache_dir=str(a.cache_dir) if a.cache_dir else None, verify_md5=not a.no_verify_md5,
        tensorboard=a.tensorboard,
    ).resolve()


def cmd_train(a: argparse.Namespace) -> int:
    """`synthgrad train`: SIGINT and SIGTERM stop the run at the next step, after its checkpoint (exit 130, 143)."""
    if a.from_previous and a.resume is None:
        raise ConfigError("--from-previous goes with --resume RUN_DIR")
    # Until the loop runs there is nothing to save: a signal stops the start at once.
    with StopRequests(immediate=True) as stop:
        try:
            return _train(a, stop)
        except Interrupted as e:
            if "--resume" in str(e):  # stopped at a safe point: the message names the checkpoint
                raise
            run_dir = stop.run_dir
            where = (f"continue from its last checkpoint with `synthgrad train --resume {run_dir}`"
                     if run_dir is not None and (run_dir / CHECKPOINT).is_file() else "no checkpoint was written")
            raise Interrupted(f"{e}; {where}", stop.signum or signal.SIGINT) from None


def _train(a: argparse.Namespace, stop: StopRequests) -> int:
    import torch

    from synthgrad import seqtrain
    from synthgrad.rundir import RunDir
    from synthgrad.trainer import KIND, Progress, Trainer, new_run_dir

    if a.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install 'synthgrad[tensorboard]'")
    if seqconfig.wants_sequence(a):
        return seqtrain.cmd_train_sequence(a, stop)

    if a.resume is not None:
        cfg = config_to_resume(a.resume)
        if a.tensorboard and not cfg.tensorboard:
            cfg.tensorboard = True
        run_dir = a.resume
    else:
        cfg = config_from_args(a)
        run_dir = a.run_dir or new_run_dir(cfg)
    stop.run_dir = run_dir
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dataset = data.load(cfg.dataset, cfg.data_dir, cfg.cache_dir, check_md5=cfg.verify_md5)
    cfg = cfg.with_data(dataset.input_shape, dataset.num_classes, len(dataset.train_y))
    if cfg.stages is not None:
        from synthgrad.pipeline import run_pipeline

        # The launcher has no safe point of its own: a signal stops the stages at once, and the run
        # continues from their last checkpoint.

        # The launcher claims the directory and holds it while the stage processes write there.
        with RunDir(run_dir, "pipeline") as claim:
            if a.resume is None:
                claim.create(a.overwrite)
            else:
                claim.reopen()
                if a.from_previous:
                    claim.use_previous()  # the pipeline then reads checkpoint.pt as usual
            result = run_pipeline(cfg, dataset, claim, resume=a.resume is not None, quiet=a.quiet)
    else:
        trainer = Trainer(cfg, dataset, RunDir(run_dir, KIND), progress=Progress(enabled=not a.quiet), stop=stop)
        if a.resume is not None:
            trainer.resume(from_previous=a.from_previous)
        else:
            trainer.start(overwrite=a.overwrite)
        stop.immediate = False  # from here on, a signal stops the loop after a step, with a checkpoint
        if not a.quiet:
            print(f"training {cfg.model} on {cfg.dataset} with {cfg.method} "
                  f"({dataset.source}); run directory {run_dir}", file=sys.stderr, flush=True)
        result = trainer.fit()
    if not a.no_plots:
        from synthgrad.plots import plot_runs

        plot_runs([run_dir], run_dir)
    print(f"final test accuracy {result.final_accuracy:.4f} (best {result.best_accuracy:.4f}) "
          f"after {result.steps} steps, {result.wall_time_s:.1f}s; run directory {run_dir}", flush=True)
    return 0


def cmd_plot(a: argparse.Namespace) -> int:
    from synthgrad.plots import plot_runs

    for d in a.run_dirs:
        if not d.is_dir():
            raise ConfigError(f"{d} is not a directory; give run directories written by `synthgrad train`")
    out = a.out or (a.run_dirs[0] if len(a.run_dirs) == 1 else Path("plots"))
    from synthgrad.seqplots import is_sequence_run, plot_sequence_runs

    plot = plot_sequence_runs if all(is_sequence_run(d) for d in a.run_dirs) else plot_runs
    for p in plot(a.run_dirs, out):
        print(p)
    return 0


def cmd_data(a: argparse.Namespace) -> int:
    names = list(data.DATASET_NAMES) if a.dataset == "all" else [a.dataset]
    cache_dir = a.cache_dir or cache.default_cache_dir()
    status = 0
    for name in names:
        if a.action == "fetch":
            ds = data.load(name, a.data_dir, a.cache_dir, check_md5=not a.no_verify_md5)
            where = "" if data.is_npz(name) or ds.source.startswith(("directory", "archive")) else \
                f"; cached in {Path(cache_dir) / name}"
            print(f"{name}: verified, from {ds.source}{where}")
        else:
            try:
                ds = data.load(name, a.data_dir, a.cache_dir, check_md5=not a.no_verify_md5, allow_download=False)
                print(f"{name}: {len(ds.train_y)} train / {len(ds.test_y)} test, "
                      f"{ds.num_classes} classes, images {list(ds.input_shape)}, from {ds.source}")
            except SynthgradError as e:
                reason = " ".join(str(e).split())  # the whole reason, on one line
                fix = "" if data.is_npz(name) else f"; `synthgrad data fetch --dataset {name}` downloads it"
                print(f"{name}: not available offline: {reason}{fix}")
                status = 1
    return status


def config_to_resume(run_dir: Path) -> TrainConfig:
    """The configuration a stopped run resumes with: its config.json, where fields it lacks (it was written
    before they existed) take the value they had then, not today's default."""
    from synthgrad.rundir import RunDir

    try:
        return TrainConfig.from_dict({**ABSENT_IN_OLD_CONFIGS, **RunDir.read_config(run_dir)}).resolve()
    except TypeError as e:
        raise ConfigError(f"{run_dir / 'config.json'} is unreadable ({e}); the run cannot be resumed") from e


def cmd_models(_: argparse.Namespace) -> int:
    print(f"{'model':12s} {'epochs':>6s} {'batch':>6s} {'lr':>8s} {'width':>6s}  description")
    for shown in models.model_names():
        spec = models.get_spec("fcn-3" if shown == "fcn-N" else shown)
        d = spec.defaults
        print(f"{shown:12s} {d['epochs']:6d} {d['batch_size']:6d} {d['lr']:8.0e} {d['width']:6d}  "
              f"{spec.description}")
    print("\nmethod defaults: " + "; ".join(f"{m}: {v or 'none'}" for m, v in METHOD_DEFAULTS.items()))
    print("with --stages: " + "; ".join(f"{m}: {v}" for m, v in PIPELINE_DEFAULTS.items()))
    own = [f"{name} {m}: {v}" for name in models.model_names() if name != "fcn-N"
           for m, v in models.get_spec(name).method_defaults.items()]
    print("where a model's own differ (before the method's): " + ("; ".join(own) or "none"))
    print("\npresets (--preset NAME fills what the command line leaves unset):")
    for name in preset_names():
        print(f"  {describe_preset(name)}")
    from synthgrad.seqdefaults import SEQUENCE_DEFAULTS, TRUNCATION

    print(f"\nsequence tasks (--task; --truncation default {TRUNCATION}):")
    for (task, method), row in SEQUENCE_DEFAULTS.items():
        shown = {k: v for k, v in row.items() if method == "dni" or not k.startswith(("synth_", "aux_"))}
        print(f"  {task:11s} {method:4s}  " + ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                                                       for k, v in shown.items()))
    return 0


def _divergence(e: DivergenceError) -> str:
    """The library's divergence message, in the command line's words (its flags)."""
    if not e.what:
        return str(e)
    return (f"non-finite {e.what} at stage {e.stage + 1}, step {e.step}; the run diverged. Try a lower --lr or "
            "--synth-lr, a --synth-scale below 1 or --synth-warmup N; the last good checkpoint is kept, but resuming "
            "with the same settings would diverge again at the same step")


def _show_warning(message: Warning | str, category: type[Warning], *_: object, **__: object) -> None:
    """Warnings (a run's health, say) as one line each."""
    print(f"synthgrad: warning: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"train": cmd_train, "plot": cmd_plot, "data": cmd_data, "models": cmd_models}[args.command]
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning  # restored when the block ends
            return handler(args)
    except DivergenceError as e:
        print(f"synthgrad: error: {_divergence(e)}", file=sys.stderr)
        return e.exit_code
    except Interrupted as e:  # not an error: the run stopped where it was asked to
        print(f"synthgrad: {e}", file=sys.stderr)
        return e.exit_code
    except SynthgradError as e:
        print(f"synthgrad: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # outside a run (plot, data): nothing to resume
        print("synthgrad: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 (a bug: say so in one line, traceback on request)
        if os.environ.get("SYNTHGRAD_DEBUG"):
            raise
        print(f"synthgrad: internal error: {type(e).__name__}: {e} (set SYNTHGRAD_DEBUG=1 for the "
              "traceback, and please report it)", file=sys.stderr)
        return 1
