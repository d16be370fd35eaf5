"""--dataset folder: every image under a folder in any layout, unlabeled; pretrain.py on it, the kNN
monitor from --knn-data, and the evaluation scripts pointed at a labelled folder."""
import json
import os

import numpy as np
import pytest
from PIL import Image
import torch

import data

ARGS = ["--dataset", "folder", "--data-dir", "imgs", "--image-size", "32", "--arch", "resnet18", "--width", "0.25",
        "--batch-size", "16", "--warmup-epochs", "1", "--log-every", "2", "--workers", "0"]


def png(path, seed, size=36):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def test_every_image_in_any_layout_sorted_hidden_and_non_images_left_out(tmp_path):
    root = tmp_path / "imgs"
    wanted = ["a/b/c/deep.png", "a/x.JPG", "a/y.jpeg", "top.PNG", "z/w.webp", "z/w2.tif"]
    for i, name in enumerate(wanted):
        png(root / name, i)  # PNG bytes whatever the extension: listing goes by the name alone
    (root / "notes.txt").write_text("not an image")
    (root / "a" / "b" / "labels.csv").write_text("x,1")
    png(root / ".hidden.png", 10)
    png(root / ".cache" / "thumb.png", 11)
    png(tmp_path / "elsewhere" / "linked.png", 12)
    os.symlink(tmp_path / "elsewhere", root / "link")          # a linked folder is followed
    os.symlink(tmp_path / "elsewhere", root / "a" / "link2")   # a second link to it adds nothing
    os.symlink(root, root / "a" / "b" / "loop")                # a loop back up the tree is cut
    os.symlink(tmp_path / "gone", root / "dangling")           # a dangling link is ignored
    paths = data.list_images(str(root))
    rel = [os.path.relpath(p, root) for p in paths]
    assert paths == sorted(paths)
    # "elsewhere" is reached through two links; whichever the walk meets first lists it
    assert [r for r in rel if "linked.png" not in r] == sorted(wanted)
    assert len([r for r in rel if r.endswith("linked.png")]) == 1
    ds = data.build_dataset("folder", str(root), "pretrain")
    assert len(ds) == len(wanted) + 1 and [p for p, _ in ds.samples] == paths
    img, label = ds[rel.index("top.PNG")]
    with Image.open(root / "top.PNG") as f:  # the file's own pixels, as uint8 (3, H, W)
        expected = np.asarray(f.convert("RGB")).transpose(2, 0, 1)
    assert img.dtype == torch.uint8 and img.shape == (3, 36, 36) and label == -1
    assert np.array_equal(img.numpy(), expected)


@pytest.mark.parametrize("layout", ["empty", "no_images", "missing"])
def test_a_folder_without_images_is_one_line(tmp_path, layout):
    root = tmp_path / "imgs"
    if layout != "missing":
        root.mkdir()
    if layout == "no_images":
        (root / "sub").mkdir()
        (root / "sub" / "readme.txt").write_text("x")
        png(root / ".hidden.png", 0)
    with pytest.raises(data.DataError) as e:
        data.build_dataset("folder", str(root), "pretrain")
    text = str(e.value)
    assert "\n" not in text
    assert ("is not a directory" in text) if layout == "missing" else ("no images under" in text and ".jpg" in text)
    with pytest.raises(data.DataError, match="has no labels.*--dataset imagefolder"):
        data.build_dataset("folder", str(root), "train")


def labelled_folder(root, n_per_class=8):
    for split in ("train", "val"):
        for c in range(2):
            for i in range(n_per_class):
                png(root / split / f"c{c}" / f"{i}.png", 1000 * c + i + (0 if split == "train" else 500), size=32)


def test_pretrain_on_a_nested_folder_resumes_and_evaluates_on_a_labelled_one(run, tmp_path):
    root = tmp_path / "imgs"
    for i in range(63):  # 63 good + 1 corrupt = 4 batches of 16: every file in every epoch
        png(root / f"day{i % 3}" / f"cam{i % 2}" / f"img{i:02d}.png", i)
    (root / "day1" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "day2" / "notes.txt").write_text("field notes")
    labelled_folder(tmp_path / "labelled")

    first = run("pretrain.py", *ARGS, "--epochs", "1", "--out", "out")
    assert "kNN" not in first.stdout  # no labels: the monitor is off
    assert f"warning: skipping unreadable image {os.path.join('imgs', 'day1', 'broken.jpg')} (" in first.stderr
    second = run("pretrain.py", *ARGS, "--epochs", "2", "--out", "out", "--resume", "--knn-data", "labelled")
    assert "resumed from" in second.stdout and "epoch 2 kNN top-1" in second.stdout
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and [r["unreadable_images"] for r in log] == [1, 1]
    assert "knn_top1" not in log[0] and 0 <= log[1]["knn_top1"] <= 100

    refused = run("linear_eval.py", "out/encoder.pt", "--epochs", "1", check=False)
    assert refused.returncode == 2 and "has no labels" in refused.stderr and "Traceback" not in refused.stderr
    result = run("linear_eval.py", "out/encoder.pt", "--dataset", "imagefolder", "--data-dir", "labelled",
                 "--epochs", "1", "--batch-size", "16", "--cached-features", "--workers", "0")
    assert "top-1 accuracy:" in result.stdout
    settings = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    assert settings["image_size"] == 32  # the pretraining size, not imagefolder's 224


def test_strict_data_and_knn_without_labels_are_one_line(run, tmp_path):
    root = tmp_path / "imgs"
    for i in range(15):
        png(root / "a" / f"{i}.png", i)
    (root / "a" / "0bad.jpg").write_bytes(b"")
    strict = run("pretrain.py", *ARGS, "--epochs", "1", "--out", "out", "--strict-data", check=False)
    errors = [line for line in strict.stderr.splitlines() if line.startswith("pretrain.py: error:")]
    assert strict.returncode == 2 and len(errors) == 1 and "0bad.jpg" in errors[0], strict.stderr[-2000:]
    knn = run("pretrain.py", *ARGS, "--epochs", "1", "--out", "out2", "--knn-every", "1", check=False)
    assert knn.returncode == 2 and "--knn-data" in knn.stderr and "Traceback" not in knn.stderr
