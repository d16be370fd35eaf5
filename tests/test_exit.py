"""How a process of a run ends: which errors count as a dead peer on this torch version."""
import torch.distributed as dist

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
