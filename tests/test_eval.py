"""linear_eval.py and finetune.py end to end on generated data."""
import copy
import json
import re
import sys

import pytest
import torch

import finetune
import linear_eval
from conftest import TINY, run_script
from model import load_encoder

FAST = ["--workers", "0", "--batch-size", "16", "--epochs", "2", "--knn-k", "20"]
LAST_LINE = re.compile(r"^top-1 accuracy: \d+\.\d\d%$")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pretrained")
    result = run_script(["pretrain.py", *TINY, "--epochs", "1", "--out", "run"], folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "run"


def run_ok(args, cwd, torchrun=0):
    result = run_script(args, cwd, torchrun=torchrun)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert LAST_LINE.match(result.stdout.strip().splitlines()[-1]), result.stdout[-500:]
    return result


def test_linear_eval_paper_protocol_end_to_end(pretrained, tmp_path):
    result = run_ok(["linear_eval.py", pretrained / "encoder.pt", *FAST, "--progress-every", "0"], tmp_path)
    res = json.loads((pretrained / "encoder.linear.json").read_text())
    assert res["dataset"] == "synthetic" and res["image_size"] == 32  # from the checkpoint
    assert res["train_images"] == 64 and res["test_images"] == 16 and res["classes"] == 10
    assert not res["cached_features"] and not res["random_init"]
    assert 0 <= res["top1"] <= res["top5"] <= 100
    assert f"top-1 accuracy: {res['top1']:.2f}%" in result.stdout and "top-5" in result.stdout
    # no pass over the training set's un-augmented images, hence no kNN, unless --knn
    assert res["knn_top1"] is None and "kNN" not in result.stdout and "train features" not in result.stdout
    assert sorted(res["phase_seconds"]) == ["test_features", "train"]
    assert re.search(r"^test features: 16/16 images \(100%\), \d+ img/s, elapsed \d:\d\d:\d\d, ETA 0:00:00$",
                     result.stdout, re.M)
    assert re.search(r"^epoch 2/2: 64/64 images \(100%\)", result.stdout, re.M)  # 4 steps x batch 16


def test_linear_eval_knn_and_max_images(pretrained, tmp_path):
    result = run_ok(["linear_eval.py", pretrained / "encoder.pt", *FAST, "--knn", "--max-images", "12",
                     "--batch-size", "8", "--epochs", "1", "--progress-every", "0"], tmp_path)
    res = json.loads((pretrained / "encoder.linear_first12.json").read_text())  # not the full run's file
    assert res["train_images"] == 12 and res["test_images"] == 12 and res["max_images"] == 12
    assert res["classes"] == 10 and 0 <= res["knn_top1"] <= 100 and "kNN (k=20, t=0.1)" in result.stdout
    assert sorted(res["phase_seconds"]) == ["knn", "test_features", "train", "train_features"]
    assert "train features: 12/12 images (100%)" in result.stdout


def test_full_checkpoint_and_export_give_the_same_features(pretrained, tmp_path):
    a = run_ok(["linear_eval.py", pretrained / "encoder.pt", *FAST, "--cached-features", "--out", "a.json"], tmp_path)
    b = run_ok(["linear_eval.py", pretrained / "ckpt.pt", *FAST, "--cached-features", "--out", "b.json"], tmp_path)
    ra, rb = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert ra["knn_top1"] == rb["knn_top1"] and ra["top1"] == rb["top1"]
    assert a.stdout.splitlines()[-1] == b.stdout.splitlines()[-1]


def test_random_init_baseline_and_output_names(pretrained, tmp_path):
    run_ok(["linear_eval.py", pretrained / "encoder.pt", *FAST, "--cached-features", "--random-init"], tmp_path)
    res = json.loads((pretrained / "encoder.linear_random_init_cached.json").read_text())
    assert res["random_init"] and res["cached_features"]


def test_torchrun_counts_every_test_image_once(pretrained, tmp_path):
    one = run_ok(["linear_eval.py", pretrained / "encoder.pt", *FAST, "--cached-features", "--out", "one.json"],
                 tmp_path)
    # 16 test images over 2 processes x batch 8 and 64 training images: same features, same classifier.
    two = run_ok(["linear_eval.py", pretrained / "encoder.pt", *FAST, "--cached-features", "--out", "two.json"],
                 tmp_path, torchrun=2)
    r1, r2 = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert r2["processes"] == 2 and r2["test_images"] == r1["test_images"] == 16
    assert r2["knn_top1"] == r1["knn_top1"]
    assert r2["top1"] == pytest.approx(r1["top1"]) and r2["top5"] == pytest.approx(r1["top5"])
    assert one.stdout.splitlines()[-1] == two.stdout.splitlines()[-1]


def run_in_process(module, monkeypatch, ckpt, args, encoder):
    """main() of a script in this process, on the CPU, with load_encoder returning `encoder` itself."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the checks compare with CPU tensors
    _, saved = load_encoder(ckpt)
    monkeypatch.setattr(module, "load_encoder", lambda path: (encoder, saved))
    monkeypatch.setattr(sys, "argv", [module.__name__ + ".py", str(ckpt), *args])
    module.main()


def test_linear_eval_keeps_the_encoder_frozen_and_in_eval_mode(pretrained, tmp_path, monkeypatch):
    encoder, _ = load_encoder(pretrained / "encoder.pt")
    before = copy.deepcopy(encoder.state_dict())
    run_in_process(linear_eval, monkeypatch, pretrained / "encoder.pt",
                   [*FAST, "--out", str(tmp_path / "r.json")], encoder)  # with augmentation: encoder runs every step
    assert not encoder.training
    for k, v in encoder.state_dict().items():  # weights and BN running statistics
        assert torch.equal(v, before[k]), k


def test_finetune_trains_the_whole_encoder(pretrained, tmp_path, monkeypatch):
    encoder, _ = load_encoder(pretrained / "encoder.pt")
    before = copy.deepcopy(encoder.state_dict())
    run_in_process(finetune, monkeypatch, pretrained / "encoder.pt",
                   ["--label-fraction", "0.5", "--workers", "0", "--batch-size", "16", "--epochs", "2",
                    "--out", str(tmp_path / "f.json")], encoder)
    assert not torch.equal(encoder.conv1.weight, before["conv1.weight"])
    assert not torch.equal(encoder.layer4[1].bn2.weight, before["layer4.1.bn2.weight"])
    res = json.loads((tmp_path / "f.json").read_text())
    # 64 images, classes of 7 (0-3) and 6 (4-9): half of each, rounded, is 4 and 3 images
    assert res["label_fraction"] == 0.5 and res["test_images"] == 16 and res["train_images"] == 4 * 4 + 6 * 3


def test_finetune_end_to_end_and_subset_file(pretrained, tmp_path):
    run_ok(["finetune.py", pretrained / "encoder.pt", "--label-fraction", "0.5", "--workers", "0",
            "--batch-size", "16", "--epochs", "1"], tmp_path)
    res = json.loads((pretrained / "encoder.finetune_50pct.json").read_text())
    assert res["epochs"] == 1 and res["train_images"] == 34 and 0 <= res["top1"] <= 100
    (tmp_path / "ids.txt").write_text("\n".join(str(i) for i in range(0, 64, 2)))
    run_ok(["finetune.py", pretrained / "encoder.pt", "--subset-file", tmp_path / "ids.txt", "--workers", "0",
            "--batch-size", "16", "--epochs", "1", "--out", "s.json"], tmp_path)
    assert json.loads((tmp_path / "s.json").read_text())["train_images"] == 32
    quick = run_ok(["finetune.py", pretrained / "encoder.pt", "--label-fraction", "0.5", "--workers", "0",
                    "--batch-size", "8", "--epochs", "1", "--max-images", "10", "--progress-every", "0"], tmp_path)
    res = json.loads((pretrained / "encoder.finetune_50pct_first10.json").read_text())
    assert res["train_images"] == 10 and res["test_images"] == 10 and sorted(res["phase_seconds"]) == ["test", "train"]
    assert "epoch 1/1: 8/8 images (100%)" in quick.stdout and "test: 10/10 images (100%)" in quick.stdout


def test_finetune_under_torchrun(pretrained, tmp_path):
    run_ok(["finetune.py", pretrained / "encoder.pt", "--label-fraction", "0.5", "--workers", "0",
            "--batch-size", "16", "--epochs", "1", "--out", "t.json"], tmp_path, torchrun=2)
    assert json.loads((tmp_path / "t.json").read_text())["test_images"] == 16


def test_a_training_set_smaller_than_the_batch_is_the_batch(pretrained, tmp_path):
    """64 training images and --batch-size 128 (the ImageNet default 4096 on a small folder): the whole
    set is one batch, the learning rate scaled for it, and one note says so."""
    result = run_ok(["linear_eval.py", pretrained / "encoder.pt", *FAST, "--batch-size", "128", "--cached-features",
                     "--out", "small.json"], tmp_path)
    res = json.loads((tmp_path / "small.json").read_text())
    assert res["batch_size"] == 64 and res["peak_lr"] == pytest.approx(0.1 * 64 / 256)
    notes = [line for line in result.stdout.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "64 images, fewer than --batch-size 128" in notes[0] and "0.025 = 0.1 x 64/256" in notes[0]
    # fine-tuning on 10 labelled images (5%: one per class) with --batch-size 64, one process and two;
    # with two, the batch is the largest multiple of the processes (10 of 11 images)
    result = run_ok(["finetune.py", pretrained / "encoder.pt", "--label-fraction", "0.05", "--batch-size", "64",
                     "--workers", "0", "--epochs", "1", "--out", "f.json"], tmp_path)
    res = json.loads((tmp_path / "f.json").read_text())
    assert res["train_images"] == 10 and res["batch_size"] == 10 and res["peak_lr"] == pytest.approx(0.05 * 10 / 256)
    assert sum(line.startswith("note: the labelled subset has 10 images") for line in result.stdout.splitlines()) == 1
    (tmp_path / "ids.txt").write_text("\n".join(str(i) for i in range(11)))
    result = run_ok(["finetune.py", pretrained / "encoder.pt", "--subset-file", tmp_path / "ids.txt", "--batch-size",
                     "64", "--workers", "0", "--epochs", "1", "--out", "t.json"], tmp_path, torchrun=2)
    res = json.loads((tmp_path / "t.json").read_text())
    assert res["train_images"] == 11 and res["batch_size"] == 10
    assert result.stdout.count("note:") == 1 and "1 steps/epoch" in result.stdout


@pytest.mark.parametrize("script,args,text", [
    ("linear_eval.py", ["missing.pt"], "does not exist"),
    ("linear_eval.py", ["foreign.pt"], "not a checkpoint written by"),
    ("finetune.py", ["ENC", "--subset-file", "nothing.txt"], "does not exist"),
    ("linear_eval.py", ["ENC", "--max-images", "0"], "--max-images must be at least 1"),
    ("finetune.py", ["ENC", "--max-images", "0"], "--max-images must be at least 1"),
])
def test_bad_input_is_one_clear_line(pretrained, tmp_path, script, args, text):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    args = [str(pretrained / "encoder.pt") if a == "ENC" else a for a in args]
    result = run_script([script, *args], tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if f"{script}: error:" in line]
    assert len(errors) == 1 and text in errors[0], result.stderr
