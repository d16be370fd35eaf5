"""How a process of a run ends (distributed.run and teardown): which errors count as a dead
peer on this torch version, the one-line messages and exit statuses with a real gloo
process group, the watchdog that bounds a teardown that does not finish, and a test run
past its timeout killed with every process it started."""
import signal
import subprocess
import sys
import time

import pytest
import torch.distributed as dist

from conftest import ROOT, child_env, communicate, free_port, run_script
import distributed
from distributed import DIST_ERRORS, peer_failure

GLOO_TEXT = "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:40049"


def test_peer_failure_classification():
    assert dist.DistBackendError in DIST_ERRORS  # every supported torch (>= 2.1) has it
    assert peer_failure(dist.DistBackendError("the peer vanished"))  # by type alone
    for cls in DIST_ERRORS:
        assert peer_failure(cls("no keyword in this text"))
    assert peer_failure(RuntimeError(GLOO_TEXT))
    assert peer_failure(RuntimeError("[Rank 0] Watchdog caught collective operation timeout: Timed out"))
    # An ordinary error is not a dead peer (on torch 2.1 this used to raise AttributeError).
    assert not peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied (16x64 and 32x10)"))
    assert not peer_failure(ValueError("bad value"))



# A one-process gloo group, set up as under torchrun, then distributed.run(main).
SCRIPT = """
import os, sys, time, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import distributed
distributed.TEARDOWN_SECONDS = 2
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="{port}")

def main():
    ctx = distributed.setup(global_batch=4)
    stop = distributed.StopRequest()  # as pretrain.py: SIGTERM only sets a flag during training
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 2))
    model(torch.ones(4, 3)).sum().backward()
    print("trained", end="")  # no newline, no flush: teardown must flush it
    {body}

distributed.run(main, (ValueError,))
"""


def run_main(body, timeout=120):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT.format(root=ROOT, port=port, body=body)],
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    t0 = time.time()
    out, err = communicate(proc, timeout)
    return proc.returncode, out, err, time.time() - t0


@pytest.mark.parametrize("body,status,line", [
    ("pass", 0, None),
    ("distributed.fail('bad input')", 2, "-c: error: bad input"),
    ("raise ValueError('no such file')", 2, "-c: error: no such file"),
    ("raise dist.DistBackendError('the peer vanished')", 4,
     "-c (rank 0): error: another process of this run died or stopped answering (the peer vanished); "
     "find the first error above"),
    (f"raise RuntimeError({GLOO_TEXT!r})", 4,
     f"-c (rank 0): error: another process of this run died or stopped answering ({GLOO_TEXT}); "
     "find the first error above"),
])
def test_exit_status_and_one_line(body, status, line):
    code, out, err, _ = run_main(body)
    assert code == status, err
    assert out == "trained"
    assert err.splitlines() == ([line] if line else []), err


def test_an_unexpected_error_keeps_its_traceback():
    code, out, err, _ = run_main("raise KeyError('bug')")
    assert code == 1 and out == "trained"
    assert "Traceback" in err and "KeyError: 'bug'" in err


def test_watchdog_ends_a_teardown_that_blocks_with_the_runs_status():
    # destroy_process_group waiting forever (as on a hung NCCL peer), the GIL released
    code, out, err, seconds = run_main("dist.destroy_process_group = lambda group=None: time.sleep(600)")
    assert code == 0 and out == "trained"
    assert "-c (rank 0): teardown did not finish within 2 s; exiting with status 0" in err
    assert 2 <= seconds < 90  # the interpreter's start included: generous on loaded machines


def test_a_teardown_that_holds_the_gil_still_ends():
    # A C call that never returns and holds the GIL (as gloo's destructor did): the watchdog
    # thread cannot run, faulthandler's thread exits with status 1 and every thread's stack.
    code, out, err, seconds = run_main("import ctypes; dist.destroy_process_group = "
                                       "lambda group=None: ctypes.PyDLL(None).sleep(600)")
    assert code == 1 and out == "trained"
    assert "most recent call first" in err and "teardown did not finish" not in err
    assert 4 <= seconds < 90

def test_sigterm_ends_a_teardown_at_once():
    # The stop-request handler is gone in teardown: a scheduler's SIGTERM is no longer ignored.
    code, out, err, seconds = run_main("import signal; dist.destroy_process_group = lambda group=None: "
                                       "(os.kill(os.getpid(), signal.SIGTERM), time.sleep(600))")
    assert code == -signal.SIGTERM and out == "trained"
    assert "teardown did not finish" not in err


# A rank other than 0 that meets an error rank 0 reports too (no process group needed).
OTHER_RANK = """import os, sys
sys.path.insert(0, {root!r})
os.environ.update(RANK="1", WORLD_SIZE="2")
import distributed
distributed.RANK0_GRACE_SECONDS = {grace}

def main():
    stop = distributed.StopRequest()  # as pretrain.py: SIGTERM only sets a flag during training
    print("failing", flush=True)
    distributed.fail("bad input")

distributed.run(main, (ValueError,))
"""


def test_another_rank_waits_for_rank_0_and_speaks_if_it_does_not():
    """torchrun stops every process once one exits with an error: a rank that exited first could
    cut rank 0 off before its one line. The others wait; torchrun's SIGTERM (sent once rank 0 has
    exited) ends them at once, silently; one that outlives the grace says its error itself."""
    proc = subprocess.Popen([sys.executable, "-c", OTHER_RANK.format(root=ROOT, grace=600)], env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout.readline() == "failing\n"
    time.sleep(0.5)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = communicate(proc, 60)
    assert proc.returncode == -signal.SIGTERM and time.time() - t0 < 30 and err == "", err
    proc = subprocess.Popen([sys.executable, "-c", OTHER_RANK.format(root=ROOT, grace=1)], env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    out, err = communicate(proc, 60)
    assert proc.returncode == 2 and err.splitlines() == ["-c (rank 1): error: bad input"], err


HANG = """import os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as a rank stuck at exit did
open(f"pid{os.environ['RANK']}", "w").write(str(os.getpid()))
time.sleep(600)
"""


def test_a_run_past_its_timeout_is_killed_with_all_its_processes(tmp_path):
    (tmp_path / "hang.py").write_text(HANG)
    with pytest.raises(AssertionError, match="did not exit within 20 s"):
        run_script([str(tmp_path / "hang.py")], tmp_path, torchrun=2, timeout=20)
    pids = [int((tmp_path / f"pid{rank}").read_text()) for rank in (0, 1)]  # both ranks had started
    deadline = time.time() + 10
    while any(alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in pids)


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_ctrl_c_after_any_first_signal_stops_at_once_and_sigterms_do_not():
    """What the first signal's message promises ("Ctrl-C again to stop without saving") holds after
    a SIGTERM too; a forwarded second SIGTERM never interrupts the save."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for first in (signal.SIGTERM, signal.SIGINT):
            stop = distributed.StopRequest()
            stop._handle(first, None)
            stop._handle(signal.SIGTERM, None)  # torchrun forwarding the one it got
            assert stop.signum == first
            with pytest.raises(KeyboardInterrupt):
                stop._handle(signal.SIGINT, None)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
