"""Faults: preemption signals, exact resume mid-epoch, a kill during a save, bad images,
bad data folders, truncated checkpoints, and a process of a DDP run dying."""
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, TINY, child_env, communicate, pinned, run_script, script_env, wait_for_line
from model import read_checkpoint

SCRIPT = os.path.join(ROOT, "pretrain.py")


def start(args, cwd, torchrun=0, cpus=None):
    """Start pretrain.py in its own process group (so signals reach its workers as a scheduler's would),
    pinned to the CPUs `cpus` when given."""
    env = script_env(torchrun)  # the threads of run_script's runs: bitwise comparisons need the same count
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
                if torchrun else [sys.executable])
    return subprocess.Popen(launcher + [SCRIPT, *map(str, args)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=pinned(cpus))


def weights(path):
    return torch.load(path, weights_only=True)["model"]


ONE_CPU = {min(os.sched_getaffinity(0))}  # as `taskset -c N` or a scheduler that gives a job one core


@pytest.mark.parametrize("signum,code,cpus", [(signal.SIGTERM, 143, None), (signal.SIGINT, 130, ONE_CPU)],
                         ids=["SIGTERM", "SIGINT-one-CPU"])
def test_signal_stops_mid_epoch_and_resume_is_exact(tmp_path, signum, code, cpus):
    """Every process of the comparison runs with the same CPU threads (script_env): the CPU sums split
    by thread, so a stopped run with 1 thread and a straight one with 2 differ in the last bits."""
    straight = run_script(["pretrain.py", *TINY, "--epochs", "3", "--out", "straight"], tmp_path, cpus=cpus)
    assert straight.returncode == 0, straight.stderr[-2000:]
    flags = [*TINY, "--epochs", "3", "--log-every", "1", "--workers", "2", "--out", "stopped"]
    proc = start(flags, tmp_path, cpus=cpus)
    wait_for_line(proc, "epoch 2/3 step 1/4")
    os.killpg(proc.pid, signum)  # the whole group: training process and data workers
    out, err = communicate(proc, 120)
    assert proc.returncode == code, err[-3000:]
    assert f"stopped by {signal.Signals(signum).name} after step" in err and "--resume" in err
    assert "Traceback" not in err
    ckpt = torch.load(tmp_path / "stopped" / "ckpt.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and 0 < ckpt["step_in_epoch"] < 4  # stopped in the middle of epoch 2
    assert ckpt["step"] == 4 + ckpt["step_in_epoch"] and len(ckpt["epoch_sums"]) == 4  # loss, accuracy, unreadable, overflows
    assert set(ckpt["rng"]) >= {"torch", "python"}
    resumed = run_script(["pretrain.py", *flags, "--resume"], tmp_path, cpus=cpus)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at epoch 2, step {ckpt['step_in_epoch'] + 1}" in resumed.stdout and "written by a process with" not in resumed.stdout
    a, b = weights(tmp_path / "straight" / "ckpt.pt"), weights(tmp_path / "stopped" / "ckpt.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise: same steps, same views, same order
    log = [json.loads(line) for line in (tmp_path / "stopped" / "log.jsonl").read_text().splitlines()]
    straight_log = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert log[1]["loss"] == pytest.approx(straight_log[1]["loss"])  # the stopped epoch's record is whole


def test_torchrun_forwards_sigterm_and_the_resumed_ddp_run_is_exact(tmp_path):
    """A container runtime signals only the launcher; torchrun forwards SIGTERM to every process,
    which all stop after the same step."""
    flags = [*TINY, "--epochs", "3", "--log-every", "1"]
    straight = run_script(["pretrain.py", *flags, "--out", "straight"], tmp_path, torchrun=2)
    assert straight.returncode == 0, straight.stderr[-2000:]
    proc = start([*flags, "--out", "stopped"], tmp_path, torchrun=2)
    wait_for_line(proc, "epoch 2/3 step 1/4")
    os.kill(proc.pid, signal.SIGTERM)  # the launcher only
    _, err = communicate(proc, 120)
    assert proc.returncode != 0 and "stopped by SIGTERM after step" in err, err[-3000:]
    assert "rank 0 received SIGTERM" in err and "rank 1 received SIGTERM" in err
    assert torch.load(tmp_path / "stopped" / "ckpt.pt", weights_only=True)["step_in_epoch"] > 0
    resumed = run_script(["pretrain.py", *flags, "--out", "stopped", "--resume"], tmp_path, torchrun=2)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = weights(tmp_path / "straight" / "ckpt.pt"), weights(tmp_path / "stopped" / "ckpt.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_auto_resume_starts_then_continues(run, tmp_path):
    first = run("pretrain.py", *TINY, "--epochs", "1", "--out", "job", "--auto-resume")
    assert "resumed from" not in first.stdout
    second = run("pretrain.py", *TINY, "--epochs", "2", "--out", "job", "--auto-resume")
    assert "resumed from job/ckpt.pt at epoch 2, step 1" in second.stdout
    assert torch.load(tmp_path / "job" / "ckpt.pt", weights_only=True)["epoch"] == 2


SAVER = """
import sys, torch
sys.path.insert(0, {root!r})
from model import read_checkpoint, save_atomic
path = sys.argv[1]
ckpt = read_checkpoint(path)
ckpt["padding"] = torch.ones(256 * 1024 * 1024)  # 1 GiB: the save takes long enough to be killed in it
print("saving", flush=True)
save_atomic(ckpt, path)
print("saved", flush=True)
"""


def test_kill_9_during_a_save_keeps_the_previous_checkpoint(run, tmp_path):
    run("pretrain.py", *TINY, "--epochs", "1", "--out", "run")
    path = tmp_path / "run" / "ckpt.pt"
    before = path.read_bytes()
    saver = subprocess.Popen([sys.executable, "-c", SAVER.format(root=ROOT), str(path)], stdout=subprocess.PIPE,
                             text=True, env=child_env())
    assert saver.stdout.readline().strip() == "saving"
    deadline = time.time() + 30
    while not list((tmp_path / "run").glob("ckpt.pt.tmp.*")) and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    saver.kill()  # SIGKILL: no cleanup runs
    saver.wait()
    leftovers = list((tmp_path / "run").glob("ckpt.pt.tmp.*"))
    assert leftovers, "the kill did not land during the save"
    assert path.read_bytes() == before  # the previous checkpoint, untouched
    read_checkpoint(path)
    result = run("pretrain.py", *TINY, "--epochs", "2", "--out", "run", "--resume")
    assert "resumed from" in result.stdout
    assert not list((tmp_path / "run").glob("*.tmp.*"))  # the stale partial file was removed


def test_eval_scripts_refuse_a_truncated_checkpoint(run, tmp_path):
    run("pretrain.py", *TINY, "--epochs", "1", "--out", "run")
    data = (tmp_path / "run" / "encoder.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    for script in ("linear_eval.py", "finetune.py"):
        result = run(script, "cut.pt", check=False)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert f"{script}: error: cannot read checkpoint cut.pt" in result.stderr and "truncated" in result.stderr


def image_folder(root, n_per_class=20, bad=()):
    """A small ImageNet-style folder; `bad` names files to write corrupt: {name: bytes}."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n_per_class):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
                (root / split / c / f"{c}{i}.JPEG").write_bytes(buf.getvalue())
    for name, content in dict(bad).items():
        (root / "train" / "a" / name).write_bytes(content)


def corrupt_files(tmp_path):
    good = (tmp_path / "data" / "train" / "a" / "a0.JPEG").read_bytes()
    return {"garbage.JPEG": b"this is not an image", "truncated.JPEG": good[: len(good) // 2], "empty.JPEG": b""}


FOLDER = ["--dataset", "imagefolder", "--data-dir", "data", "--image-size", "32", "--arch", "resnet18",
          "--width", "0.25", "--batch-size", "16", "--warmup-epochs", "1", "--log-every", "100"]


def test_unreadable_images_are_skipped_and_counted(run, tmp_path):
    image_folder(tmp_path / "data", n_per_class=6)
    bad = corrupt_files(tmp_path)
    for name, content in bad.items():
        (tmp_path / "data" / "train" / "a" / name).write_bytes(content)
    # 12 good + 3 bad images, one batch of 15: every file is visited in every epoch
    result = run("pretrain.py", *FOLDER, "--epochs", "2", "--workers", "2", "--batch-size", "15", "--out", "run")
    for name in bad:
        assert f"warning: skipping unreadable image data/train/a/{name} (" in result.stderr, result.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["unreadable_images"] for r in records] == [3, 3]
    assert "skipped 3 unreadable images; saved" in result.stdout


@pytest.mark.parametrize("workers", ["0", "2"])
def test_strict_data_stops_at_an_unreadable_image(run, tmp_path, workers):
    image_folder(tmp_path / "data", n_per_class=10)
    for name, content in corrupt_files(tmp_path).items():
        (tmp_path / "data" / "train" / "a" / name).write_bytes(content)
    result = run("pretrain.py", *FOLDER, "--epochs", "1", "--workers", workers, "--strict-data", "--out", "run",
                 "--batch-size", "8", check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("pretrain.py: error:")]
    assert len(errors) == 1 and "cannot read" in errors[0] and ".JPEG" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("layout,text", [
    ("empty", "Couldn't find any class folder"),
    ("flat", "Couldn't find any class folder"),
    ("no_images", "Found no valid file"),
])
def test_bad_data_folders_are_one_line_before_training(run, tmp_path, layout, text):
    train = tmp_path / "data" / "train"
    train.mkdir(parents=True)
    if layout == "flat":  # images without class folders
        Image.new("RGB", (8, 8)).save(train / "x.JPEG")
    if layout == "no_images":
        (train / "cls").mkdir()
        (train / "cls" / "notes.txt").write_text("no images here")
    result = run("pretrain.py", *FOLDER, "--epochs", "1", "--out", "run", check=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("pretrain.py: error:")]
    assert result.returncode != 0 and len(errors) == 1 and text in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "ckpt.pt").exists()


def children(pid):
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


def rank_of(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    return int(env.get(b"RANK", b"-1"))


def test_when_one_process_dies_the_others_exit_in_bounded_time(tmp_path):
    flags = [*TINY, "--synthetic-size", "256", "--epochs", "50", "--log-every", "1", "--out", "run",
             "--dist-timeout", "1"]
    proc = start(flags, tmp_path, torchrun=2)
    wait_for_line(proc, "epoch 2/50 step 2/")  # epoch 1's checkpoint exists
    trainers = children(proc.pid)
    victim = next(pid for pid in trainers if rank_of(pid) == 1)
    killed_at = time.time()
    os.kill(victim, signal.SIGKILL)
    _, err = communicate(proc, 90)  # fails the test if the surviving process did not exit
    elapsed = time.time() - killed_at
    assert proc.returncode != 0
    assert elapsed < 90
    said = [line for line in err.splitlines() if line.startswith("pretrain.py (rank 0): error:")]
    assert len(said) == 1 and "another process of this run died or stopped answering" in said[0], err[-3000:]
    assert "AttributeError" not in err  # torch 2.1 lacks dist.DistError: the message must not depend on it
    assert all(not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
               for pid in trainers)
    assert read_checkpoint(tmp_path / "run" / "ckpt.pt")["epoch"] >= 1  # the last checkpoint is intact
    print(f"all processes gone {elapsed:.1f} s after rank 1 was killed")


def test_an_interrupted_wait_kills_the_script_and_its_processes(tmp_path):
    """conftest.communicate, interrupted (Ctrl-C, or tools/gpu_session.sh's SIGINT at a part's limit),
    kills the script and the processes it started in sessions of their own (as torchrun starts its
    ranks), instead of leaving them running on a GPU nobody watches."""
    code = ("import subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True)\n"
            "print(child.pid, flush=True)\n"
            "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    child = int(proc.stdout.readline())

    def interrupted(timeout=None):
        raise KeyboardInterrupt
    proc.communicate = interrupted
    with pytest.raises(KeyboardInterrupt):
        communicate(proc, 60)
    proc.wait(timeout=30)
    deadline = time.time() + 30
    while os.path.exists(f"/proc/{child}") and time.time() < deadline:
        try:
            with open(f"/proc/{child}/stat") as f:
                if f.read().split(") ")[1].startswith("Z"):  # killed, not yet reaped by init
                    break
        except FileNotFoundError:  # gone between the two looks
            break
        time.sleep(0.1)
    else:
        assert not os.path.exists(f"/proc/{child}"), "the script's own child still runs"
