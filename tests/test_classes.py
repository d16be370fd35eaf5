"""Labelled folders whose val/ does not hold the same class folders as train/: the training split's
sorted class names number the labels of both, a val/ class that train/ lacks is one line, a train/
class without val/ images a note. Checked in data.py and through every script that pairs two
splits: linear_eval.py, finetune.py, pretrain.py's kNN monitor (--knn-data) and linear_eval.py
--checkpoint-classifier."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import data
import finetune
import linear_eval
import pretrain
from inprocess import error_lines, run_main
from model import build_encoder, save_encoder

COLOURS = {"chelsea": (220, 40, 40), "coffee": (40, 200, 40), "rocket": (40, 40, 220), "astronaut": (230, 230, 40)}


def solid_folder(root, classes, n, seed=0):
    """root/CLASS/CLASSi.png: n images of the class's colour with a little noise (an easy task)."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            img = np.clip(np.array(COLOURS[c]) + rng.normal(0, 12, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / c / f"{c}{i}.png")


@pytest.fixture
def lab(tmp_path):
    """lab/train/{chelsea,coffee,rocket}; val folders made by each test."""
    solid_folder(tmp_path / "lab" / "train", ("chelsea", "coffee", "rocket"), 8)
    return tmp_path / "lab"


def test_val_labels_are_numbered_by_the_training_classes(lab):
    solid_folder(lab / "val", ("coffee", "rocket"), 2, seed=1)
    test = data.build_dataset("imagefolder", str(lab), "test")
    assert test.classes == ["chelsea", "coffee", "rocket"] and test.absent_classes == ["chelsea"]
    # coffee is class 1 in train/: ImageFolder alone numbers val/'s coffee 0 and rocket 1
    assert [(p.split("/")[-2], y) for p, y in test.samples] == [("coffee", 1)] * 2 + [("rocket", 2)] * 2
    assert list(data.labels_of(test)) == [1, 1, 2, 2]
    assert "has no images of 1 of the 3 training classes (chelsea)" in data.class_note(test)
    assert "chelsea" in data.class_note(data.first_images(test, 3))  # --max-images keeps the note
    solid_folder(lab / "val", ("astronaut",), 1)
    with pytest.raises(data.DataError, match=r"val has class folder astronaut that .*train lacks"):
        data.build_dataset("imagefolder", str(lab), "test")


def test_linear_eval_scores_a_val_folder_without_one_class_correctly(lab, tmp_path, capsys, monkeypatch):
    """A control with every class reaches 100% on these colours; the same val/ without rocket must too
    (with per-split numbering it scored the coffee images as chelsea, the rocket ones as coffee)."""
    torch.manual_seed(0)
    save_encoder(tmp_path / "enc.pt", build_encoder("resnet18", width=0.25, cifar_stem=True),
                 dataset="imagefolder", data_dir=str(lab), image_size=16)
    flags = ["--cached-features", "--epochs", "40", "--lr", "2", "--workers", "0", "--batch-size", "24"]
    solid_folder(lab / "val", ("chelsea", "coffee", "rocket"), 3, seed=1)
    code, out, err = run_main(linear_eval, [tmp_path / "enc.pt", *flags, "--out", tmp_path / "all.json"],
                              capsys, monkeypatch)
    assert code == 0 and json.loads((tmp_path / "all.json").read_text())["top1"] == 100.0, out[-1500:] + err
    for image in (lab / "val" / "chelsea").iterdir():
        image.unlink()
    (lab / "val" / "chelsea").rmdir()
    code, out, err = run_main(linear_eval, [tmp_path / "enc.pt", *flags, "--out", tmp_path / "two.json"],
                              capsys, monkeypatch)
    res = json.loads((tmp_path / "two.json").read_text())
    assert code == 0 and res["top1"] == 100.0 and res["knn_top1"] == 100.0 and res["test_images"] == 6, out
    assert "note: " in out and "has no images of 1 of the 3 training classes (chelsea)" in out

    solid_folder(lab / "val", ("astronaut",), 2)
    code, out, err = run_main(linear_eval, [tmp_path / "enc.pt", *flags, "--out", tmp_path / "x.json"],
                              capsys, monkeypatch)
    lines = error_lines(err, "linear_eval")
    assert code == 2 and len(lines) == 1 and "class folder astronaut that" in lines[0], err
    assert not (tmp_path / "x.json").exists()


def test_finetune_and_the_stored_classifier_map_classes_by_name(lab, tmp_path, capsys, monkeypatch):
    """(Fine-tuning 24 images for a few steps leaves BN's running statistics far from the batch ones,
    so its accuracy here says little: the labels it is scored against are checked instead.)"""
    torch.manual_seed(0)
    encoder = build_encoder("resnet18", width=0.25, cifar_stem=True)
    save_encoder(tmp_path / "enc.pt", encoder, dataset="imagefolder", data_dir=str(lab), image_size=16)
    solid_folder(lab / "val", ("coffee", "rocket"), 3, seed=1)
    scored = []  # the labels finetune.py scores its test predictions against
    real_topk = finetune.topk_accuracy
    monkeypatch.setattr(finetune, "topk_accuracy", lambda s, y, ks: scored.append(y.tolist()) or real_topk(s, y, ks))
    code, out, err = run_main(finetune, [tmp_path / "enc.pt", "--label-fraction", "1", "--epochs", "1",
                                         "--workers", "0", "--out", tmp_path / "ft.json"], capsys, monkeypatch)
    res = json.loads((tmp_path / "ft.json").read_text())
    # coffee and rocket are classes 1 and 2 of train/ (val/'s own numbering: 0 and 1)
    assert code == 0 and res["classes"] == 3 and scored == [[1, 1, 1, 2, 2, 2]], out[-2000:] + err
    assert "has no images of 1 of the 3 training classes (chelsea)" in out

    # a stored classifier: reads the coffee/rocket directions of h; val/ alone, with fewer class folders
    # than the classifier has classes, cannot be numbered as the classifier was trained
    classifier = {"weight": torch.zeros(3, encoder.feature_dim), "bias": torch.zeros(3), "head_layer": 0}
    save_encoder(tmp_path / "cls.pt", encoder, classifier=classifier, dataset="imagefolder", image_size=16)
    solid_folder(tmp_path / "valonly" / "val", ("coffee", "rocket"), 1)
    code, out, err = run_main(linear_eval, [tmp_path / "cls.pt", "--checkpoint-classifier", "--data-dir",
                                            tmp_path / "valonly", "--workers", "0"], capsys, monkeypatch)
    lines = error_lines(err, "linear_eval")
    assert code == 2 and len(lines) == 1 and "has 2 class folders and no" in lines[0], err
    code, out, err = run_main(linear_eval, [tmp_path / "cls.pt", "--checkpoint-classifier", "--data-dir", lab,
                                            "--workers", "0", "--out", tmp_path / "c.json"], capsys, monkeypatch)
    assert code == 0 and "(chelsea)" in out, err  # with train/ beside it: numbered by its names, and the note


def test_knn_monitor_numbers_knn_data_val_by_its_train(lab, tmp_path, capsys, monkeypatch):
    """pretrain.py --dataset folder --knn-data: the kNN monitor's labels, and the folder's count."""
    solid_folder(lab / "val", ("coffee", "rocket"), 3, seed=1)
    (lab / "train" / "chelsea" / "notes.txt").write_text("not an image")
    (lab / "train" / ".DS_Store").write_bytes(b"\0")
    code, out, err = run_main(pretrain, ["--dataset", "folder", "--data-dir", lab / "train", "--knn-data", lab,
                                         "--knn-every", "1", "--epochs", "1", "--image-size", "16", "--arch", "resnet18",
                                         "--width", "0.25", "--batch-size", "24", "--workers", "0", "--out",
                                         tmp_path / "run"], capsys, monkeypatch)
    assert code == 0, err[-2000:]
    assert f"folder: 24 images under {lab / 'train'} (left out while listing: 1 hidden, 1 other files)" in out
    assert "has no images of 1 of the 3 training classes (chelsea); the kNN accuracy" in out
    assert "epoch 1 kNN top-1 100.00% (k=200, 24 train / 6 test images" in out, out[-2000:]
