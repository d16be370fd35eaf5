"""How a process of a run ends: which errors count as a dead peer on this torch version; a run
past its timeout is killed with every process it started."""
import time

import pytest
import torch.distributed as dist

from conftest import run_script
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
