"""A user's own dataset from one .npz file: its layout, and every check with a message that says what to fix.

Layout (``numpy.savez(path, train_x=..., train_y=..., test_x=..., test_y=..., classes=...)``):

- ``train_x``, ``test_x``: images [N, C, H, W], or [N, H, W] for one channel, or feature vectors [N, D]
  (tabular data: the MLPs take them); uint8 (0..255, scaled to [0, 1]) or float (taken as they are); finite;
- ``train_y``, ``test_y``: integer labels [N] in 0..K-1;
- ``classes`` (optional): K class names, a string array; without it K = the largest label + 1.

The file is read with ``allow_pickle=False``: it can hold plain arrays only, never code.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

from synthgrad.arrays import Arrays
from synthgrad.errors import DataError

REQUIRED = ("train_x", "train_y", "test_x", "test_y")
LAYOUT = ("train_x/test_x: images [N, C, H, W] or [N, H, W], or feature vectors [N, D], uint8 0..255 or float; "
          "train_y/test_y: integer labels [N] in 0..K-1; optional classes: K names")


def _images(x: np.ndarray, key: str, where: str) -> np.ndarray:
    if x.ndim == 3:
        x = x[:, None]  # [N, H, W] -> [N, 1, H, W]
    if x.ndim not in (2, 4):
        raise DataError(f"{where}: {key} has shape {list(x.shape)}; give images [N, C, H, W] or [N, H, W], or "
                        "feature vectors [N, D]")
    if x.ndim == 4 and x.shape[3] in (1, 3, 4) and x.shape[1] > 4:
        raise DataError(f"{where}: {key} has shape {list(x.shape)}, which looks channels-last [N, H, W, C]; "
                        f"the layout is [N, C, H, W]: save {key}.transpose(0, 3, 1, 2)")
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{where}: {key} is {x.dtype}; images must be uint8 (0..255) or float: convert them "
                        f"with {key}.astype(np.uint8) or .astype(np.float32)")
    x = x.astype(np.float32, copy=False)
    bad = int(np.count_nonzero(~np.isfinite(x)))
    if bad:
        raise DataError(f"{where}: {key} holds {bad} NaN or infinite values; replace them before training")
    return x


def _labels(y: np.ndarray, key: str, where: str) -> np.ndarray:
    if y.ndim != 1:
        raise DataError(f"{where}: {key} has shape {list(y.shape)}; labels must be one integer per example [N]")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            hint = f"convert them with {key}.astype(np.int64)"
        else:
            hint = "labels are class indices 0..K-1"
        raise DataError(f"{where}: {key} is {y.dtype}; {hint}")
    if len(y) and y.min() < 0:
        raise DataError(f"{where}: {key} holds the label {int(y.min())}; labels are class indices 0..K-1")
    return y.astype(np.int64)


def _classes(raw: np.ndarray | None, num_classes: int, where: str) -> tuple[str, ...]:
    if raw is None:
        return tuple(str(i) for i in range(num_classes))
    if raw.ndim != 1 or raw.dtype.kind not in "US":
        raise DataError(f"{where}: classes is {raw.dtype} {list(raw.shape)}; give the K class names as a string "
                        "array, e.g. np.array(['cat', 'dog'])")
    names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in raw.tolist())
    if len(names) < num_classes:
        raise DataError(f"{where}: the labels go up to {num_classes - 1} but classes names only {len(names)}; "
                        "give one name per class")
    return names


def read(path: str | Path) -> Arrays:
    """Load and check an .npz dataset (layout in the module docstring); DataError says what is wrong."""
    path = Path(path).expanduser()
    where = str(path)
    if not path.is_file():
        raise DataError(f"{where}: no such file; give an .npz with {LAYOUT}")
    try:
        with open(path, "rb") as head:
            magic = head.read(4)
        if magic not in (b"PK\x03\x04", b"PK\x05\x06"):  # an .npz is a zip archive of .npy arrays
            raise DataError(f"{where}: not an .npz archive (an .npz is a zip of arrays); save the dataset with "
                            "numpy.savez(path, train_x=..., train_y=..., test_x=..., test_y=...)")
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in REQUIRED if k not in f.files]
            if missing:
                raise DataError(f"{where}: missing {', '.join(missing)} (it has {', '.join(f.files) or 'nothing'}); "
                                f"the layout is {LAYOUT}")
            raw = {k: f[k] for k in (*REQUIRED, "classes") if k in f.files}
    except DataError:
        raise
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise DataError(f"{where}: holds object arrays, which only pickle can read (and pickle runs code); "
                            "save plain numeric arrays (and classes as a string array)") from e
        raise DataError(f"{where}: not a readable .npz ({e}); save it with numpy.savez") from e
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"{where}: not a readable .npz ({type(e).__name__}: {e}); the file is corrupt or not "
                        "an .npz: save it again with numpy.savez") from e

    split = {}
    for s in ("train", "test"):
        x = _images(raw[f"{s}_x"], f"{s}_x", where)
        y = _labels(raw[f"{s}_y"], f"{s}_y", where)
        if len(x) == 0:
            raise DataError(f"{where}: the {s} split is empty; give at least one example in {s}_x and {s}_y")
        if len(x) != len(y):
            raise DataError(f"{where}: {s}_x has {len(x)} examples but {s}_y has {len(y)} labels; they must match")
        split[s] = (x, y)
    if split["train"][0].shape[1:] != split["test"][0].shape[1:]:
        raise DataError(f"{where}: train images are {list(split['train'][0].shape[1:])} but test images "
                        f"{list(split['test'][0].shape[1:])}; both splits need the same image shape")
    num_classes = int(max(split["train"][1].max(), split["test"][1].max())) + 1
    classes = _classes(raw.get("classes"), num_classes, where)
    if len(classes) < 2:
        raise DataError(f"{where}: every label is 0; a classifier needs at least two classes")
    return Arrays(*split["train"], *split["test"], classes)
