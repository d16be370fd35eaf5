"""--tensorboard: the event files hold the values the scripts log, read back with tensorboard's own
reader; without tensorboard installed the flag is one line."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, TINY, child_env

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def scalars(folder):
    """{tag: [(step, value), ...]} of every event file in folder."""
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_event_files_hold_the_logged_values(run, tmp_path):
    result = run("pretrain.py", *TINY, "--epochs", "2", "--out", "out", "--knn-every", "2", "--tensorboard")
    got = scalars(tmp_path / "out" / "tensorboard")
    # the log lines: epoch E/2 step I/4 loss L acc A lr R img/s S, every 2 steps (TINY: 4 steps an epoch)
    lines = re.findall(r"epoch (\d)/2 step (\d)/4 loss ([\d.]+) acc ([\d.]+) lr ([\d.e-]+) img/s (\d+)", result.stdout)
    assert len(lines) == 4
    assert [s for s, _ in got["train/loss"]] == [(int(e) - 1) * 4 + int(i) for e, i, *_ in lines]  # global steps
    for (_, loss), (_, acc), (_, lr), (_, rate), line in zip(got["train/loss"], got["train/contrast_acc"],
                                                             got["train/lr"], got["train/images_per_s"], lines):
        assert f"{loss:.4f}" == line[2] and f"{acc:.3f}" == line[3] and f"{lr:.4g}" == line[4]
        assert f"{rate:.0f}" == line[5]
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert got["epoch/loss"] == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in log]
    assert got["epoch/knn_top1"] == [(8, pytest.approx(log[1]["knn_top1"], rel=1e-6))]  # only the epoch it ran
    assert "train/peak_gpu_memory_gib" not in got  # CPU: no GPU memory to log

    lin = run("linear_eval.py", "out/encoder.pt", "--epochs", "2", "--batch-size", "32", "--cached-features",
              "--workers", "0", "--tensorboard")
    got = scalars(tmp_path / "out" / "tensorboard" / "encoder.linear_cached")
    losses = re.findall(r"epoch \d/2 loss ([\d.]+) train acc ([\d.]+)%", lin.stdout)
    assert [f"{v:.4f}" for _, v in got["linear/train_loss"]] == [loss for loss, _ in losses]
    assert [f"{v:.2f}" for _, v in got["linear/train_acc"]] == [acc for _, acc in losses]
    results = json.loads((tmp_path / "out" / "encoder.linear_cached.json").read_text())
    assert got["linear/top1"][0][1] == pytest.approx(results["top1"], rel=1e-6)
    assert got["knn/top1"][0][1] == pytest.approx(results["knn_top1"], rel=1e-6)

    ft = run("finetune.py", "out/encoder.pt", "--epochs", "1", "--batch-size", "16", "--label-fraction", "0.5",
             "--workers", "0", "--tensorboard")
    got = scalars(tmp_path / "out" / "tensorboard" / "encoder.finetune_50pct")
    loss = re.search(r"epoch 1/1 loss ([\d.]+)", ft.stdout).group(1)
    assert f"{got['finetune/train_loss'][0][1]:.4f}" == loss and "finetune/top1" in got


def test_without_tensorboard_the_flag_is_one_line(run, tmp_path):
    fake = tmp_path / "fake" / "tensorboard"  # a tensorboard that cannot be imported, first on the path
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named tensorboard')\n")
    env = child_env(PYTHONPATH=str(tmp_path / "fake"))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain.py"), *TINY, "--epochs", "1", "--out",
                             "out", "--tensorboard"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "pip install tensorboard" in lines[0], result.stderr
