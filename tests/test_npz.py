"""A user's .npz dataset: the documented layout loads, every broken file gets its own message, the CLI trains on it."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import write_npz

from synthgrad import data, npz
from synthgrad.cli import main
from synthgrad.errors import DataError


def test_layout_loads_with_shapes_labels_and_classes(tmp_path: Path) -> None:
    names = np.array(["zero", "one", "two", "three", "four"])
    ds = data.load_dataset(write_npz(tmp_path / "d.npz", shape=(28, 28), classes=5, names=names))
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 5 and ds.classes == tuple(names)
    assert ds.train_x.shape == (256, 1, 28, 28) and ds.train_y.dtype == torch.int64
    assert ds.source == f"file {tmp_path / 'd.npz'}"


def test_float_images_are_taken_as_they_are_then_standardised(tmp_path: Path) -> None:
    # Oracle: float images x and uint8 images round(255 x) load to the same standardised tensors (up to rounding).
    rng = np.random.default_rng(1)
    x = rng.random((40, 3, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, 40)
    as_u8 = np.round(x * 255).astype(np.uint8)
    f = data.load_dataset(write_npz(tmp_path / "f.npz", train_x=x, train_y=y, test_x=x[:5], test_y=y[:5]))
    u = data.load_dataset(write_npz(tmp_path / "u.npz", train_x=as_u8, train_y=y, test_x=as_u8[:5], test_y=y[:5]))
    torch.testing.assert_close(f.train_x, u.train_x, atol=0.02, rtol=0)
    assert f.num_classes == 3 and f.classes == ("0", "1", "2")  # no names given: the label values


def _saved(tmp_path: Path, **arrays: np.ndarray | None) -> Path:
    return write_npz(tmp_path / "bad.npz", shape=(8, 8), classes=3, n_train=20, n_test=6, **arrays)


X8 = np.zeros((20, 8, 8), np.uint8)


@pytest.mark.parametrize("arrays,message", [
    ({"test_y": None}, r"missing test_y \(it has train_x, train_y, test_x\)"),
    ({"train_x": np.zeros((20, 1, 1, 8, 8), np.uint8)}, r"train_x has shape \[20, 1, 1, 8, 8\]; give images"),
    ({"train_x": np.zeros((20, 64), np.float32)}, r"train images are \[64\] but test images \[1, 8, 8\]"),
    ({"train_x": np.zeros((20, 32, 32, 3), np.uint8)}, "looks channels-last.*transpose"),
    ({"train_x": np.zeros((20, 8, 8), np.int16)}, "train_x is int16; images must be uint8"),
    ({"train_x": np.full((20, 8, 8), np.nan, np.float32)}, "train_x holds 1280 NaN or infinite values"),
    ({"train_y": np.zeros(20, np.float32)}, r"train_y is float32; convert them with train_y.astype\(np.int64\)"),
    ({"train_y": np.zeros((20, 3), np.int64)}, r"train_y has shape \[20, 3\]; labels must be one integer"),
    ({"test_y": -np.ones(6, np.int64)}, "test_y holds the label -1"),
    ({"train_y": np.zeros(19, np.int64)}, "train_x has 20 examples but train_y has 19 labels"),
    ({"test_x": np.zeros((0, 8, 8), np.uint8), "test_y": np.zeros(0, np.int64)}, "the test split is empty"),
    ({"test_x": np.zeros((6, 9, 9), np.uint8)}, r"train images are \[1, 8, 8\] but test images \[1, 9, 9\]"),
    ({"names": np.array(["a", "b"])}, "labels go up to 2 but classes names only 2"),
    ({"names": np.array([1, 2, 3])}, "give the K class names as a string array"),
    ({"train_y": np.zeros(20, np.int64), "test_y": np.zeros(6, np.int64)}, "needs at least two classes"),
])
def test_every_broken_layout_has_its_message(arrays: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=message):
        data.load_dataset(_saved(tmp_path, **arrays))


def test_files_that_are_not_npz(tmp_path: Path) -> None:
    text = tmp_path / "notes.npz"
    text.write_text("not an archive")
    with pytest.raises(DataError, match="not an .npz archive"):
        npz.read(text)
    with pytest.raises(DataError, match="no such file"):
        npz.read(tmp_path / "missing.npz")
    objects = tmp_path / "objects.npz"
    np.savez(objects, train_x=np.array([object()] * 3), train_y=np.zeros(3), test_x=X8, test_y=np.zeros(20))
    with pytest.raises(DataError, match="object arrays, which only pickle can read"):
        npz.read(objects)
    # A damaged member: one flipped byte in the stored array data fails the zip's CRC check.
    good = write_npz(tmp_path / "crc.npz", shape=(8, 8), classes=3, n_train=20, n_test=6)
    with zipfile.ZipFile(good) as z:
        info = z.getinfo("train_x.npy")
    raw = bytearray(good.read_bytes())
    raw[info.header_offset + 30 + len(info.filename) + 200] ^= 0xFF
    good.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="not a readable .npz.*BadZipFile"):
        npz.read(good)


def _train(dataset: Path, model: str, run: Path, *extra: str) -> list[str]:
    return ["train", "--dataset", str(dataset), "--model", model, "--width", "8", "--method", "dni",
            "--synth-width", "16", "--max-steps", "6", "--batch-size", "32", "--threads", "1", "--no-plots",
            "--quiet", "--run-dir", str(run), *extra]


@pytest.mark.parametrize("shape,classes", [((3, 32, 32), 10), ((1, 28, 28), 5)])
@pytest.mark.parametrize("model", ["cnn", "mlp"])
def test_cli_models_train_on_another_shape(shape: tuple, classes: int, model: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    f = write_npz(tmp_path / "mine.npz", shape=shape, classes=classes)
    run = tmp_path / "run"
    assert main(_train(f, model, run)) == 0, capsys.readouterr().err
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["input_shape"] == list(shape) and cfg["num_classes"] == classes and cfg["dataset"] == str(f)
    from synthgrad.trainer import load_network

    net, _ = load_network(run / "final.pt")  # rebuilt from config.json alone
    assert net(torch.zeros(2, *shape)).shape == (2, classes)


def test_feature_vectors_train_the_mlps_and_an_image_model_says_what_to_choose(tmp_path: Path,
                                                                               capsys: pytest.CaptureFixture) -> None:
    # Tabular data: [N, D] float features, standardised feature by feature with the training split's numbers.
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((300, 20)) * 3 + 5).astype(np.float32)
    y = (x[:, 0] > 5).astype(np.int64) + (x[:, 1] > 5)
    f = tmp_path / "tab.npz"
    np.savez(f, train_x=x[:240], train_y=y[:240], test_x=x[240:], test_y=y[240:])
    ds = data.load_dataset(f)
    assert ds.input_shape == (20,) and ds.num_classes == 3
    torch.testing.assert_close(ds.train_x.mean(0), torch.zeros(20), atol=1e-5, rtol=0)
    torch.testing.assert_close(ds.train_x.std(0), torch.ones(20), atol=1e-5, rtol=0)
    for model in ("mlp", "resmlp"):
        run = tmp_path / model
        assert main(_train(f, model, run, "--method", "cdni")) == 0, capsys.readouterr().err
        assert json.loads((run / "config.json").read_text())["input_shape"] == [20]
    capsys.readouterr()
    assert main(_train(f, "vit-mini", tmp_path / "vit")) == 2
    assert "vit-mini needs image inputs [C, H, W], got shape (20,); for feature vectors [D] choose mlp" in (
        capsys.readouterr().err)


def test_resume_with_other_data_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    f = write_npz(tmp_path / "mine.npz", shape=(3, 16, 16), classes=4)
    run = tmp_path / "run"
    assert main(_train(f, "mlp", run, "--checkpoint-every", "2")) == 0
    write_npz(f, shape=(3, 16, 16), classes=6)  # the file changed under the run
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--quiet", "--no-plots"]) == 2
    assert "trained on inputs [3, 16, 16] with 4 classes" in capsys.readouterr().err


def test_unknown_dataset_flag_is_refused_by_the_parser(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["train", "--dataset", "nope.txt"])
    assert e.value.code == 2 and "unknown dataset 'nope.txt'" in capsys.readouterr().err


@pytest.mark.parametrize("args,code,message", [
    (["--dataset", "{missing}"], 3, "no such file"),
    (["--dataset", "{tiny}", "--batch-size", "64"], 2, "--batch-size 64 is larger than the 20 training examples"),
    (["--dataset", "{tiny}", "--data-dir", "/tmp"], 2, "--data-dir applies to mnist"),
    (["--dataset", "{tiny}", "--model", "cnn"], 2, r"model cnn cannot take inputs of shape \[1, 2, 2\]"),
])
def test_cli_errors_are_one_line(args: list[str], code: int, message: str, tmp_path: Path,
                                 capsys: pytest.CaptureFixture) -> None:
    tiny = write_npz(tmp_path / "tiny.npz", shape=(2, 2), classes=2, n_train=20, n_test=4)
    args = [a.format(missing=tmp_path / "missing.npz", tiny=tiny) for a in args]
    assert main(["train", *args, "--max-steps", "2", "--quiet", "--no-plots", "--run-dir", str(tmp_path / "r")]) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "r").exists()  # refused before the run directory is made


def test_trainer_used_directly_records_the_data_shape(tmp_path: Path) -> None:
    from synthgrad.config import TrainConfig
    from synthgrad.trainer import Progress, Trainer, load_network, prepare_run_dir

    f = write_npz(tmp_path / "mine.npz", shape=(2, 12, 12), classes=3)
    cfg = TrainConfig(model="cnn", dataset=str(f), method="backprop", width=4, max_steps=2).resolve()
    run = tmp_path / "run"
    prepare_run_dir(run, overwrite=False)
    t = Trainer(cfg, data.load(str(f)), run, progress=Progress(enabled=False))
    t.start()
    t.fit()
    assert json.loads((run / "config.json").read_text())["input_shape"] == [2, 12, 12]
    net, _ = load_network(run / "final.pt")
    assert net(torch.zeros(1, 2, 12, 12)).shape == (1, 3)
