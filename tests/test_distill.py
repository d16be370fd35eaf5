"""distill.py and loss.distillation_loss: the loss against a per-example float64 loop, a student
that learns a fixed teacher's predictions, an exact resume after a stop signal, two processes
against one on the same global batch, the teacher left alone, bad input as one line.

The teacher is made here (no fine-tuning run): a random narrow ResNet whose linear layer is the
nearest class mean of its features on generated images, so its predictions vary over the images."""
import copy
import json
import math
import os
import signal
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import distill
import distributed
from augment import EvalTransform
from conftest import run_script, sigterm_after_steps
from loss import distillation_loss
from model import Classifier, ProjectionHead, build_encoder, load_classifier, save_classifier, save_encoder
from test_devices import Built, _index, fake_gpus  # noqa: F401  (fake_gpus: the patched CUDA runtime, a fixture)

SIZE, IMAGES = 16, 64
FAST = ["--workers", "0", "--batch-size", "16", "--lr", "0.2", "--progress-every", "0"]


# ----------------------------------------------------------------------------
# The loss

def per_example_loop(student, teacher, t, labels=None, weight=0.0):
    """Eq. 2 (+ eq. 3's labelled term) of SimCLRv2, one image at a time, float64."""
    total = 0.0
    for i in range(len(student)):
        s, q = student[i].double(), teacher[i].double()
        p_t = torch.exp(q / t) / torch.exp(q / t).sum()
        log_p_s = s / t - torch.log(torch.exp(s / t).sum())
        term = -(p_t * log_p_s).sum()
        if labels is not None and labels[i] >= 0:
            term = term - weight * (s[labels[i]] - torch.log(torch.exp(s).sum()))
        total = total + term
    return total / len(student)


@pytest.mark.parametrize("t", [1.0, 0.1])
@pytest.mark.parametrize("with_labels", [False, True])
def test_loss_matches_a_per_example_loop(t, with_labels):
    g = torch.Generator().manual_seed(3)
    student = (3 * torch.randn(8, 5, generator=g)).requires_grad_()
    teacher = 3 * torch.randn(8, 5, generator=g)
    labels = torch.tensor([2, -1, 0, -1, -1, 4, 1, -1]) if with_labels else None
    weight = 0.7 if with_labels else 0.0
    got = distillation_loss(student, teacher, t, labels, weight)
    ref = per_example_loop(student, teacher, t, labels, weight)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    grad, = torch.autograd.grad(got, student)
    ref_grad, = torch.autograd.grad(ref, student)
    torch.testing.assert_close(grad, ref_grad.float(), rtol=1e-4, atol=1e-6)
    if not with_labels:  # the textbook gradient of eq. 2: (softmax(s/t) - softmax(q/t)) / (t n)
        expected = (F.softmax(student.detach() / t, 1) - F.softmax(teacher / t, 1)) / (t * len(student))
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


def test_loss_ignores_unknown_labels_and_the_teachers_gradient():
    student, teacher = torch.randn(4, 3), torch.randn(4, 3, requires_grad=True)
    plain = distillation_loss(student, teacher, 1.0)
    assert distillation_loss(student, teacher, 1.0, torch.full((4,), -1), 5.0) == plain  # nobody labelled
    assert distillation_loss(student, teacher, 1.0, torch.tensor([0, 1, 2, 0]), 0.0) == plain  # weight 0
    assert not plain.requires_grad  # the teacher is fixed: no gradient reaches it
    with pytest.raises(ValueError):
        distillation_loss(torch.randn(4, 3), torch.randn(4, 5))


# ----------------------------------------------------------------------------
# Fixtures: a teacher with varied predictions, saved as finetune.py saves its network

def images(split, size=SIZE, n=IMAGES):
    dataset = data.build_dataset("synthetic", "data", split, size, n)
    x = torch.stack([EvalTransform(size, train=False)(dataset[i][0]) for i in range(len(dataset))]).float() / 255
    return x, torch.as_tensor(data.labels_of(dataset))


def make_teacher(classes=10, n=IMAGES, head_layer=0, seed=0):
    """A random ResNet-18 (width 0.25), its linear layer the nearest class mean of its (standardised)
    features of the training images, the biases then set so that it predicts every class about
    equally often there: a fixed function with varied predictions."""
    torch.manual_seed(seed)
    encoder = build_encoder("resnet18", 0.25, cifar_stem=True).eval()
    head = ProjectionHead(encoder.feature_dim, num_layers=3).eval() if head_layer else None
    x, y = images("train", n=n)
    with torch.no_grad():
        f = encoder(x) if not head_layer else head.first_layers(head_layer)(encoder(x))
    mean, std = f.mean(0), f.std(0).clamp_min(1e-6)
    centres = torch.stack([((f[y == c] - mean) / std).mean(0) for c in range(classes)])  # (C, d)
    linear = nn.Linear(f.shape[1], classes)
    with torch.no_grad():  # logits = centres @ ((f - mean) / std) * 3
        linear.weight.copy_(3 * centres / std)
        linear.bias.copy_(-3 * (centres * mean / std).sum(1))
        for _ in range(200):  # lower the bias of the classes predicted too often, raise the others'
            share = torch.bincount(linear(f).argmax(1), minlength=classes).float() / len(f)
            linear.bias -= 0.3 * torch.log((share + 0.02) / (1 / classes))
    return Classifier(encoder, linear, head, head_layer)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_classifier(path, make_teacher(n=128), dataset="synthetic", data_dir="data", image_size=SIZE,
                    synthetic_size=128)
    return path


def agreement(net_a, net_b, x):
    with torch.no_grad():
        return 100.0 * (net_a.eval()(x).argmax(1) == net_b.eval()(x).argmax(1)).float().mean().item()


# ----------------------------------------------------------------------------
# distill.py

def test_student_learns_the_teachers_predictions(teacher_file, tmp_path, in_process):
    in_process(distill, teacher_file, *FAST, "--batch-size", "32", "--epochs", "12", "--lr", "0.1",
               "--out", tmp_path / "run")
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    student, teacher = load_classifier(tmp_path / "run" / "student.pt"), load_classifier(teacher_file)
    assert res["test_images"] == 32 and res["images"] == 128
    torch.manual_seed(1)
    random_student = Classifier(build_encoder("resnet18", 0.25, cifar_stem=True), nn.Linear(128, 10))
    for split, least in (("train", 40), ("test", 30)):  # measured: 53% and 44%
        x, _ = images(split, n=128)  # the images without augmentation
        with torch.no_grad():
            counts = np.bincount(teacher.eval()(x).argmax(1).numpy(), minlength=10)
        guess = 100 * counts.max() / len(x)  # always the teacher's commonest class
        got, random = agreement(student, teacher, x), agreement(random_student, teacher, x)
        print(f"{split}: agreement {got:.1f}%, random student {random:.1f}%, constant guess {guess:.1f}%")
        assert got >= least and got >= max(guess, random) + 20, split
        if split == "test":
            assert res["test_agreement"] == pytest.approx(got)  # what student.pt holds is what was measured
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"] and log[-1]["agreement"] > log[0]["agreement"] + 20


def test_teacher_stays_in_eval_mode_and_unchanged(teacher_file, tmp_path, in_process, monkeypatch):
    teacher = load_classifier(teacher_file)
    before = copy.deepcopy(teacher.state_dict())  # weights and BN running statistics
    modes = []
    forward = teacher.forward
    monkeypatch.setattr(teacher, "forward", lambda x: modes.append(teacher.training) or forward(x))
    monkeypatch.setattr(distill, "load_classifier", lambda path, ckpt, encoder: teacher)
    in_process(distill, teacher_file, *FAST, "--epochs", "1", "--out", tmp_path / "run")
    assert len(modes) == 128 // 16 + 2 and not any(modes)  # every training step, and the test batches
    assert not any(p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("stop_at", [3, 8])  # in the middle of epoch 1, and the last step of epoch 1
def test_a_stop_signal_saves_and_resume_is_exact(teacher_file, tmp_path, in_process, monkeypatch, stop_at):
    flags = [teacher_file, *FAST, "--epochs", "2", "--label-weight", "0.5", "--label-fraction", "0.25"]
    in_process(distill, *flags, "--out", tmp_path / "straight")
    sigterm_after_steps(monkeypatch, distill.Progress, stop_at)
    with pytest.raises(SystemExit) as stopped:
        in_process(distill, *flags, "--out", tmp_path / "stopped")
    assert stopped.value.code == 128 + signal.SIGTERM
    state = torch.load(tmp_path / "stopped" / "ckpt.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"]) == ((0, stop_at) if stop_at < 8 else (1, 0))
    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    in_process(distill, *flags, "--out", tmp_path / "stopped", "--resume")
    a, b = (torch.load(tmp_path / run / "student.pt", weights_only=True) for run in ("straight", "stopped"))
    assert a["encoder"].keys() == b["encoder"].keys()
    for k in a["encoder"]:
        assert torch.equal(a["encoder"][k], b["encoder"][k]), k
    assert torch.equal(a["classifier"]["weight"], b["classifier"]["weight"])
    logs = [[json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
            for run in ("straight", "stopped")]
    assert [r["loss"] for r in logs[0]] == [r["loss"] for r in logs[1]]  # the stopped epoch's record is whole
    assert [r["agreement"] for r in logs[0]] == [r["agreement"] for r in logs[1]]


def test_labelled_images_are_finetunes_subset(teacher_file, tmp_path):
    args = distill.get_args([str(teacher_file), "--label-weight", "1", "--label-fraction", "0.25", "--seed", "3"])
    train = data.build_dataset("synthetic", "data", "pretrain", SIZE, 128)
    known = distill.known_labels(args, train)
    labels = data.labels_of(train)
    chosen = data.balanced_subset(labels, 0.25, 3)  # what finetune.py trains on with these flags
    assert np.array_equal(np.flatnonzero(known >= 0), chosen) and np.array_equal(known[chosen], labels[chosen])
    args.label_weight = 0
    assert (distill.known_labels(args, train) == -1).all()


def test_two_processes_equal_one_on_the_same_global_batch(tmp_path):
    """Two steps under DDP (gloo, two processes, each its half of the batch) against one process on
    the whole batch whose student normalises each half on its own (BN without SyncBatchNorm on CPU)."""
    out = tmp_path / "ddp.pt"
    result = run_script(["tests/distill_worker.py", out], tmp_path, torchrun=2)
    assert result.returncode == 0, result.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    import distill_worker
    ref = distill_worker.reference(got["world"])
    for step in range(2):
        assert got["losses"][step] == pytest.approx(ref["losses"][step], rel=1e-5)
    assert got["weights"].keys() == ref["weights"].keys()
    for k, w in ref["weights"].items():
        torch.testing.assert_close(got["weights"][k], w, rtol=1e-4, atol=1e-6, msg=k)
    moved = [k for k, w in ref["weights"].items() if not torch.equal(w, ref["start"][k])]
    assert len(moved) > 30  # the steps changed the encoder, not only the classifier


def test_torchrun_counts_every_test_image_once(teacher_file, tmp_path, in_process):
    in_process(distill, teacher_file, *FAST, "--epochs", "1", "--out", tmp_path / "one")
    result = run_script(["distill.py", teacher_file, *FAST, "--epochs", "1", "--out", "two"], tmp_path, torchrun=2)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith("top-1 accuracy: ")
    one, two = (json.loads((tmp_path / out / "results.json").read_text()) for out in ("one", "two"))
    assert two["processes"] == 2 and one["test_images"] == two["test_images"] == 32
    assert one["teacher_top1"] == two["teacher_top1"]  # the same fixed teacher on the same images


def one_line(capsys, call):
    """Run a script's main() as `python SCRIPT ...` does -> its stderr's error lines; it must exit 2."""
    with pytest.raises(SystemExit) as exited:
        distributed.run(call, (data.DataError, distill.CheckpointError), data.error_text)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err, err
    return [line for line in err.splitlines() if ": error:" in line]  # (argparse also prints its usage)


def test_bad_input_is_one_clear_line(teacher_file, tmp_path, in_process, capsys):
    save_encoder(tmp_path / "encoder.pt", build_encoder("resnet18", 0.25, cifar_stem=True), dataset="synthetic")
    save_classifier(tmp_path / "five.pt", make_teacher(classes=5), dataset="synthetic", image_size=SIZE,
                    synthetic_size=IMAGES)
    cases = [
        ([tmp_path / "encoder.pt"], "stores no classifier"),
        ([tmp_path / "five.pt"], "the teacher's classifier has 5 classes"),
        ([teacher_file, "--arch", "vgg16"], "argument --arch: invalid choice: 'vgg16'"),
        ([teacher_file, "--temperature", "0"], "--temperature must be positive, not 0"),
        ([teacher_file, "--init", tmp_path / "encoder.pt", "--width", "0.5"], "--width 0.5 differs from the width"),
        ([teacher_file, "--dataset", "folder", "--data-dir", tmp_path, "--label-weight", "1"], "has no labels"),
        ([tmp_path / "missing.pt"], "does not exist"),
    ]
    for argv, text in cases:
        lines = one_line(capsys, lambda: in_process(distill, *argv, *FAST, "--out", tmp_path / "out"))
        assert len(lines) == 1 and text in lines[0], (argv, lines)
    assert not os.path.exists(tmp_path / "out")  # refused before anything is made


def test_big_to_small_and_from_an_encoder(teacher_file, tmp_path, in_process):
    args = distill.get_args([str(teacher_file), "--arch", "resnet34", "--width", "0.125"])
    teacher = load_classifier(teacher_file)
    small = distill.student_encoder(args, teacher)
    assert small.config == {"arch": "resnet34", "width": 0.125, "cifar_stem": True}
    enc = build_encoder("resnet18", 0.5, cifar_stem=True)
    save_encoder(tmp_path / "init.pt", enc, dataset="synthetic")
    args = distill.get_args([str(teacher_file), "--init", str(tmp_path / "init.pt")])
    got = distill.student_encoder(args, teacher)
    assert got.config == enc.config and all(torch.equal(a, b) for a, b in zip(got.state_dict().values(),
                                                                             enc.state_dict().values()))
    assert math.isclose(sum(p.numel() for p in small.parameters()) / sum(p.numel() for p in teacher.encoder.parameters()),
                        0.5, rel_tol=0.3)  # resnet34 at width 0.125: about half of resnet18 at 0.25


@pytest.mark.parametrize("visible,gpu", [(1, 0), (8, 3)])
def test_ddp_and_the_teacher_get_the_gpu_the_process_uses(fake_gpus, teacher_file, tmp_path, monkeypatch, visible, gpu):
    """Rank 3 of 4, LOCAL_RANK 3, on a patched CUDA runtime (tests/test_devices.py): one visible GPU
    (srun --gpus-per-task=1) is cuda:0, eight are cuda:3; the student is converted to SyncBatchNorm
    and wrapped by DDP there, the teacher moved there, neither converted nor wrapped."""
    rec = fake_gpus(visible, local_rank=3, rank=3, world=4)
    monkeypatch.setattr(sys, "argv", ["distill.py", str(teacher_file), *FAST, "--out", str(tmp_path / "run")])
    with pytest.raises(Built):
        distill.main()
    want = torch.device("cuda", gpu)
    assert rec.to and set(rec.to) == {want}, rec.to  # student and teacher
    (ddp,) = rec.ddp
    assert [_index(d) for d in ddp["device_ids"]] == [gpu]
    assert isinstance(ddp["module"], Classifier) and [c["module"] for c in rec.sync_bn] == [ddp["module"]]
    assert any(isinstance(m, nn.SyncBatchNorm) for m in ddp["module"].modules())
