"""Datasets as tensors (loading, standardisation, checks across files) and batching, on small files written here."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import idx_bytes, make_arrays, write_fake_dataset

from synthgrad import data
from synthgrad.errors import DataError


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


def test_public_load_dataset(fake_data_dir: Path, tmp_path: Path) -> None:
    import synthgrad as sg

    ds = sg.load_dataset("mnist", data_dir=fake_data_dir, cache_dir=tmp_path / "c", verify_md5=False)
    assert isinstance(ds, sg.Dataset) and ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert ds.train_x.shape == (512, 1, 28, 28) and ds.source == f"directory {fake_data_dir}"
    with pytest.raises(DataError, match="unknown dataset"):
        sg.load_dataset("imagenet")


def test_standardised_per_channel_with_training_statistics() -> None:
    # Oracle: channel c of the training images is k*c + noise; after loading every training channel has mean 0,
    # std 1, and the test images are shifted and scaled by the same (training) numbers.
    rng = np.random.default_rng(0)
    train = rng.normal(size=(50, 3, 4, 4)).astype(np.float32) + np.arange(3, dtype=np.float32)[None, :, None, None] * 5
    test = train[:10] + 1.0
    before = train.copy()
    ds = data.from_arrays("t", train, np.zeros(50), test, np.zeros(10), ("a", "b"), "here")
    np.testing.assert_array_equal(train, before)  # the caller's array is left as it was
    torch.testing.assert_close(ds.train_x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(ds.train_x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-5, rtol=0)
    std = torch.from_numpy(train).std(dim=(0, 2, 3))
    torch.testing.assert_close(ds.test_x - ds.train_x[:10], (1.0 / std)[None, :, None, None].expand(10, 3, 4, 4))
