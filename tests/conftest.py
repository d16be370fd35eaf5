"""Shared helpers: the repository on sys.path, and running the scripts as users do."""
import functools
import os
import signal
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Small, fast pretraining settings on generated data (CPU).
TINY = ["--dataset", "synthetic", "--arch", "resnet18", "--width", "0.25", "--synthetic-size", "64",
        "--batch-size", "16", "--log-every", "2", "--warmup-epochs", "1", "--workers", "0"]


def child_env(cuda=False, **extra):
    """Environment of a child process. The GPU is hidden unless cuda=True: the scripts take
    CUDA whenever it is there, and these tests check CPU facts (bitwise resumes, two gloo
    processes on a machine with one GPU); tests/test_cuda.py asks for it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def script_env(torchrun=0, cuda=False):
    """Environment of a script under test: child_env with the CPU threads fixed (1 per process under
    torchrun, else $OMP_NUM_THREADS or 2). Runs that are compared bitwise need the same count: the
    CPU kernels split their sums by thread, so 1 and 2 threads differ in the last bits, and a
    process started without OMP_NUM_THREADS takes as many as its CPU affinity allows."""
    return child_env(cuda, OMP_NUM_THREADS="1" if torchrun else os.environ.get("OMP_NUM_THREADS", "2"))


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(cpus):
    """preexec_fn for subprocess: run the child on these CPUs only (as `taskset -c` or a scheduler
    would), or None for no restriction."""
    return (lambda: os.sched_setaffinity(0, cpus)) if cpus else None


def run_script(args, cwd, torchrun=0, timeout=600, cuda=False, cpus=None):
    """Run `python SCRIPT ARGS` (or torchrun with that many processes) -> CompletedProcess, on the
    CPU unless cuda=True, pinned to the CPUs `cpus` when given. One that has not exited after
    `timeout` seconds is killed with all its processes and fails the test."""
    env = script_env(torchrun, cuda)
    script = os.path.join(ROOT, args[0])
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}", script]
    else:
        cmd = [sys.executable, script]
    proc = subprocess.Popen(cmd + [str(a) for a in args[1:]], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=pinned(cpus))
    out, err = communicate(proc, timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def communicate(proc, timeout):
    """proc.communicate(timeout); past it, kill the process and all its descendants and fail the test.
    An interrupted wait (Ctrl-C, or the SIGINT of tools/gpu_session.sh at a part's limit) kills them
    too: the child runs in a session of its own, so nothing else would stop torchrun's workers."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(map(str, proc.args))} did not exit within {timeout} s; killed it and "
                             f"its processes\n{out[-2000:]}\n{err[-2000:]}") from None
    except BaseException:
        kill_tree(proc.pid)
        raise


def descendants(pid):
    """Process ids of pid's children, their children, and so on (read from /proc)."""
    parent_of = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent_of[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass  # exited meanwhile
    found, frontier = [], [pid]
    while frontier:
        frontier = [p for p, parent in parent_of.items() if parent in frontier]
        found += frontier
    return found


def kill_tree(pid):
    """SIGKILL a process started with start_new_session and every process below it. torchrun starts
    each rank in a session of its own, so killing the launcher's process group would miss them;
    SIGKILL, because a rank stuck at exit may ignore SIGTERM."""
    tree = [pid, *descendants(pid)]  # before any dies: orphans lose their link to pid
    for p in tree:
        try:
            group = os.getpgid(p)
            if group != os.getpgrp():  # never the test's own group
                os.killpg(group, signal.SIGKILL)
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for_line(proc, text, timeout=120):
    """Read proc's output until a line contains text; after `timeout` s, kill it and all its processes."""
    timer = threading.Timer(timeout, kill_tree, [proc.pid])  # also ends a readline that waits forever
    timer.start()
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if text in line:
                return seen
    finally:
        timer.cancel()
    kill_tree(proc.pid)
    err = proc.stderr.read()[-3000:] if proc.stderr else ""
    raise AssertionError(f"never saw {text!r}; output:\n{''.join(seen)[-3000:]}\n{err}")


@pytest.fixture
def run(tmp_path):
    def _run(*args, torchrun=0, check=True, cuda=False):
        result = run_script(list(args), tmp_path, torchrun=torchrun, cuda=cuda)
        if check and result.returncode != 0:
            raise AssertionError(f"{args} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result
    return _run


def sigterm_after_steps(monkeypatch, progress, steps):
    """The tests' preemption: SIGTERM to this process once `progress` (the Progress class a training
    script counts its steps with) has counted `steps` steps -> the list of the step sizes it counted."""
    seen, real_update = [], progress.update

    def update(self, n):
        real_update(self, n)
        seen.append(n)
        if len(seen) == steps:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(progress, "update", update)
    return seen


@contextmanager
def own_signal_handlers():
    """The test's SIGTERM and SIGINT handlers back after the block, whatever it installed (the
    training scripts install their stop handlers: left in pytest's process, they would swallow a
    Ctrl-C or the SIGINT that ends a part of tools/gpu_session.sh)."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def call_main(monkeypatch, module, *argv):
    """module.main() in this process, as `python MODULE.py ARGV` runs it (on the GPU when there is one),
    the test's signal handlers back after it."""
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *map(str, argv)])
    with own_signal_handlers():
        return module.main()


@pytest.fixture
def in_process(monkeypatch):
    """Run a script's main() in this process, on the CPU: in_process(module, *argv) (call_main)."""
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return functools.partial(call_main, monkeypatch)
