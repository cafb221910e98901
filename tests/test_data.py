"""IDX parsing, verification, sources and batching, on small files written here."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import idx_bytes, make_arrays, write_fake_dataset

from synthgrad import data
from synthgrad.errors import DataError


def test_parse_images_and_labels_round_trip() -> None:
    x, y = make_arrays(10, 0)
    np.testing.assert_array_equal(data.parse_idx(idx_bytes(x), "train_images", "x"), x)
    np.testing.assert_array_equal(data.parse_idx(idx_bytes(y), "train_labels", "y"), y)


@pytest.mark.parametrize("cut", [0, 3, 10, 100])
def test_truncated_file_is_refused_with_its_path(cut: int) -> None:
    raw = idx_bytes(make_arrays(5, 0)[0])
    with pytest.raises(DataError, match=r"/some/path.*(truncated|too short)"):
        data.parse_idx(raw[:cut] if cut < 16 else raw[:-cut], "train_images", "/some/path")


def test_wrong_magic_is_refused() -> None:
    images = idx_bytes(make_arrays(5, 0)[0])
    with pytest.raises(DataError, match="magic number"):
        data.parse_idx(images, "train_labels", "labels-file")  # an images file where labels belong


def test_wrong_image_size_is_refused() -> None:
    arr = np.zeros((3, 20, 20), np.uint8)
    with pytest.raises(DataError, match="28x28"):
        data.parse_idx(idx_bytes(arr), "test_images", "f")


def test_gzip_files_are_read_and_corrupt_gzip_refused(tmp_path: Path) -> None:
    write_fake_dataset(tmp_path / "gz", gz=True)
    ds = data.load("mnist", tmp_path / "gz", cache_dir=tmp_path / "cache", check_md5=False)
    assert ds.train_x.shape == (512, 1, 28, 28) and ds.test_y.shape == (128,)
    bad = tmp_path / "gz" / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress(b"x" * 100)[:20])
    with pytest.raises(DataError, match="t10k-labels"):
        data.load("mnist", tmp_path / "gz", cache_dir=tmp_path / "cache", check_md5=False)


def test_md5_mismatch_names_the_file_and_the_fix(fake_data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"MD5 .* does not match.*--no-verify-md5"):
        data.load("mnist", fake_data_dir, cache_dir=tmp_path / "cache")


def test_mismatched_image_and_label_counts_are_refused(fake_data_dir: Path, tmp_path: Path) -> None:
    (fake_data_dir / "train-labels-idx1-ubyte").write_bytes(idx_bytes(make_arrays(7, 0)[1]))
    with pytest.raises(DataError, match="do not belong together"):
        data.load("mnist", fake_data_dir, cache_dir=tmp_path / "c", check_md5=False)


def test_out_of_range_label_is_refused(fake_data_dir: Path, tmp_path: Path) -> None:
    y = make_arrays(512, 0)[1]
    y[3] = 42
    (fake_data_dir / "train-labels-idx1-ubyte").write_bytes(idx_bytes(y))
    with pytest.raises(DataError, match="label 42 out of range"):
        data.load("mnist", fake_data_dir, cache_dir=tmp_path / "c", check_md5=False)


def test_missing_everything_lists_what_was_tried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "DATASETS", {"mnist": data.DatasetSpec(
        name="mnist", md5=data.DATASETS["mnist"].md5, counts={"train": 60000, "test": 10000},
        mirrors=(), classes=data.DATASETS["mnist"].classes, packaged_dirs=(str(tmp_path / "nope"),))})
    with pytest.raises(DataError) as e:
        data.fetch("mnist", cache_dir=tmp_path / "cache", allow_download=False)
    msg = str(e.value)
    assert "cache" in msg and "packaged directory" in msg and "To fix" in msg


def test_corrupt_cached_file_is_never_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A cache whose file's MD5 is wrong is removed, and the next source is used and re-cached.
    good = write_fake_dataset(tmp_path / "packaged")
    md5 = {role: hashlib.md5((good / data.FILE_NAMES[role]).read_bytes()).hexdigest() for role in data.FILE_ROLES}
    spec = data.DatasetSpec(name="mnist", md5=md5, counts={"train": 512, "test": 128}, mirrors=(),
                            classes=data.DATASETS["mnist"].classes, packaged_dirs=(str(good),))
    monkeypatch.setattr(data, "DATASETS", {"mnist": spec})
    cache = tmp_path / "cache"
    first = data.fetch("mnist", cache_dir=cache, allow_download=False)
    assert first.source.startswith("packaged")
    assert data.fetch("mnist", cache_dir=cache, allow_download=False).source.startswith("cache")
    cached = cache / "mnist" / "train-images-idx3-ubyte"
    raw = bytearray(cached.read_bytes())
    raw[1000] ^= 0xFF  # one flipped byte: same size, wrong content
    cached.write_bytes(bytes(raw))
    again = data.fetch("mnist", cache_dir=cache, allow_download=False)
    assert again.source.startswith("packaged")
    assert any("removed" in t for t in again.tried)
    assert hashlib.md5(cached.read_bytes()).hexdigest() == md5["train_images"]


def test_user_directory_wins_over_the_cache(fake_data_dir: Path, tmp_path: Path) -> None:
    got = data.fetch("mnist", fake_data_dir, cache_dir=tmp_path / "cache", check_md5=False)
    assert got.source == f"directory {fake_data_dir}"


def test_data_dir_that_is_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a directory"):
        data.fetch("mnist", tmp_path / "missing", cache_dir=tmp_path / "c")


def test_cache_dir_env_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "here"))
    assert data.default_cache_dir() == tmp_path / "here"


def test_normalised_tensors(fake_data_dir: Path, tmp_path: Path) -> None:
    ds = data.load("mnist", fake_data_dir, cache_dir=tmp_path / "c", check_md5=False)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert abs(ds.train_x.mean().item()) < 1e-4 and abs(ds.train_x.std().item() - 1) < 1e-3


def test_epoch_order_is_a_pure_function_of_seed_and_epoch() -> None:
    a, b = data.epoch_order(100, 3, 5), data.epoch_order(100, 3, 5)
    assert torch.equal(a, b) and sorted(a.tolist()) == list(range(100))
    assert not torch.equal(a, data.epoch_order(100, 3, 6))


def test_batches_slice_and_resume_from_a_batch_index() -> None:
    x, y = torch.arange(10).float().view(10, 1), torch.arange(10)
    order = data.epoch_order(10, 0, 0)
    full = list(data.batches(x, y, 3, order))
    assert len(full) == 3 == data.num_batches(10, 3)  # the last partial batch is dropped
    rest = list(data.batches(x, y, 3, order, start=1))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(full[1:], rest, strict=True))
    assert len(list(data.batches(x, y, 3, drop_last=False))) == 4
