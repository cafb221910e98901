"""Checkpoint files: atomic, checksummed, never non-finite, with the previous checkpoint.pt kept beside the new one.

A file is MAGIC, the SHA-256 of the body, then the body: `torch.save` of the state. `load` checks the
digest, so a flipped byte anywhere is refused instead of resuming from silently wrong weights. Files
written before checksums existed (a bare `torch.save`, a zip) are still read, unverified.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import secrets
from pathlib import Path

import torch

from synthgrad.errors import ConfigError, DivergenceError

LATEST = "checkpoint.pt"  # everything needed to resume
PREVIOUS = "checkpoint.prev.pt"  # the checkpoint.pt before the last one: a fallback when the latest is damaged
BEST = "best.pt"  # the stages with the best test accuracy so far
FINAL = "final.pt"  # the stages at the end of training

MAGIC = b"SYNTHGRAD-CKPT\x00\x01"  # 16 bytes; the last one is the container's format version
_HEADER = len(MAGIC) + 32  # magic + SHA-256 digest of the body
_ZIP = b"PK\x03\x04"  # how a bare torch.save file (before checksums) starts


class BadCheckpoint(ConfigError):
    """A checkpoint file that exists but cannot be trusted: damaged, unreadable or holding non-finite values."""


def temp_path(path: Path) -> Path:
    """A temporary name beside `path`, unique to this writer (pid and a random suffix)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def is_temp(name: str) -> bool:
    """True for a name made by `temp_path`: a partial file, left behind only when its writer was killed."""
    return name.startswith(".") and name.endswith(".tmp")


def nonfinite(state: object, name: str = "") -> tuple[str, int, int] | None:
    """(name, non-finite count, size) of the first floating-point tensor in `state` holding a NaN or an infinity."""
    if isinstance(state, torch.Tensor):
        if state.is_floating_point() or state.is_complex():
            bad = int((~torch.isfinite(state)).sum())
            if bad:
                return name or "<tensor>", bad, state.numel()
        return None
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, list | tuple):
        items = enumerate(state)
    else:
        return None
    for key, value in items:
        found = nonfinite(value, f"{name}.{key}" if name else str(key))
        if found:
            return found
    return None


def write_atomic(path: Path, body: bytes | memoryview, *parts: bytes) -> None:
    """Write `parts` then `body` to a unique temporary file, sync it, rename it onto `path`.

    On any OSError (a full disk, a read-only directory) the partial file is removed, `path` keeps
    its old content, and a ConfigError says what happened."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            for part in parts:
                f.write(part)
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        if path.name == LATEST and path.is_file():
            _keep_previous(path)
        os.replace(tmp, path)
        _sync_directory(path.parent)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise write_error(path, e) from e


def write_error(path: Path, e: OSError) -> ConfigError:
    """The one-line error for a failed write of `path`, with what to do next."""
    kept = f"{path} still holds the previous version" if path.exists() else f"{path} was not written"
    then = f"then continue with `synthgrad train --resume {path.parent}`"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return ConfigError(f"No space left on device writing {path}; the partial file was removed and {kept}. "
                           f"Free some space, {then}")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return ConfigError(f"cannot write {path} ({e.strerror}): the run directory is not writable; {kept}. "
                           f"Make it writable, {then}")
    return ConfigError(f"cannot write {path} ({e.strerror or e}); {kept}. Fix the cause, {then}")


def save(path: str | Path, state: dict) -> None:
    """Write `state` so that `path` always holds a whole, checksummed checkpoint: the old one or the new one.

    Writing checkpoint.pt first keeps its previous version as checkpoint.prev.pt. A state holding
    a non-finite tensor is never written (DivergenceError): a diverged run cannot replace the last
    good checkpoint."""
    path = Path(path)
    bad = nonfinite(state)
    if bad is not None:
        name, count, size = bad
        raise DivergenceError(f"non-finite values in {name} ({count} of {size}): the run diverged, so {path} was "
                              "not overwritten and keeps the last good state. Try a lower --lr or --synth-lr, a "
                              "--synth-scale below 1, or --synth-warmup steps")
    buffer = io.BytesIO()
    torch.save(state, buffer)  # serialised in memory: a full disk then fails in `write` with a plain OSError
    body = buffer.getbuffer()
    write_atomic(path, body, MAGIC, hashlib.sha256(body).digest())


def load(path: str | Path, check_finite: bool = True) -> dict:
    """Read a checkpoint written by `save`, verified; an error that says what to do if it cannot be used."""
    path = Path(path)
    if not path.is_file():
        hint = (f"; the previous checkpoint {path.with_name(PREVIOUS)} exists: continue from it with "
                f"`synthgrad train --resume {path.parent} --from-previous`"
                if path.name == LATEST and path.with_name(PREVIOUS).is_file() else
                ": the run never reached its first checkpoint; start it again without --resume "
                "(add --overwrite to reuse the directory)")
        raise ConfigError(f"no checkpoint at {path}{hint}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise BadCheckpoint(f"cannot read {path} ({e.strerror}){_advice(path)}") from e
    if raw.startswith(MAGIC):
        body = memoryview(raw)[_HEADER:]
        if len(raw) < _HEADER or hashlib.sha256(body).digest() != raw[len(MAGIC):_HEADER]:
            raise BadCheckpoint(f"{path} failed its integrity check (SHA-256 mismatch): the file was damaged after "
                                f"it was written{_advice(path)}")
    elif raw.startswith(_ZIP):
        body = memoryview(raw)  # written before checksums: loaded unverified
    else:
        raise BadCheckpoint(f"{path} is not a synthgrad checkpoint (unknown header): the file is damaged"
                            f"{_advice(path)}")
    try:
        state = torch.load(io.BytesIO(body), map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 (torch raises many kinds for a damaged file)
        detail = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        raise BadCheckpoint(f"{path} is unreadable ({detail}){_advice(path)}") from e
    if not isinstance(state, dict):
        raise BadCheckpoint(f"{path} holds a {type(state).__name__}, not a checkpoint{_advice(path)}")
    bad = nonfinite(state) if check_finite else None
    if bad is not None:
        name, count, size = bad
        raise BadCheckpoint(f"{path} holds non-finite values in {name} ({count} of {size}): the run had diverged "
                            f"when it was written, or the file was damaged; resuming would fail again"
                            f"{_advice(path)}")
    return state


def _advice(path: Path) -> str:
    """What to do about an unusable `path`: the previous checkpoint if there is one, else start again."""
    if path.name == LATEST and path.with_name(PREVIOUS).is_file():
        return (f". The previous checkpoint {path.with_name(PREVIOUS)} exists: continue from it with "
                f"`synthgrad train --resume {path.parent} --from-previous`")
    if path.name == PREVIOUS:
        return f". No older checkpoint is kept: start again with `--run-dir {path.parent} --overwrite`"
    if path.name == LATEST:
        return f". No previous checkpoint is kept: start again with `--run-dir {path.parent} --overwrite`"
    return f". Resume the run to write it again (`synthgrad train --resume {path.parent}`), or train again"


def _keep_previous(path: Path) -> None:
    """Make PREVIOUS a hard link to the current `path`, so that `path` never stops existing while it is replaced."""
    previous = path.with_name(PREVIOUS)
    if previous.is_file() and os.path.samefile(path, previous):
        # Already kept: a writer was killed between keeping it and replacing `path`. (Renaming a link onto
        # another link of the same file does nothing, by POSIX, and would leave the new link behind.)
        return
    link = temp_path(previous)
    try:
        os.link(path, link)
        os.replace(link, previous)
    except OSError as e:
        with contextlib.suppress(OSError):
            link.unlink()
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        os.replace(path, previous)  # a file system without hard links: a short moment without `path`


def _sync_directory(directory: Path) -> None:
    """fsync the directory, so the rename itself survives a power cut (a no-op where that is not supported)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
