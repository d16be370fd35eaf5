"""tools/pretrain.sbatch without SLURM: fake `srun` and `scontrol` on PATH run the job's tasks
on this machine (gloo on CPU), so the script's per-task variables, its requeue decision and the
resume of the requeued job are checked; SLURM's own side (the signal at --signal's time, the
requeue itself, GPU binding) is not."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY, child_env, communicate, free_port, wait_for_line

SBATCH = os.path.join(ROOT, "tools", "pretrain.sbatch")

# Like srun: each task in its own process group (SLURM signals a task's every process, the
# data workers too), SIGTERM passed on to every task, and the exit status of a task killed by
# a signal (128 + the highest signal) before the highest exit status.
FAKE_SRUN = """#!{python}
import os, signal, subprocess, sys
log = os.environ["FAKE_SLURM_LOG"]
args = sys.argv[1:]
first = next(i for i, a in enumerate(args) if not a.startswith("-"))
options, command = args[:first], args[first:]
with open(os.path.join(log, "srun.options"), "w") as f:
    f.write(" ".join(options))
with open(os.path.join(log, "srun.pid"), "w") as f:
    f.write(str(os.getpid()))
per_node = [int(n) for n in os.environ.get("FAKE_TASKS_PER_NODE", "2").split(",")]
groups = []  # SLURM's compressed form: "2(x2),1"
for n in per_node:
    if groups and groups[-1][0] == n:
        groups[-1][1] += 1
    else:
        groups.append([n, 1])
layout = ",".join(f"{{n}}(x{{k}})" if k > 1 else str(n) for n, k in groups)
cpus = [o.split("=", 1)[1] for o in options if o.startswith("--cpus-per-task=")]
tasks = []

def forward(signum, frame):
    for t in tasks:
        try:
            os.killpg(t.pid, signum)
        except ProcessLookupError:
            pass

signal.signal(signal.SIGTERM, forward)
for node, count in enumerate(per_node):
    for local in range(count):
        env = dict(os.environ, SLURM_PROCID=str(len(tasks)), SLURM_LOCALID=str(local), SLURM_NODEID=str(node),
                   SLURM_NTASKS=str(sum(per_node)), SLURM_STEP_TASKS_PER_NODE=layout, CUDA_VISIBLE_DEVICES="")
        if cpus:
            env["SLURM_CPUS_PER_TASK"] = cpus[0]
        tasks.append(subprocess.Popen(command, env=env, start_new_session=True))
codes = [t.wait() for t in tasks]
signalled = [-c for c in codes if c < 0]
sys.exit(128 + max(signalled) if signalled else max(codes))
"""

FAKE_SCONTROL = """#!/bin/bash
case $1 in
    show) echo 127.0.0.1 ;;
    requeue) echo "$2" >> "$FAKE_SLURM_LOG/requeued" ;;
    *) exit 1 ;;
esac
"""

# Stands in for python in the layout test: one line of what the task was given.
FAKE_PYTHON = """#!/bin/bash
echo "task $RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $MASTER_ADDR:$MASTER_PORT | $*"
"""


def fake_slurm(tmp_path, python=None):
    """A bin folder with srun, scontrol and python -> (environment of a job, log folder)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "slurm"
    bin_dir.mkdir()
    log.mkdir()
    for name, text in [("srun", FAKE_SRUN.format(python=sys.executable)), ("scontrol", FAKE_SCONTROL)]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    if python:
        (bin_dir / "python").write_text(python)
        (bin_dir / "python").chmod(0o755)
    else:
        # a wrapper, not a symbolic link: a link to a venv's python (itself a link to the base
        # interpreter) starts the base interpreter without the venv's packages
        (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        (bin_dir / "python").chmod(0o755)
    path = os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), os.environ["PATH"]])  # torchrun too
    env = child_env(PATH=path, FAKE_SLURM_LOG=str(log), OMP_NUM_THREADS="1",
                    SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node[01-02]", SLURM_JOB_NUM_NODES="1",
                    SLURM_NTASKS="2", SLURM_CPUS_PER_TASK="1", MASTER_PORT=str(free_port()))
    return env, log


def start(args, env):
    """bash tools/pretrain.sbatch ARGS as sbatch would run it: from the repository root, stdout
    and stderr into one output."""
    return subprocess.Popen(["bash", SBATCH, *map(str, args)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def run_job(args, env, timeout=120):
    proc = start(args, env)
    out, _ = communicate(proc, timeout)
    return proc.returncode, out


def requeues(log):
    path = log / "requeued"
    return path.read_text().split() if path.exists() else []


def test_each_task_gets_its_rank_and_node_layout(tmp_path):
    env, log = fake_slurm(tmp_path, python=FAKE_PYTHON)
    env.update(FAKE_TASKS_PER_NODE="3,3,1", SLURM_NTASKS="7", SLURM_CPUS_PER_TASK="3")
    del env["MASTER_PORT"]  # derived from the job id
    code, out = run_job(["--dataset", "synthetic", "--out", tmp_path / "run"], env, timeout=30)
    assert code == 0, out
    tasks = sorted(line.split("|")[0].split()[1:] for line in out.splitlines() if line.startswith("task "))
    # rank, world, local rank, processes on its node (3 + 3 + 1), rendezvous on the first host
    assert tasks == sorted([str(r), "7", str(r % 3), "1" if r == 6 else "3", "127.0.0.1:24242"] for r in range(7))
    args = {line.split("| ")[1] for line in out.splitlines() if line.startswith("task ")}
    assert args == {f"pretrain.py --auto-resume --workers 3 --dataset synthetic --out {tmp_path / 'run'}"}
    options = (log / "srun.options").read_text().split()
    assert set(options) == {"--kill-on-bad-exit=0", "--gpus-per-task=1", "--cpus-per-task=3"}
    assert requeues(log) == []
    # --workers of the user's wins
    code, out = run_job(["--workers", "0"], env, timeout=30)
    assert code == 0 and "--auto-resume --workers 0\n" in out and "--workers 3" not in out, out


def test_a_run_that_finishes_is_not_requeued(tmp_path):
    env, log = fake_slurm(tmp_path)
    w = TINY.index("--workers")
    flags = TINY[:w] + TINY[w + 2:]  # --workers from SLURM_CPUS_PER_TASK
    code, out = run_job([*flags, "--epochs", "1", "--knn-every", "0", "--out", tmp_path / "run"], env)
    assert code == 0, out[-3000:]
    assert (tmp_path / "run" / "ckpt.pt").exists() and (tmp_path / "run" / "encoder.pt").exists()
    assert "processes 2" in out and '"workers": 1' in out and "resumed from" not in out
    assert requeues(log) == []


def test_sigterm_to_the_tasks_requeues_and_the_requeued_job_resumes(tmp_path):
    env, log = fake_slurm(tmp_path)
    out_dir = tmp_path / "run"
    args = [*TINY, "--epochs", "3", "--log-every", "1", "--knn-every", "0", "--out", out_dir]
    proc = start(args, env)
    wait_for_line(proc, "epoch 2/3 step 1/4")
    os.kill(int((log / "srun.pid").read_text()), signal.SIGTERM)  # what --signal=TERM@300 reaches: the tasks
    out, _ = communicate(proc, 120)
    assert proc.returncode == 143, out[-3000:]
    assert "stopped by SIGTERM after step" in out and "requeueing job 4242" in out
    assert requeues(log) == ["4242"]
    saved = torch.load(out_dir / "ckpt.pt", weights_only=True)
    assert saved["epoch"] == 1 and 0 < saved["step_in_epoch"] < 4  # stopped in the middle of epoch 2

    env["SLURM_RESTART_COUNT"] = "1"  # the requeued job: same id, same command
    code, out = run_job(args, env)
    assert code == 0, out[-3000:]
    assert "requeued 1 times" in out
    assert f"resumed from {out_dir}/ckpt.pt at epoch 2, step {saved['step_in_epoch'] + 1}\n" in out
    assert [json.loads(line)["epoch"] for line in (out_dir / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert requeues(log) == ["4242"]


def test_a_job_that_slurm_ends_is_not_requeued(tmp_path):
    """scancel or the time limit itself: SLURM signals the batch shell too. The fake srun passes
    the SIGTERM on (a real one kills the tasks), so the run saves; the script must not requeue."""
    env, log = fake_slurm(tmp_path)
    proc = start([*TINY, "--epochs", "2", "--log-every", "1", "--knn-every", "0", "--out", tmp_path / "run"], env)
    wait_for_line(proc, "epoch 1/2 step 1/4")
    os.kill(proc.pid, signal.SIGTERM)  # the batch shell
    os.kill(int((log / "srun.pid").read_text()), signal.SIGTERM)
    out, _ = communicate(proc, 120)
    assert proc.returncode == 143, out[-3000:]
    assert "is being ended by SLURM" in out and "requeueing" not in out
    assert requeues(log) == []


def test_a_run_that_fails_is_not_requeued(tmp_path):
    env, log = fake_slurm(tmp_path)
    env.update(FAKE_TASKS_PER_NODE="1", SLURM_NTASKS="1")  # one task: a second would wait 30 s for rank 0's line
    code, out = run_job([*TINY, "--arch", "resnet7", "--out", tmp_path / "run"], env)
    assert code == 2 and "invalid choice" in out, out[-3000:]
    assert requeues(log) == []


def test_the_script_parses_and_passes_shellcheck():
    assert subprocess.run(["bash", "-n", SBATCH], capture_output=True).returncode == 0
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    check = subprocess.run(["shellcheck", SBATCH], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
