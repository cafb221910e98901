"""One run directory for every kind of run: its lock, config.json, metrics.jsonl, checkpoints and resume.

A run claims its directory before it writes anything there (`create` for a new run, `reopen` to
resume), which takes an exclusive lock held until `close` or the end of the process: a second run
started into the same directory is refused with the holder's pid. The lock is an `fcntl.flock` on
`DIR/.lock`, so the kernel drops it when its holder dies, and a killed run never blocks the next one.
A launcher that starts writer processes (the pipeline engine) claims the directory and keeps it
claimed while they write, and the writer `attach`es to it; under torchrun, rank 0 claims it.

Checkpoints (checkpoint.pt, best.pt, final.pt) share one envelope, `Checkpoint`: the kind of run, the
format version, the step, the config, the metrics offset and the trainer's own payload.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

from synthgrad import __version__, checkpoint
from synthgrad.errors import ConfigError, DivergenceError
from synthgrad.metrics import MetricsLog

CONFIG = "config.json"
METRICS = "metrics.jsonl"
LOCK = ".lock"
DAMAGED = "checkpoint.damaged.pt"  # a checkpoint.pt set aside by a resume --from-previous
FORMAT = 2  # of the checkpoint envelope; format 1 is the flat dict written before (still read)
KINDS = ("classifier", "sequence", "pipeline")


@dataclass
class Checkpoint:
    """The envelope of every checkpoint file; `payload` is what only its kind of trainer reads."""

    kind: str  # one of KINDS
    step: int
    config: dict
    payload: dict
    metrics_offset: int | None = None  # bytes of metrics.jsonl this state has seen (checkpoint.pt only)

    def to_state(self) -> dict:
        return {"format": FORMAT, "kind": self.kind, "step": self.step, "config": self.config,
                "metrics_offset": self.metrics_offset, "payload": self.payload}

    @classmethod
    def from_state(cls, state: dict, path: Path) -> Checkpoint:
        """Read an envelope, or a flat format-1 dict (its keys become the payload)."""
        if "format" not in state:  # format 1: the trainers' flat dicts, the pipeline's until it moves here
            config = state.get("config") or {}
            kind = "pipeline" if state.get("pipeline") else "sequence" if "task" in config else "classifier"
            return cls(kind, int(state.get("step", 0)), config, dict(state), state.get("metrics_offset"))
        if state["format"] > FORMAT:
            raise ConfigError(f"{path} has checkpoint format {state['format']}; this synthgrad reads up to "
                              f"{FORMAT}: was it written by a newer version?")
        try:
            return cls(state["kind"], int(state["step"]), dict(state["config"]), dict(state["payload"]),
                       state["metrics_offset"])
        except (KeyError, TypeError, ValueError) as e:
            raise checkpoint.BadCheckpoint(f"{path} lacks a checkpoint field ({e}); it was not written by "
                                           "synthgrad") from e


def read_model(path: str | Path) -> Checkpoint:
    """The verified best.pt or final.pt at `path` (any kind of run, any format)."""
    return Checkpoint.from_state(checkpoint.load(path), Path(path))


class RunLock:
    """An exclusive lock on a run directory, held until `release` or the end of the process."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        path = self.directory / LOCK
        try:  # close-on-exec: a child process neither inherits nor prolongs the lock
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise unwritable(self.directory, e) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a process that is just starting"
            os.close(fd)
            raise ConfigError(f"run directory {self.directory} is in use by another synthgrad run ({holder}); wait "
                              "for it to end, or choose another --run-dir") from None
        except OSError as e:  # a file system without locks (some network mounts): run, but say so
            warnings.warn(f"cannot lock {path} ({e.strerror}); nothing stops a second run into this directory",
                          stacklevel=2)
        with contextlib.suppress(OSError):  # who holds it, for the message above (best effort)
            os.ftruncate(fd, 0)
            started = datetime.now().isoformat(timespec="seconds")
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def unwritable(directory: Path, e: OSError) -> ConfigError:
    """The error for a run directory this process cannot create or write."""
    return ConfigError(f"run directory {directory} is not writable ({e.strerror or e}); choose a writable --run-dir "
                       "(to resume a run kept on read-only storage, copy it somewhere writable and resume the copy)")


class RunDir:
    """A run directory: claim it (`create` or `reopen`), then `begin` or `resume`, save, and `close`."""

    def __init__(self, path: str | Path, kind: str):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.path, self.kind = Path(path), kind
        self.lock = RunLock(self.path)
        self.attached = False  # writes into a directory that another process (its launcher) has claimed
        self.config: dict = {}
        self.metrics: MetricsLog | None = None

    # -- claiming the directory ------------------------------------------------------------------
    def create(self, overwrite: bool = False) -> None:
        """Claim the directory for a new run: create it, lock it, and with `overwrite` empty it (after locking)."""
        self._refuse_file()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise unwritable(self.path, e) from e
        self.lock.acquire()
        try:
            entries = [p for p in self.path.iterdir() if p.name != LOCK]
            if entries and not overwrite:
                raise ConfigError(f"run directory {self.path} already holds a run; pass --resume {self.path} to "
                                  "continue it, --overwrite to replace it, or choose another --run-dir")
            if entries and not (self.path / CONFIG).is_file():
                raise ConfigError(f"{self.path} holds files but no synthgrad run (no {CONFIG}); --overwrite deletes "
                                  "only runs: choose another --run-dir, or empty it yourself")
            for p in entries:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
            self._probe()
        except OSError as e:
            self.lock.release()
            raise unwritable(self.path, e) from e
        except BaseException:
            self.lock.release()
            raise

    def reopen(self) -> None:
        """Claim an existing run's directory to resume it: lock it and clear partial files of killed writers."""
        if not self.path.exists():
            raise ConfigError(f"--resume {self.path}: no such directory; give the directory of a synthgrad run")
        self._refuse_file()
        if not (self.path / CONFIG).is_file():
            raise ConfigError(f"--resume {self.path}: no {CONFIG} there; give the directory of a synthgrad run")
        self.lock.acquire()
        try:
            for p in self.path.iterdir():
                if checkpoint.is_temp(p.name):  # we hold the lock: whoever wrote it is gone
                    p.unlink()
            self._probe()
        except OSError as e:
            self.lock.release()
            raise unwritable(self.path, e) from e

    def attach(self) -> None:
        """Write into a directory that the launching process claimed and holds (a pipeline's rank 0 when the
        launcher started it): `begin` and `resume` then take no lock here."""
        self.attached = True

    @property
    def claimed(self) -> bool:
        return self.lock.held or self.attached

    def close(self) -> None:
        """Close metrics.jsonl and drop the lock (the kernel drops it anyway if the process dies)."""
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        self.lock.release()

    @contextlib.contextmanager
    def closing_on_error(self) -> Iterator[None]:
        """Release the directory if the block raises: a run that failed to start or resume holds nothing."""
        try:
            yield
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _refuse_file(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"run directory {self.path} is a file, not a directory; choose another --run-dir")

    def _probe(self) -> None:
        """Raise OSError unless a file can be created here (a read-only mount, or permissions)."""
        probe = checkpoint.temp_path(self.path / "probe")
        probe.touch()
        probe.unlink()

    # -- config.json -----------------------------------------------------------------------------
    @staticmethod
    def read_config(path: str | Path) -> dict:
        """config.json of the run in `path`, for a resume."""
        file = Path(path) / CONFIG
        if not Path(path).is_dir():
            what = "no such directory" if not Path(path).exists() else "a file, not a run directory"
            raise ConfigError(f"--resume {path}: {what}; give the directory of a synthgrad run")
        if not file.is_file():
            raise ConfigError(f"--resume {path}: no {CONFIG} there; give the directory of a synthgrad run")
        try:
            config = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{file} is unreadable ({e}); the run cannot be resumed") from e
        if not isinstance(config, dict):
            raise ConfigError(f"{file} holds no configuration; the run cannot be resumed")
        return config

    def write_config(self, config: dict) -> None:
        checkpoint.write_atomic(self.path / CONFIG, (json.dumps(config, indent=2) + "\n").encode())

    # -- a run's life ----------------------------------------------------------------------------
    def begin(self, cfg, data_source: str, overwrite: bool = False, **extra: object) -> None:  # cfg: a JSONConfig
        """Start a new run: claim the directory (`create`) unless claimed already, write config.json with the
        versions and `extra`, open an empty metrics log."""
        if not self.claimed:
            self.create(overwrite)
        cfg.extra.update({"synthgrad_version": __version__, "torch_version": torch.__version__,
                          "python_version": sys.version.split()[0], "data_source": data_source,
                          "started": datetime.now().isoformat(timespec="seconds"), **extra})
        self.config = cfg.to_dict()
        self.write_config(self.config)
        self.metrics = MetricsLog(self.path / METRICS, tensorboard=getattr(cfg, "tensorboard", False))
        self.metrics.truncate(0)

    def resume(self, cfg, from_previous: bool = False) -> Checkpoint:
        """Continue a run: verify checkpoint.pt (or, with `from_previous`, checkpoint.prev.pt, which then takes
        its place) and open metrics.jsonl cut back to what that checkpoint had seen."""
        if not self.claimed:
            self.reopen()
        latest = self.path / checkpoint.LATEST
        state = self.use_previous() if from_previous else checkpoint.load(latest)
        ckpt = Checkpoint.from_state(state, latest)
        if ckpt.kind != self.kind:
            raise ConfigError(f"{latest} was written by a {ckpt.kind} run, not a {self.kind} run; resume it the "
                              "way it was started")
        if ckpt.metrics_offset is None:
            raise checkpoint.BadCheckpoint(f"{latest} has no metrics offset; it is not a resumable checkpoint")
        self.config = cfg.to_dict()
        # Drop metric lines written after this checkpoint, including a line torn by a kill.
        self.metrics = MetricsLog(self.path / METRICS, tensorboard=getattr(cfg, "tensorboard", False))
        if ckpt.metrics_offset > self.metrics.offset():
            raise ConfigError(f"{self.path / METRICS} is shorter than {latest} expects (it was cut or replaced); "
                              "the run cannot be resumed consistently: start again with --overwrite")
        self.metrics.truncate(ckpt.metrics_offset)
        return ckpt

    def use_previous(self) -> dict:
        """Verify checkpoint.prev.pt and put it in checkpoint.pt's place; returns its state.

        The checkpoint.pt it replaces is kept as checkpoint.damaged.pt (never rotated into .prev again)."""
        latest, previous = self.path / checkpoint.LATEST, self.path / checkpoint.PREVIOUS
        if not previous.is_file():
            raise ConfigError(f"--from-previous: no previous checkpoint in {self.path} (one is kept from the second "
                              "checkpoint on); resume without --from-previous, or start again with --overwrite")
        state = checkpoint.load(previous)
        try:
            if latest.exists():
                os.replace(latest, self.path / DAMAGED)
            os.replace(previous, latest)
        except OSError as e:
            raise unwritable(self.path, e) from e
        return state

    def save_checkpoint(self, step: int, payload: dict) -> None:
        """checkpoint.pt (the previous one kept as checkpoint.prev.pt), after syncing the metrics it has seen."""
        assert self.metrics is not None, "begin() or resume() first"
        self.metrics.sync()
        state = Checkpoint(self.kind, step, self.config, payload, self.metrics.offset()).to_state()
        self._save(checkpoint.LATEST, step, state)

    def save_model(self, name: str, step: int, payload: dict) -> None:
        """best.pt or final.pt: the network and what the trainer reports with it."""
        self._save(name, step, Checkpoint(self.kind, step, self.config, payload).to_state())

    def _save(self, name: str, step: int, state: dict) -> None:
        try:
            checkpoint.save(self.path / name, state)
        except DivergenceError as e:  # say when: the step whose parameters went non-finite
            raise DivergenceError(f"step {step}: {e}") from None
