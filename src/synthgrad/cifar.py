"""CIFAR-10 from its Python archive: find, verify by MD5, unpickle with a restricted unpickler, check.

Sources, in order: what the user names (the archive ``cifar-10-python.tar.gz``, a folder holding
it, or its extracted ``cifar-10-batches-py/`` folder), the cache, then the canonical URL (short
timeout). The archive's MD5 (or each extracted file's) is checked before anything is unpickled;
the unpickler refuses every global but the three numpy needs to rebuild an array, so even an
unverified file (``check_md5=False``) cannot run code.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import os
import pickle
import tarfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from synthgrad.arrays import Arrays
from synthgrad.errors import DataError

ARCHIVE = "cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"
# MD5 of each extracted file, as published with the archive (the same values torchvision checks).
FILE_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
FILES = (*TRAIN_BATCHES, TEST_BATCH, META)
PER_BATCH = 10000  # examples in each batch of the real archive
PIXELS = 3 * 32 * 32  # a row of b"data": 1024 red, 1024 green, 1024 blue values, each row-major 32x32
MAX_MEMBER_BYTES = 64 << 20  # a real batch is 31 MB; refuse anything far larger before reading it
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


# ----------------------------------------------------------------------------- safe unpickling


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds builtin containers, strings, numbers and numpy arrays; refuses every other global.

    A pickle can call any importable function while it loads (that is how ``__reduce__`` works), so
    the batches may only name the three globals numpy uses to rebuild an array, and ``_codecs.encode``,
    with which Python 3 writes bytes at protocol 2. None of them has side effects."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        if name == "_reconstruct":
            return np.zeros(0).__reduce__()[0]  # numpy's own reconstructor, whichever module holds it
        return {"ndarray": np.ndarray, "dtype": np.dtype, "encode": codecs.encode}[name]


def safe_unpickle(raw: bytes, source: str) -> object:
    """Unpickle `raw` with the restricted unpickler (Python 2 strings read as latin-1, as numpy needs)."""
    try:
        return _RestrictedUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{source}: not a CIFAR-10 batch ({e}); a CIFAR-10 batch holds only a dict of "
                        "arrays, lists and strings: replace the file") from e
    except Exception as e:  # noqa: BLE001 (a damaged pickle raises nearly anything: EOFError, ValueError, ...)
        raise DataError(f"{source}: unreadable pickle ({type(e).__name__}: {e}); the file is truncated or "
                        "corrupt: replace it") from e


def _keys_as_str(d: dict) -> dict:
    # Python 2 wrote str keys: read back as bytes (encoding="bytes") or str (latin-1); accept both.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}


# ----------------------------------------------------------------------------- checks


def _check_batch(obj: object, name: str, source: str, exact: bool) -> tuple[np.ndarray, np.ndarray]:
    """A batch dict -> (images uint8 [N, 3, 32, 32], labels int64 [N])."""
    if not isinstance(obj, dict):
        raise DataError(f"{source}: a CIFAR-10 batch is a dict, this pickle holds a {type(obj).__name__}")
    d = _keys_as_str(obj)
    missing = [k for k in ("data", "labels", "batch_label", "filenames") if k not in d]
    if missing:
        raise DataError(f"{source}: batch {name} lacks the keys {missing}; it is not a CIFAR-10 batch")
    x, labels = d["data"], d["labels"]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != PIXELS:
        what = f"{x.dtype} {list(x.shape)}" if isinstance(x, np.ndarray) else type(x).__name__
        raise DataError(f"{source}: batch {name} 'data' is {what}, expected uint8 [N, {PIXELS}]")
    if not isinstance(labels, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        raise DataError(f"{source}: batch {name} 'labels' must be a list of ints")
    if len(labels) != len(x) or len(d["filenames"]) != len(x):
        raise DataError(f"{source}: batch {name} has {len(x)} images, {len(labels)} labels and "
                        f"{len(d['filenames'])} file names; they do not belong together")
    if exact and len(x) != PER_BATCH:
        raise DataError(f"{source}: batch {name} has {len(x)} images, expected {PER_BATCH}")
    if not len(x):
        raise DataError(f"{source}: batch {name} is empty")
    return x.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def _check_meta(obj: object, source: str, exact: bool) -> tuple[str, ...]:
    """batches.meta -> the class names."""
    if not isinstance(obj, dict):
        raise DataError(f"{source}: batches.meta is a dict, this pickle holds a {type(obj).__name__}")
    d = _keys_as_str(obj)
    missing = [k for k in ("label_names", "num_cases_per_batch", "num_vis") if k not in d]
    if missing:
        raise DataError(f"{source}: batches.meta lacks the keys {missing}; it is not CIFAR-10's")
    names = d["label_names"]
    if not isinstance(names, list) or not all(isinstance(n, str | bytes) for n in names) or len(names) < 2:
        raise DataError(f"{source}: batches.meta 'label_names' must list at least two class names")
    if d["num_vis"] != PIXELS:
        raise DataError(f"{source}: batches.meta says {d['num_vis']} values per image, expected {PIXELS}")
    classes = tuple(n.decode("latin1") if isinstance(n, bytes) else n for n in names)
    if exact and (classes != CLASSES or d["num_cases_per_batch"] != PER_BATCH):
        raise DataError(f"{source}: batches.meta lists {len(classes)} classes of {d['num_cases_per_batch']} "
                        f"examples a batch, not CIFAR-10's 10 of {PER_BATCH}")
    return classes


def from_files(files: dict[str, bytes], source: str, check_md5: bool) -> Arrays:
    """The seven extracted files (raw bytes, by name) -> checked arrays. With check_md5 each file's MD5
    must match the published one (checked before unpickling) and the counts must be CIFAR-10's."""
    if check_md5:
        for name in FILES:
            digest = hashlib.md5(files[name]).hexdigest()
            if digest != FILE_MD5[name]:
                raise DataError(f"{source}: {name} has MD5 {digest}, not CIFAR-10's {FILE_MD5[name]}; the file is "
                                "corrupt or another dataset's: replace it (or pass --no-verify-md5 to use a "
                                "modified copy, read with a restricted unpickler)")
    classes = _check_meta(safe_unpickle(files[META], f"{source} {META}"), source, check_md5)
    parts = {n: _check_batch(safe_unpickle(files[n], f"{source} {n}"), n, source, check_md5)
             for n in (*TRAIN_BATCHES, TEST_BATCH)}
    for n, (_, y) in parts.items():
        if y.min() < 0 or y.max() >= len(classes):
            raise DataError(f"{source}: batch {n} has label {int(y.max()) if y.max() >= 0 else int(y.min())} "
                            f"outside 0..{len(classes) - 1}; the file is corrupt")
    train_x = np.concatenate([parts[n][0] for n in TRAIN_BATCHES])
    train_y = np.concatenate([parts[n][1] for n in TRAIN_BATCHES])
    return Arrays(train_x, train_y, *parts[TEST_BATCH], classes, source)


# ----------------------------------------------------------------------------- sources


def file_md5(path: Path) -> str:
    """MD5 of a file, read in 1 MiB pieces."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_archive(path: Path, check_md5: bool) -> Arrays:
    """The archive `path`, verified (MD5 first, when check_md5) and unpacked in memory (nothing is extracted)."""
    try:
        if check_md5 and (digest := file_md5(path)) != ARCHIVE_MD5:
            raise DataError(f"{path}: MD5 {digest} is not CIFAR-10's {ARCHIVE_MD5}; the archive is corrupt or "
                            "another file: replace it (or pass --no-verify-md5 to use a modified copy)")
        files: dict[str, bytes] = {}
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:  # one pass: a gzip stream cannot seek back cheaply
                name = member.name.removeprefix("./")
                if name.startswith(FOLDER + "/") and name[len(FOLDER) + 1:] in FILES and member.isfile():
                    if member.size > MAX_MEMBER_BYTES:
                        raise DataError(f"{path}: {name} is {member.size} bytes, far more than a CIFAR-10 batch")
                    extracted = tar.extractfile(member)
                    assert extracted is not None  # a regular file
                    files[name[len(FOLDER) + 1:]] = extracted.read()
    except DataError:
        raise
    except (OSError, EOFError, tarfile.TarError, zlib.error) as e:
        raise DataError(f"{path}: not a readable .tar.gz ({type(e).__name__}: {e}); the archive is truncated "
                        "or corrupt: replace it") from e
    missing = [n for n in FILES if n not in files]
    if missing:
        raise DataError(f"{path}: the archive lacks {', '.join(FOLDER + '/' + n for n in missing)}; "
                        f"it is not {ARCHIVE}")
    return from_files(files, str(path), check_md5)


def read_folder(folder: Path, check_md5: bool) -> Arrays:
    """The extracted folder `cifar-10-batches-py/`, each file checked against its published MD5."""
    missing = [n for n in FILES if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{folder}: lacks {', '.join(missing)}; give the whole {FOLDER}/ folder or {ARCHIVE}")
    files = {}
    for n in FILES:
        try:
            files[n] = (folder / n).read_bytes()
        except OSError as e:
            raise DataError(f"{folder / n}: cannot read ({e.strerror}); check its permissions") from e
    return from_files(files, str(folder), check_md5)


def from_user_path(path: Path, check_md5: bool) -> Arrays:
    """What --data-dir names: the archive, a folder holding it, or the extracted folder (or one holding that)."""
    if path.is_file():
        return read_archive(path, check_md5)
    if not path.is_dir():
        raise DataError(f"--data-dir {path} does not exist; give {ARCHIVE}, the folder holding it, or its "
                        f"extracted {FOLDER}/ folder")
    if (path / ARCHIVE).is_file():
        return read_archive(path / ARCHIVE, check_md5)
    for folder in (path / FOLDER, path):
        if folder.is_dir() and ((folder / META).is_file() or folder.name == FOLDER):
            return read_folder(folder, check_md5)
    raise DataError(f"--data-dir {path} holds neither {ARCHIVE} nor an extracted {FOLDER}/ folder; "
                    f"download {URL} and put it there")


def _download(path: Path, timeout: float) -> None:
    """Fetch the archive from the canonical URL into `path` (atomically: a partial download never stays)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with urllib.request.urlopen(URL, timeout=timeout) as response, open(tmp, "wb") as f:  # noqa: S310 (fixed URL)
            while chunk := response.read(1 << 20):
                f.write(chunk)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def fetch(data_dir: str | Path | None, cache_dir: Path, check_md5: bool = True, timeout: float = 5.0,
          allow_download: bool = True) -> Arrays:
    """CIFAR-10 from --data-dir (an error there is final), else the cache (a bad copy is deleted), else the URL."""
    # Said wherever the source is shown: without the MD5 nothing vouches for the pickles but the unpickler.
    unchecked = "" if check_md5 else " (MD5 not checked; batches read with a restricted unpickler)"
    if data_dir is not None:
        arrays = from_user_path(Path(data_dir).expanduser(), check_md5)
        kind = "archive" if arrays.source.endswith(".gz") else "directory"
        arrays.source = f"{kind} {arrays.source}{unchecked}"
        return arrays
    cached = cache_dir / "cifar10" / ARCHIVE
    tried: list[str] = []
    if cached.is_file():
        try:
            arrays = read_archive(cached, check_md5)
            arrays.source, arrays.tried = f"cache {cached}{unchecked}", tried
            return arrays
        except DataError as e:
            # A corrupt cached archive is never used: delete it and fetch it again.
            cached.unlink(missing_ok=True)
            tried.append(f"cache {cached}: {e} (removed)")
    else:
        tried.append(f"cache {cached}: empty")
    if allow_download:
        try:
            _download(cached, timeout)
            arrays = read_archive(cached, check_md5)
            arrays.source, arrays.tried = URL + unchecked, tried
            return arrays
        except DataError as e:
            cached.unlink(missing_ok=True)
            tried.append(f"{URL}: {e}")
        except (OSError, ValueError) as e:  # URLError, timeouts and refused connections are OSErrors
            tried.append(f"{URL}: {getattr(e, 'reason', e)}")
    raise DataError(f"could not obtain cifar10: tried {'; '.join(tried)}. To fix: download {URL} (MD5 "
                    f"{ARCHIVE_MD5}) where a network is reachable, then pass --data-dir PATH (the archive or "
                    f"its folder) or put it in {cached.parent}")
