"""finetune.py's two recipes and what it saves: the v2 recipe reaches the optimizer (LARS with the
official exclusions, sqrt scaling, head layer 1), the v1 protocol for other checkpoints, the
weight-scale handling of momentum SGD, NAME.pt scored by linear_eval.py --checkpoint-classifier
to the printed accuracy, and an exact resume after a stop signal mid-epoch."""
import copy
import json
import os
import re
import signal

import pytest
import torch
import torch.nn as nn

import finetune
import linear_eval
from conftest import sigterm_after_steps
from lars import LARS
from model import (ProjectionHead, build_encoder, conv_weight_scale, load_classifier, rescale_convs,
                   save_encoder)

SIZE, IMAGES = 16, 64
FAST = ["--workers", "0", "--batch-size", "16", "--epochs", "2", "--label-fraction", "0.5", "--progress-every", "0"]


def checkpoint(path, head_layers, width=0.25, seed=0):
    """An encoder.pt as pretrain.py writes it (random weights), with a projection head of that many layers."""
    torch.manual_seed(seed)
    encoder = build_encoder("resnet18", width, cifar_stem=True)
    head = ProjectionHead(encoder.feature_dim, num_layers=head_layers) if head_layers else None
    save_encoder(path, encoder, head=head, dataset="synthetic", data_dir="data", image_size=SIZE,
                 synthetic_size=IMAGES, epoch=1)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpts")
    return {k: checkpoint(folder / f"{k}.pt", layers) for k, layers in (("v2", 3), ("v1", 2), ("none", 0))}


@pytest.fixture
def spy(monkeypatch):
    """The optimizer finetune.py builds, kept for the test."""
    made = []
    real = finetune.fine_tuning_optimizer

    def wrapped(name, params, classifier_params, lr, *args, **kwargs):
        made.append(real(name, params, classifier_params, lr, *args, **kwargs))
        made[-1].built_with_lr = lr
        return made[-1]
    monkeypatch.setattr(finetune, "fine_tuning_optimizer", wrapped)
    return made


def test_v2_recipe_reaches_the_optimizer(ckpts, tmp_path, in_process, spy, capsys):
    in_process(finetune, ckpts["v2"], *FAST, "--out", tmp_path / "v2.json")
    out = capsys.readouterr().out
    assert "recipe v2 (the official SimCLRv2 fine-tuning" in out and "projection head has 3 layers" in out
    optimizer, = spy
    assert isinstance(optimizer, LARS)
    res = json.loads((tmp_path / "v2.json").read_text())
    assert (res["recipe"], res["optimizer"], res["lr_scaling"], res["from_head_layer"]) == ("v2", "lars", "sqrt", 1)
    assert res["lr"] == 0.005 and res["weight_decay"] == 0 and res["peak_lr"] == pytest.approx(0.005 * 16 ** 0.5)
    net = load_classifier(tmp_path / "v2.pt")
    network, classifier = optimizer.param_groups
    # the official exclusions: BN and biases (1-D) and the whole classifier without decay or trust ratio
    assert network["trust_ratio"] and network["exclude_1d"] and network["weight_decay"] == 0
    assert not classifier["trust_ratio"] and [p.shape for p in classifier["params"]] == [(10, 128), (10,)]
    shapes = sorted(tuple(p.shape) for p in network["params"])
    trained = sorted(tuple(p.shape) for n, p in net.named_parameters() if not n.startswith("linear.")
                     and not n.startswith(("head.net.3", "head.net.4", "head.net.6", "head.net.7")))
    assert shapes == trained  # the encoder and head layer 1; layers 2 and 3 take no part
    assert optimizer.built_with_lr == res["peak_lr"]  # the schedule starts there (warmup 0)


def test_v1_protocol_for_other_checkpoints_and_recipes_can_be_forced(ckpts, tmp_path, in_process, spy, capsys):
    in_process(finetune, ckpts["v1"], *FAST, "--out", tmp_path / "v1.json")
    out = capsys.readouterr().out
    assert "recipe v1 (the SimCLR v1 paper" in out and "projection head has 2 layers" in out
    sgd, = spy
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    res = json.loads((tmp_path / "v1.json").read_text())
    assert (res["optimizer"], res["lr_scaling"], res["from_head_layer"]) == ("sgd", "linear", 0)
    assert res["peak_lr"] == pytest.approx(0.05 * 16 / 256)
    in_process(finetune, ckpts["none"], *FAST, "--recipe", "v2", "--out", tmp_path / "forced.json")
    out = capsys.readouterr().out
    assert "recipe v2" in out and "--recipe v2; it has no projection head to fine-tune from, so from h" in out
    res = json.loads((tmp_path / "forced.json").read_text())
    assert (res["optimizer"], res["from_head_layer"]) == ("lars", 0)
    assert load_classifier(tmp_path / "forced.pt").head_layer == 0


def test_rescaling_convs_keeps_the_function():
    torch.manual_seed(0)
    for encoder in (build_encoder("resnet18", 0.25, cifar_stem=True),
                    build_encoder("resnet50", 0.125, sk_ratio=0.0625)):
        with torch.no_grad():  # BN statistics and gammas of a trained network, not 0 and 1
            for m in encoder.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5)
                    m.running_mean.normal_(0, 0.2)
                    m.running_var.uniform_(0.5, 2.0)
        assert conv_weight_scale(encoder) == pytest.approx(1.0, abs=0.1)  # He init
        x = torch.rand(8, 3, 1, 1) * torch.rand(8, 3, 32, 32) + torch.rand(8, 3, 1, 1)  # images of varied contrast
        # eval mode (running statistics), and train mode (batch statistics, on a copy) but for SK, whose
        # attention BN sees one value per image: with 8 images its batch variance nears BN's epsilon
        modes = (False, True) if "sk_ratio" not in encoder.config else (False,)
        with torch.no_grad():
            before = [copy.deepcopy(encoder).train(mode)(x) for mode in modes]
        scale, weights = conv_weight_scale(encoder), copy.deepcopy(encoder.state_dict())
        rescale_convs(encoder, 16.8)
        assert conv_weight_scale(encoder) == pytest.approx(16.8 * scale, rel=1e-6)
        with torch.no_grad():
            after = [copy.deepcopy(encoder).train(mode)(x) for mode in modes]
        for a, b in zip(before, after):
            torch.testing.assert_close(b, a, rtol=2e-3, atol=2e-3)  # BN's epsilon: var + eps becomes var + eps / c^2
        if "sk_ratio" in encoder.config:  # the SK attention's last conv feeds a softmax, no BN: left alone
            assert torch.equal(encoder.layer1[0].conv2.fc2.weight, weights["layer1.0.conv2.fc2.weight"])
            torch.testing.assert_close(encoder.layer1[0].conv2.fc1.weight, 16.8 * weights["layer1.0.conv2.fc1.weight"])


def test_lars_does_not_care_about_the_weight_scale_and_sgd_does():
    """One step on a BN-normalised kernel scaled by c, whose gradient scales by 1/c: LARS moves it by
    c times the same step (relative to the weights, the same step), momentum SGD by 1/c times, which
    relative to the weights is c^2 times smaller: the official README's 16.8x is a 282x smaller step."""
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    g = torch.randn_like(w)
    for name, ratio in (("lars", 1.0), ("sgd", 16.8 ** 2)):
        steps = []
        for c in (1.0, 16.8):
            p = nn.Parameter(c * w.clone())
            p.grad = g / c  # the gradient of a BN-normalised kernel scales as 1/c
            opt = LARS([p], lr=0.1, weight_decay=0, trust_ratio=name == "lars", exclude_1d=name == "lars")
            opt.step()
            steps.append((c * w - p.detach()).norm() / c)  # the step relative to the weights' scale
        assert (steps[0] / steps[1]).item() == pytest.approx(ratio, rel=1e-4)


def test_momentum_sgd_on_official_v2_weights_warns_with_the_measured_scale(ckpts, tmp_path):
    encoder, ckpt = finetune.load_encoder(ckpts["v2"])
    head = finetune.load_head(ckpts["v2"], ckpt)
    save_encoder(tmp_path / "official.pt", encoder, head=head, source="google-research/simclr TF1 checkpoint")
    official = finetune.pretrain_settings(torch.load(tmp_path / "official.pt", weights_only=True))
    measured = conv_weight_scale(encoder)
    args = finetune.get_args([str(tmp_path / "official.pt"), "--optimizer", "sgd"])
    text = finetune.apply_conv_scale(args, encoder, head, official)
    assert text.startswith("warning: SGD on weights of this scale") and f"{measured:.3g}x He init" in text
    assert "official SimCLRv2 checkpoint" in text and "--optimizer lars" in text and "--conv-scale 16.8" in text
    args = finetune.get_args([str(tmp_path / "official.pt"), "--optimizer", "sgd", "--conv-scale", "16.8"])
    text = finetune.apply_conv_scale(args, encoder, head, official)
    assert not text.startswith("warning") and f"now {16.8 * measured:.3g}x" in text
    assert conv_weight_scale(encoder) == pytest.approx(16.8 * measured)
    for name in ("v2", "v1"):  # this project's own checkpoints (any head): the measured scale, no warning
        own, own_ckpt = finetune.load_encoder(ckpts[name])
        text = finetune.apply_conv_scale(finetune.get_args([str(ckpts[name]), "--optimizer", "sgd"]), own,
                                         finetune.load_head(ckpts[name], own_ckpt), finetune.pretrain_settings(own_ckpt))
        assert text == f"SGD on weights of this scale: conv kernels at {conv_weight_scale(own):.3g}x He init on " \
                       "average (model.conv_weight_scale)"
    assert finetune.apply_conv_scale(finetune.get_args([str(ckpts["v2"]), "--optimizer", "lars"]), encoder, head,
                                     official) is None


def test_saved_network_reproduces_the_printed_accuracy(ckpts, tmp_path, in_process, capsys):
    in_process(finetune, ckpts["v2"], *FAST, "--epochs", "3", "--lr", "0.05", "--out", tmp_path / "ft.json")
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"top-1 accuracy: \d+\.\d\d%", printed)
    saved = torch.load(tmp_path / "ft.pt", weights_only=True)
    assert saved["classifier"]["head_layer"] == 1 and saved["head_config"]["num_layers"] == 3
    assert saved["meta"]["epoch"] == 3 and saved["meta"]["recipe"] == "v2" and saved["meta"]["dataset"] == "synthetic"
    in_process(linear_eval, tmp_path / "ft.pt", "--checkpoint-classifier", "--workers", "0")
    assert capsys.readouterr().out.strip().splitlines()[-1] == printed
    res = json.loads((tmp_path / "ft.json").read_text())
    assert res["model"] == str(tmp_path / "ft.pt") and res["test_images"] == 16


@pytest.mark.parametrize("stop_at", [1, 4])  # epoch 1 of 4 steps: after its first step, and after its last
def test_a_stop_signal_saves_and_resume_is_exact(ckpts, tmp_path, in_process, monkeypatch, stop_at):
    flags = [ckpts["v2"], *FAST, "--label-fraction", "1", "--batch-size", "16", "--epochs", "2"]
    in_process(finetune, *flags, "--out", tmp_path / "straight.json")
    sigterm_after_steps(monkeypatch, finetune.Progress, stop_at)
    with pytest.raises(SystemExit) as stopped:
        in_process(finetune, *flags, "--out", tmp_path / "stopped.json")
    assert stopped.value.code == 128 + signal.SIGTERM
    state = torch.load(tmp_path / "stopped.ckpt.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"]) == ((0, stop_at) if stop_at < 4 else (1, 0))
    assert not os.path.exists(tmp_path / "stopped.json")  # no results yet
    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):  # the state is not overwritten without --resume
        in_process(finetune, *flags, "--out", tmp_path / "stopped.json")
    in_process(finetune, *flags, "--out", tmp_path / "stopped.json", "--resume")
    a, b = (torch.load(tmp_path / f"{run}.pt", weights_only=True) for run in ("straight", "stopped"))
    for part in ("encoder", "head"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert torch.equal(a["classifier"]["weight"], b["classifier"]["weight"])
    ra, rb = (json.loads((tmp_path / f"{run}.json").read_text()) for run in ("straight", "stopped"))
    assert ra["top1"] == rb["top1"] and ra["final_train_loss"] == rb["final_train_loss"]
