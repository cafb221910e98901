"""Small datasets written by the tests themselves (no network, no real data): IDX, CIFAR-10 archives, .npz."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np

from synthgrad.idx import FILE_NAMES


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as IDX (images [N, 28, 28] or labels [N])."""
    magic = 0x00000800 | array.ndim
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def make_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable fake digits: class c lights a horizontal band at rows 2c..2c+3, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
    for i, c in enumerate(labels):
        images[i, 2 * c + 2:2 * c + 6, 4:24] = 255
    return images, labels


def write_fake_dataset(directory: Path, n_train: int = 512, n_test: int = 128, gz: bool = False) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tr_x, tr_y = make_arrays(n_train, 0)
    te_x, te_y = make_arrays(n_test, 1)
    arrays = {"train_images": tr_x, "train_labels": tr_y, "test_images": te_x, "test_labels": te_y}
    for role, arr in arrays.items():
        raw = idx_bytes(arr)
        if gz:
            (directory / (FILE_NAMES[role] + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (directory / FILE_NAMES[role]).write_bytes(raw)
    return directory


def cifar_batch(n: int, seed: int, name: str) -> dict:
    """A CIFAR-10 batch dict as the real pickles hold it (bytes keys as read with encoding="bytes"): learnable,
    class c lights channel c % 3 in rows 3c..3c+2."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 60, (n, 3, 32, 32)).astype(np.uint8)
    for i, c in enumerate(labels):
        images[i, c % 3, 3 * c:3 * c + 3, 4:28] = 255
    return {b"batch_label": f"{name} of 5".encode(), b"labels": [int(c) for c in labels],
            b"data": images.reshape(n, 3072), b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)]}


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def cifar_meta(per_batch: int) -> dict:
    return {b"num_cases_per_batch": per_batch, b"label_names": [c.encode() for c in CIFAR_CLASSES],
            b"num_vis": 3072}


def cifar_files(per_batch: int = 64) -> dict[str, bytes]:
    """The seven files of cifar-10-batches-py/, pickled at protocol 2 as the real ones are."""
    files = {f"data_batch_{i}": pickle.dumps(cifar_batch(per_batch, i, f"training batch {i}"), protocol=2)
             for i in range(1, 6)}
    files["test_batch"] = pickle.dumps(cifar_batch(per_batch, 9, "testing batch 1"), protocol=2)
    files["batches.meta"] = pickle.dumps(cifar_meta(per_batch), protocol=2)
    return files


def write_cifar_archive(path: Path, files: dict[str, bytes] | None = None) -> Path:
    """cifar-10-python.tar.gz in the real layout: every file under cifar-10-batches-py/."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, raw in (files or cifar_files()).items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def write_cifar_folder(directory: Path, files: dict[str, bytes] | None = None) -> Path:
    """The extracted cifar-10-batches-py/ folder."""
    folder = directory / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name, raw in (files or cifar_files()).items():
        (folder / name).write_bytes(raw)
    return folder


def write_npz(path: Path, shape: tuple[int, ...] = (3, 32, 32), classes: int = 5, n_train: int = 256,
              n_test: int = 64, names: np.ndarray | None = None, **override: np.ndarray | None) -> Path:
    """A learnable .npz dataset of uint8 images `shape` ([C, H, W] or [H, W]) and `classes` classes;
    `override` replaces (or, given None, drops) any array, `names` is saved as `classes`."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        y = rng.integers(0, classes, n)
        x = rng.integers(0, 60, (n, *shape)).astype(np.uint8)
        rows = shape[-2]
        for i, c in enumerate(y):
            x[i, ..., (c * rows) // classes, :] = 255  # class c lights one row
        arrays[f"{split}_x"], arrays[f"{split}_y"] = x, y
    if names is not None:
        arrays["classes"] = names
    arrays.update(override)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path
