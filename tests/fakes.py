"""Small IDX datasets written by the tests themselves (no network, no real MNIST)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from synthgrad.data import FILE_NAMES


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
