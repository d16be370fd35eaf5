"""MNIST and Fashion-MNIST from idx files written here (no download): RGB images of three
equal channels with the right labels, pretrain.py and linear_eval.py on them, and one clear
line when the files are missing."""
import gzip
import json
import struct

import numpy as np
import pytest

import data
from conftest import TINY, run_script


def idx_bytes(array, magic):
    """The idx format of the MNIST files: big-endian int32 magic and dimensions, then uint8."""
    return struct.pack(">i", magic) + b"".join(struct.pack(">i", n) for n in array.shape) + array.tobytes()


def write_idx(root, folder="FashionMNIST", n_train=40, n_test=20, gz=("train-images-idx3-ubyte",)):
    """Generated images (a bright square whose place depends on the class) and labels in
    torchvision's layout root/FOLDER/raw; the files named in gz are written gzipped only."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28), dtype=np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 * c:2 * c + 8, 4:12] = 250
        for name, array, magic in ((f"{prefix}-images-idx3-ubyte", images, 2051),
                                   (f"{prefix}-labels-idx1-ubyte", labels, 2049)):
            content = idx_bytes(array, magic)
            if name in gz:
                with gzip.open(raw / (name + ".gz"), "wb") as f:
                    f.write(content)
            else:
                (raw / name).write_bytes(content)
        written[prefix] = images, labels
    return written


@pytest.mark.parametrize("name,folder", [("fashionmnist", "FashionMNIST"), ("mnist", "MNIST")])
def test_images_are_rgb_with_three_equal_channels_and_their_labels(tmp_path, name, folder):
    written = write_idx(tmp_path, folder)
    for split, prefix in (("train", "train"), ("pretrain", "train"), ("test", "t10k")):
        dataset = data.build_dataset(name, str(tmp_path), split)
        images, labels = written[prefix]
        assert len(dataset) == len(labels) and data.num_classes(dataset) == 10
        assert np.array_equal(data.labels_of(dataset), labels)
        for i in (0, 7, len(labels) - 1):
            img, label = dataset[i]
            pixels = np.asarray(img)
            assert img.mode == "RGB" and pixels.shape == (28, 28, 3) and label == labels[i]
            assert all(np.array_equal(pixels[..., c], images[i]) for c in range(3))
    assert (tmp_path / folder / "raw" / "train-images-idx3-ubyte").exists()  # unpacked from the .gz
    assert data.NATIVE_SIZE[name] == 28


def test_pretrain_and_linear_eval_on_fashionmnist(tmp_path):
    write_idx(tmp_path, n_train=64, n_test=20, gz=("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))
    result = run_script(["pretrain.py", *TINY, "--dataset", "fashionmnist", "--data-dir", tmp_path, "--epochs", "1",
                         "--knn-every", "1", "--knn-k", "10", "--out", "out"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    settings = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    assert settings["image_size"] == 28 and settings["cifar_stem"] is True  # native size, CIFAR recipe
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and 0 <= log[0]["knn_top1"] <= 100
    evaluated = run_script(["linear_eval.py", tmp_path / "out" / "encoder.pt", "--cached-features", "--epochs", "2",
                            "--batch-size", "16", "--knn-k", "10", "--workers", "0"], tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert evaluated.stdout.strip().splitlines()[-1].startswith("top-1 accuracy: ")


def test_missing_files_are_one_line_naming_them_and_the_folder(tmp_path, monkeypatch):
    from torchvision import datasets
    monkeypatch.setattr(datasets.FashionMNIST, "mirrors", ["http://127.0.0.1:9/"])  # refused at once
    with pytest.raises(data.DataError) as info:
        data.build_dataset("fashionmnist", str(tmp_path), "pretrain")
    message = str(info.value)
    raw = str(tmp_path / "FashionMNIST" / "raw")
    assert "\n" not in message and "download failed" in message and raw in message
    assert all(name in message for name in data.IDX_FILES) and "dataset-fashion-mnist" in message
    assert f"--data-dir {tmp_path}" in message


def test_missing_files_stop_pretrain_with_one_line(tmp_path, monkeypatch):
    # Any download goes to a proxy that refuses at once, so the test cannot wait on the network.
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    result = run_script(["pretrain.py", *TINY, "--dataset", "mnist", "--data-dir", tmp_path / "nothing",
                         "--epochs", "1", "--out", "out"], tmp_path, timeout=120)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "pretrain.py: error:" in line]
    assert len(errors) == 1 and "MNIST" in errors[0] and "t10k-labels-idx1-ubyte" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_a_corrupt_gz_is_one_line(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(data.DataError) as info:
        data.build_dataset("fashionmnist", str(tmp_path), "train")
    assert "cannot unpack" in str(info.value) and "\n" not in str(info.value)
