"""MNIST-format datasets' IDX files: parsing, verification, and the sources fetch tries in order."""

from __future__ import annotations

import gzip
import hashlib
import zlib
from pathlib import Path

import numpy as np
import pytest
from fakes import idx_bytes, make_arrays, write_fake_dataset

from synthgrad import idx
from synthgrad.errors import DataError


def test_parse_images_and_labels_round_trip() -> None:
    x, y = make_arrays(10, 0)
    np.testing.assert_array_equal(idx.parse_idx(idx_bytes(x), "train_images", "x"), x)
    np.testing.assert_array_equal(idx.parse_idx(idx_bytes(y), "train_labels", "y"), y)


@pytest.mark.parametrize("cut", [0, 3, 10, 100])
def test_truncated_file_is_refused_with_its_path(cut: int) -> None:
    raw = idx_bytes(make_arrays(5, 0)[0])
    with pytest.raises(DataError, match=r"/some/path.*(truncated|too short)"):
        idx.parse_idx(raw[:cut] if cut < 16 else raw[:-cut], "train_images", "/some/path")


def test_wrong_magic_is_refused() -> None:
    images = idx_bytes(make_arrays(5, 0)[0])
    with pytest.raises(DataError, match="magic number"):
        idx.parse_idx(images, "train_labels", "labels-file")  # an images file where labels belong


def test_wrong_image_size_is_refused() -> None:
    arr = np.zeros((3, 20, 20), np.uint8)
    with pytest.raises(DataError, match="28x28"):
        idx.parse_idx(idx_bytes(arr), "test_images", "f")


def test_missing_everything_lists_what_was_tried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(idx, "DATASETS", {"mnist": idx.DatasetSpec(
        name="mnist", md5=idx.DATASETS["mnist"].md5, counts={"train": 60000, "test": 10000},
        mirrors=(), classes=idx.DATASETS["mnist"].classes, packaged_dirs=(str(tmp_path / "nope"),))})
    with pytest.raises(DataError) as e:
        idx.fetch("mnist", cache_dir=tmp_path / "cache", allow_download=False)
    msg = str(e.value)
    assert "cache" in msg and "packaged directory" in msg and "To fix" in msg


def test_corrupt_cached_file_is_never_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A cache whose file's MD5 is wrong is removed, and the next source is used and re-cached.
    good = write_fake_dataset(tmp_path / "packaged")
    md5 = {role: hashlib.md5((good / idx.FILE_NAMES[role]).read_bytes()).hexdigest() for role in idx.FILE_ROLES}
    spec = idx.DatasetSpec(name="mnist", md5=md5, counts={"train": 512, "test": 128}, mirrors=(),
                            classes=idx.DATASETS["mnist"].classes, packaged_dirs=(str(good),))
    monkeypatch.setattr(idx, "DATASETS", {"mnist": spec})
    cache = tmp_path / "cache"
    first = idx.fetch("mnist", cache_dir=cache, allow_download=False)
    assert first.source.startswith("packaged")
    assert idx.fetch("mnist", cache_dir=cache, allow_download=False).source.startswith("cache")
    cached = cache / "mnist" / "train-images-idx3-ubyte"
    raw = bytearray(cached.read_bytes())
    raw[1000] ^= 0xFF  # one flipped byte: same size, wrong content
    cached.write_bytes(bytes(raw))
    again = idx.fetch("mnist", cache_dir=cache, allow_download=False)
    assert again.source.startswith("packaged")
    assert any("removed" in t for t in again.tried)
    assert hashlib.md5(cached.read_bytes()).hexdigest() == md5["train_images"]


def test_user_directory_wins_over_the_cache(fake_data_dir: Path, tmp_path: Path) -> None:
    got = idx.fetch("mnist", fake_data_dir, cache_dir=tmp_path / "cache", check_md5=False)
    assert got.source == f"directory {fake_data_dir}"


def test_data_dir_that_is_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a directory"):
        idx.fetch("mnist", tmp_path / "missing", cache_dir=tmp_path / "c")


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
    md5 = {role: hashlib.md5((good / idx.FILE_NAMES[role]).read_bytes()).hexdigest() for role in idx.FILE_ROLES}
    monkeypatch.setattr(idx, "DATASETS", {"mnist": idx.DatasetSpec(
        name="mnist", md5=md5, counts={"train": 512, "test": 128}, mirrors=(),
        classes=idx.DATASETS["mnist"].classes, packaged_dirs=(str(good),))})
    cache = tmp_path / "cache"
    write_fake_dataset(cache / "mnist", gz=True)  # a cache holding .gz copies, one of them damaged
    bad = cache / "mnist" / "t10k-images-idx3-ubyte.gz"
    _flip_compressed_byte(bad)
    got = idx.fetch("mnist", cache_dir=cache, allow_download=False)
    assert got.source.startswith("packaged") and not bad.exists()
    assert any("corrupt gzip data" in t and "removed" in t for t in got.tried)
    assert idx.fetch("mnist", cache_dir=cache, allow_download=False).source.startswith("cache")


@pytest.mark.parametrize("cut", [3, 100])
def test_truncated_file_in_data_dir_is_not_promised_a_refetch(fake_data_dir: Path, tmp_path: Path, cut: int) -> None:
    f = fake_data_dir / "train-labels-idx1-ubyte"
    f.write_bytes(f.read_bytes()[:cut])
    with pytest.raises(DataError) as e:
        idx.fetch("mnist", fake_data_dir, cache_dir=tmp_path / "c", check_md5=False)
    msg = str(e.value)
    assert "train-labels-idx1-ubyte" in msg and "truncated" in msg
    assert "so it is fetched again" not in msg and "never fetched again: replace it" in msg


def test_data_info_gives_the_whole_reason_on_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    from synthgrad.cli import main

    monkeypatch.setattr(idx, "DATASETS", {"fashion-mnist": idx.DatasetSpec(
        name="fashion-mnist", md5=idx.DATASETS["fashion-mnist"].md5, counts={"train": 60000, "test": 10000},
        mirrors=(), classes=idx.DATASETS["fashion-mnist"].classes, packaged_dirs=(str(tmp_path / "nope"),))})
    assert main(["data", "info", "--dataset", "fashion-mnist", "--cache-dir", str(tmp_path / "c")]) == 1
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1
    # what was tried (both sources), what to install, and what to run
    assert "cache " in out and "packaged directory" in out and "apt-get install dataset-fashion-mnist" in out
    assert "synthgrad data fetch --dataset fashion-mnist" in out and not out.endswith("Tried:)")
