"""CIFAR-10 from generated archives in the real format: sources, MD5, the restricted unpickler, checks, CLI."""

from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import cifar_batch, cifar_files, write_cifar_archive, write_cifar_folder

from synthgrad import cifar, data
from synthgrad.cli import main
from synthgrad.errors import DataError
from synthgrad.metrics import read_metrics


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    return write_cifar_archive(tmp_path / "user" / cifar.ARCHIVE)


def _published(monkeypatch: pytest.MonkeyPatch, files: dict[str, bytes], archive: Path | None = None) -> None:
    # Make the generated files "the published ones", to test what happens after a passing MD5 check.
    monkeypatch.setattr(cifar, "FILE_MD5", {n: hashlib.md5(raw).hexdigest() for n, raw in files.items()})
    if archive is not None:
        monkeypatch.setattr(cifar, "ARCHIVE_MD5", cifar.file_md5(archive))


def test_archive_gives_images_in_the_published_layout(archive: Path) -> None:
    # Oracle: a row of b"data" is 1024 red, 1024 green, 1024 blue values, each 32x32 row-major.
    got = cifar.read_archive(archive, check_md5=False)
    first = cifar_batch(64, 1, "training batch 1")
    np.testing.assert_array_equal(got.train_x[:64], first[b"data"].reshape(64, 3, 32, 32))
    assert got.train_x[0, 1, 0, 0] == first[b"data"][0, 1024]  # green channel, pixel (0, 0)
    assert got.train_x.shape == (320, 3, 32, 32) and got.test_x.shape == (64, 3, 32, 32)
    assert got.train_y.dtype == np.int64 and got.train_y[:64].tolist() == first[b"labels"]
    assert got.classes[:2] == ("airplane", "automobile") and len(got.classes) == 10


def test_load_dataset_tensors(archive: Path, tmp_path: Path) -> None:
    ds = data.load_dataset("cifar10", data_dir=archive, cache_dir=tmp_path / "c", verify_md5=False)
    assert ds.train_x.shape == (320, 3, 32, 32) and ds.train_x.dtype == torch.float32
    assert ds.test_y.dtype == torch.int64 and ds.input_shape == (3, 32, 32) and ds.num_classes == 10
    torch.testing.assert_close(ds.train_x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    assert ds.source == f"archive {archive} (MD5 not checked; batches read with a restricted unpickler)"
    assert not (tmp_path / "c").exists()  # a user's copy is read where it is, not copied into the cache


def test_every_user_path_form_is_accepted(archive: Path, tmp_path: Path) -> None:
    folder = write_cifar_folder(tmp_path / "extracted")
    for given in (archive, archive.parent, folder, folder.parent):
        got = cifar.fetch(given, tmp_path / "c", check_md5=False)
        assert len(got.train_y) == 320, given


def test_generated_archive_is_refused_by_md5_unless_told(archive: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"MD5 [0-9a-f]{32} is not CIFAR-10's c58f3010.*--no-verify-md5"):
        cifar.fetch(archive, tmp_path / "c", check_md5=True)
    with pytest.raises(DataError, match=r"data_batch_1 has MD5 .* not CIFAR-10's c99cafc1"):
        cifar.fetch(write_cifar_folder(tmp_path / "x"), tmp_path / "c", check_md5=True)


def test_counts_are_exact_when_md5_is_checked(archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Past the MD5 check, a batch of 64 examples is still refused: only --no-verify-md5 accepts small archives.
    _published(monkeypatch, cifar_files(), archive)
    with pytest.raises(DataError, match="lists 10 classes of 64 examples a batch, not CIFAR-10's 10 of 10000"):
        cifar.fetch(archive, tmp_path / "c", check_md5=True)


def test_md5_is_checked_before_anything_is_unpickled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("unpickled an unverified file")

    monkeypatch.setattr(cifar, "safe_unpickle", boom)
    with pytest.raises(DataError, match="MD5"):
        cifar.read_archive(write_cifar_archive(tmp_path / "a.tar.gz"), check_md5=True)


class _Evil:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(self.target),))  # runs os.mkdir while a plain pickle.load reads it


def test_restricted_unpickler_refuses_code_even_unverified(tmp_path: Path) -> None:
    files = cifar_files()
    target = tmp_path / "pwned"
    batch = cifar_batch(64, 1, "training batch 1")
    batch[b"labels"] = _Evil(target)
    files["data_batch_1"] = pickle.dumps(batch, protocol=2)
    with pytest.raises(DataError, match=r"data_batch_1: not a CIFAR-10 batch \(refused global posix.mkdir\)"):
        cifar.fetch(write_cifar_folder(tmp_path / "x", files), tmp_path / "c", check_md5=False)
    assert not target.exists()


@pytest.mark.parametrize("protocol", [2, 4])
def test_restricted_unpickler_reads_numpy_arrays(protocol: int) -> None:
    batch = cifar_batch(8, 0, "b")
    got = cifar.safe_unpickle(pickle.dumps(batch, protocol=protocol), "x")
    np.testing.assert_array_equal(got[b"data"], batch[b"data"])
    assert got[b"labels"] == batch[b"labels"]


def _with(name: str, change: dict) -> dict[str, bytes]:
    files = cifar_files()
    obj = pickle.loads(files[name])  # noqa: S301 (our own generated file)
    obj.update(change)
    for k in [k for k, v in change.items() if v is None]:
        del obj[k]
    files[name] = pickle.dumps(obj, protocol=2)
    return files


@pytest.mark.parametrize("files,message", [
    (_with("data_batch_2", {b"data": np.zeros((64, 3072), np.float32)}), "'data' is float32 .*expected uint8"),
    (_with("data_batch_2", {b"data": np.zeros((64, 1024), np.uint8)}), r"'data' is uint8 \[64, 1024\]"),
    (_with("test_batch", {b"labels": [0] * 63}), "64 images, 63 labels"),
    (_with("test_batch", {b"labels": [11] * 64}), "label 11 outside 0..9"),
    (_with("data_batch_5", {b"filenames": None}), r"lacks the keys \['filenames'\]"),
    (_with("batches.meta", {b"label_names": None}), r"batches.meta lacks the keys \['label_names'\]"),
    (_with("batches.meta", {b"num_vis": 1024}), "1024 values per image"),
    ({**cifar_files(), "data_batch_3": b"\x80\x02}q\x00(U\x04data"}, "data_batch_3: unreadable pickle"),
    ({**cifar_files(), "test_batch": pickle.dumps([1, 2], protocol=2)}, "holds a list"),
])
def test_malformed_batches_are_refused(files: dict[str, bytes], message: str, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=message):
        cifar.fetch(write_cifar_archive(tmp_path / cifar.ARCHIVE, files), tmp_path / "c", check_md5=False)


def test_missing_member_and_damaged_archive(tmp_path: Path) -> None:
    files = cifar_files()
    del files["test_batch"]
    with pytest.raises(DataError, match="lacks cifar-10-batches-py/test_batch"):
        cifar.fetch(write_cifar_archive(tmp_path / "a" / cifar.ARCHIVE, files), tmp_path / "c", check_md5=False)
    good = write_cifar_archive(tmp_path / "b" / cifar.ARCHIVE)
    good.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(DataError, match="not a readable .tar.gz"):
        cifar.fetch(good, tmp_path / "c", check_md5=False)
    with pytest.raises(DataError, match="holds neither"):
        cifar.fetch(tmp_path, tmp_path / "c", check_md5=False)


def test_corrupt_cached_archive_is_deleted_and_fetched_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = write_cifar_archive(tmp_path / "server" / cifar.ARCHIVE)
    downloads = []

    def download(path: Path, timeout: float) -> None:  # the network, served from a local file
        downloads.append(timeout)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(source.read_bytes())

    monkeypatch.setattr(cifar, "_download", download)
    cache = tmp_path / "cache"
    assert cifar.fetch(None, cache, check_md5=False).source.startswith(cifar.URL + " (MD5 not checked")
    cached = cache / "cifar10" / cifar.ARCHIVE
    assert cached.read_bytes() == source.read_bytes() and len(downloads) == 1
    assert cifar.fetch(None, cache, check_md5=False).source.startswith(f"cache {cached} ")
    cached.write_bytes(cached.read_bytes()[:-100])
    again = cifar.fetch(None, cache, check_md5=False)
    assert again.source.startswith(cifar.URL) and any("removed" in t for t in again.tried) and len(downloads) == 2


def test_unreachable_url_lists_what_was_tried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cifar, "URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")  # nothing listens on port 9
    with pytest.raises(DataError) as e:
        cifar.fetch(None, tmp_path / "c", timeout=2.0)
    msg = str(e.value)
    assert "\n" not in msg and "cache" in msg and "127.0.0.1:9" in msg and "--data-dir" in msg
    assert not list((tmp_path / "c").rglob("*.tmp*"))  # no partial download left behind


def test_tar_with_bytes_only_no_extraction(archive: Path, tmp_path: Path) -> None:
    # The archive is read in memory: nothing appears beside it.
    before = set(archive.parent.iterdir())
    cifar.read_archive(archive, check_md5=False)
    assert set(archive.parent.iterdir()) == before
    with tarfile.open(archive) as tar:
        assert all(m.name.startswith("cifar-10-batches-py/") for m in tar)


@pytest.mark.parametrize("model", ["cifar-cnn", "fcn-2"])
def test_cli_trains_end_to_end_on_a_generated_archive(model: str, archive: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    code = main(["train", "--dataset", "cifar10", "--data-dir", str(archive), "--no-verify-md5", "--cache-dir",
                 str(tmp_path / "c"), "--model", model, "--width", "8", "--method", "cdni", "--epochs", "2",
                 "--batch-size", "32", "--threads", "1", "--no-plots", "--quiet", "--run-dir", str(run)])
    assert code == 0, capsys.readouterr().err
    epochs = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "epoch"]
    assert [r["step"] for r in epochs] == [10, 20] and all(0 <= r["test_accuracy"] <= 1 for r in epochs)
    from synthgrad.trainer import load_network

    net, cfg = load_network(run / "final.pt")
    assert cfg.input_shape == [3, 32, 32] and cfg.num_classes == 10
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_cli_refuses_the_generated_archive_by_md5(archive: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    code = main(["train", "--dataset", "cifar10", "--data-dir", str(archive), "--cache-dir", str(tmp_path / "c"),
                 "--run-dir", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 3 and len(err.splitlines()) == 1 and "MD5" in err and "--no-verify-md5" in err
