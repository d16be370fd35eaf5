"""Activation checkpointing is exact: the same loss, gradients, BN running statistics
and weights over two steps as without it, in one process and under torchrun with two;
it saves activation memory; pretrain.py gives the same run with and without it."""
import json

import pytest
import torch

import bench
from conftest import TINY, run_script
from checkpointing_worker import batches, make_model, two_steps


def assert_same_steps(plain, checkpointed, rel=1e-5):
    (steps_a, weights_a), (steps_b, weights_b) = plain, checkpointed
    for a, b in zip(steps_a, steps_b):
        assert b["loss"].item() == pytest.approx(a["loss"].item(), rel=rel)
        assert set(a["grads"]) == set(b["grads"]) and len(a["grads"]) > 100
        for name, g in a["grads"].items():
            assert g.abs().sum() > 0, name
            assert (b["grads"][name] - g).norm() <= rel * g.norm(), name
        for name, buf in a["buffers"].items():  # running statistics moved exactly once per step
            torch.testing.assert_close(b["buffers"][name], buf, rtol=rel, atol=0, msg=name)
    for name, w in weights_a.items():
        torch.testing.assert_close(weights_b[name], w, rtol=rel, atol=1e-7, msg=name)


@pytest.mark.parametrize("sync_bn", [False, True])
def test_one_process_two_steps_are_the_same(sync_bn):
    views = batches(8)
    results = []
    for checkpointing in (False, True):
        model = make_model(checkpointing)
        if sync_bn:  # in one process SyncBatchNorm normalises as BatchNorm: the class is what is tested
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        results.append(two_steps(model, views))
    assert results[0][0][1]["buffers"]["encoder.bn1.num_batches_tracked"] == 2  # not 4: one update per step
    assert not torch.equal(results[0][0][0]["buffers"]["encoder.bn1.running_mean"],
                           results[0][0][1]["buffers"]["encoder.bn1.running_mean"])
    assert_same_steps(*results)


def test_two_processes_two_steps_are_the_same(tmp_path):
    out = tmp_path / "ckpt.pt"
    result = run_script(["tests/checkpointing_worker.py", out], tmp_path, torchrun=2)
    assert result.returncode == 0, result.stderr[-3000:]
    got = torch.load(out)
    assert_same_steps(got[False], got[True])


def test_checkpointing_can_be_switched_and_needs_no_grad_mode():
    model = make_model(checkpointing=True)
    x = batches(2)[0]
    model.eval()
    with torch.no_grad():  # evaluation: no recomputation, nothing stored
        a = model(x)[0]
    model.encoder.activation_checkpointing = False
    with torch.no_grad():
        assert torch.equal(model(x)[0], a)
    assert "activation_checkpointing" not in model.encoder.config  # not part of the saved format


def test_activation_memory_is_smaller():
    """The bench probe at a small size (the full one, ResNet-50 with 128 views of 96 px, is
    `python bench.py --only memory`)."""
    plain = bench.activation_memory_in_fresh_process("resnet50", 0.25, 32, 64, False)[1]
    checkpointed = bench.activation_memory_in_fresh_process("resnet50", 0.25, 32, 64, True)[1]
    assert plain / checkpointed >= 1.8, (plain, checkpointed)


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pretrain_logs_the_same_run_and_resumes_across_the_flag(run, tmp_path):
    common = TINY
    run("pretrain.py", *common, "--epochs", "2", "--out", "plain")
    run("pretrain.py", *common, "--epochs", "2", "--activation-checkpointing", "--out", "ckpt")
    for a, b in zip(read_log(tmp_path / "plain" / "log.jsonl"), read_log(tmp_path / "ckpt" / "log.jsonl")):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4) and b["contrast_acc"] == pytest.approx(a["contrast_acc"])
    # One epoch with the flag, the second without: the checkpoint format is the same.
    run("pretrain.py", *common, "--epochs", "1", "--activation-checkpointing", "--out", "mixed")
    run("pretrain.py", *common, "--epochs", "2", "--out", "mixed", "--resume")
    final = torch.load(tmp_path / "plain" / "ckpt.pt", weights_only=True)["model"]
    mixed = torch.load(tmp_path / "mixed" / "ckpt.pt", weights_only=True)["model"]
    for name, w in final.items():
        torch.testing.assert_close(mixed[name], w, rtol=1e-5, atol=1e-6, msg=name)
