"""IDX parsing, verification, sources and batching, on small files written here."""

from __future__ import annotations

import gzip
import hashlib
import zlib
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


def _flip_compressed_byte(path: Path) -> None:
    # One flipped byte inside the deflate stream (past the 10-byte gzip header), chosen so that gzip fails the
    # way issue 19 saw it: zlib.error "Error -3 while decompressing data" (other flips fail the CRC check).
    raw = path.read_bytes()
    for i in range(10, len(raw) - 8):
        flipped = bytearray(raw)
        flipped[i] ^= 0xFF
        try:
            gzip.decompress(bytes(flipped))
        except zlib.error:
            path.write_bytes(bytes(flipped))
            return
        except (OSError, EOFError):
            continue
    raise AssertionError("no single flipped byte gives a zlib error")


def test_corrupt_gzip_in_data_dir_is_a_data_error_that_says_what_to_do(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    from synthgrad.cli import main

    d = write_fake_dataset(tmp_path / "gz", gz=True)
    _flip_compressed_byte(d / "train-images-idx3-ubyte.gz")
    code = main(["data", "fetch", "--dataset", "mnist", "--data-dir", str(d), "--cache-dir", str(tmp_path / "c"),
                 "--no-verify-md5"])
    err = capsys.readouterr().err.strip()
    assert code == 3 and len(err.splitlines()) == 1
    assert "train-images-idx3-ubyte.gz: corrupt gzip data" in err and "internal error" not in err
    assert "never fetched again" in err and "fetched again from" not in err


def test_corrupt_gzip_in_the_cache_is_deleted_and_fetched_again(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    good = write_fake_dataset(tmp_path / "packaged")
    md5 = {role: hashlib.md5((good / data.FILE_NAMES[role]).read_bytes()).hexdigest() for role in data.FILE_ROLES}
    monkeypatch.setattr(data, "DATASETS", {"mnist": data.DatasetSpec(
        name="mnist", md5=md5, counts={"train": 512, "test": 128}, mirrors=(),
        classes=data.DATASETS["mnist"].classes, packaged_dirs=(str(good),))})
    cache = tmp_path / "cache"
    write_fake_dataset(cache / "mnist", gz=True)  # a cache holding .gz copies, one of them damaged
    bad = cache / "mnist" / "t10k-images-idx3-ubyte.gz"
    _flip_compressed_byte(bad)
    got = data.fetch("mnist", cache_dir=cache, allow_download=False)
    assert got.source.startswith("packaged") and not bad.exists()
    assert any("corrupt gzip data" in t and "removed" in t for t in got.tried)
    assert data.fetch("mnist", cache_dir=cache, allow_download=False).source.startswith("cache")


@pytest.mark.parametrize("cut", [3, 100])
def test_truncated_file_in_data_dir_is_not_promised_a_refetch(fake_data_dir: Path, tmp_path: Path, cut: int) -> None:
    f = fake_data_dir / "train-labels-idx1-ubyte"
    f.write_bytes(f.read_bytes()[:cut])
    with pytest.raises(DataError) as e:
        data.fetch("mnist", fake_data_dir, cache_dir=tmp_path / "c", check_md5=False)
    msg = str(e.value)
    assert "train-labels-idx1-ubyte" in msg and "truncated" in msg
    assert "so it is fetched again" not in msg and "never fetched again: replace it" in msg


def test_data_info_gives_the_whole_reason_on_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    from synthgrad.cli import main

    monkeypatch.setattr(data, "DATASETS", {"fashion-mnist": data.DatasetSpec(
        name="fashion-mnist", md5=data.DATASETS["fashion-mnist"].md5, counts={"train": 60000, "test": 10000},
        mirrors=(), classes=data.DATASETS["fashion-mnist"].classes, packaged_dirs=(str(tmp_path / "nope"),))})
    assert main(["data", "info", "--dataset", "fashion-mnist", "--cache-dir", str(tmp_path / "c")]) == 1
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1
    # what was tried (both sources), what to install, and what to run
    assert "cache " in out and "packaged directory" in out and "apt-get install dataset-fashion-mnist" in out
    assert "synthgrad data fetch --dataset fashion-mnist" in out and not out.endswith("Tried:)")


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
