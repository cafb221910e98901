"""Datasets as tensors: MNIST and Fashion-MNIST, CIFAR-10, a user's .npz; batches.

``load_dataset`` is the entry point for every dataset the CLI knows. The IDX files of MNIST and
Fashion-MNIST are found and verified in ``idx.py``, CIFAR-10 in ``cifar.py``, an .npz file in ``npz.py``;
this module turns their arrays into standardised tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from synthgrad import cifar, idx, npz
from synthgrad.batching import batches, epoch_order, num_batches  # noqa: F401 (re-exported: data.batches, ...)
from synthgrad.cache import default_cache_dir
from synthgrad.errors import ConfigError, DataError

DATASET_NAMES = ("mnist", "fashion-mnist", "cifar10")  # besides these, any .npz file (see npz.py)
INPUT_SHAPES = {"mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32)}  # [C, H, W]
NUM_CLASSES = {"mnist": 10, "fashion-mnist": 10, "cifar10": 10}


@dataclass
class Dataset:
    """A whole dataset as tensors, as ``load_dataset`` returns it.

    train_x, test_x: float32 images [N, C, H, W] (or an .npz's feature vectors [N, D]), each channel (feature)
    standardised with the training split's mean and std (uint8 pixels are first scaled to [0, 1]); train_y, test_y:
    int64 labels [N]
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
        """The shape of one example, [C, H, W] (or [D] for feature vectors)."""
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
    arrays = {role: idx.parse_idx(files[role], role, role) for role in idx.FILE_ROLES}
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
    fetched = idx.fetch(name, data_dir, cache_dir, check_md5=check_md5, allow_download=allow_download)
    return to_dataset(name, fetched.files, idx.DATASETS[name].classes, fetched.source)


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

