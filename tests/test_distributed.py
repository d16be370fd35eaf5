"""Two processes under torchrun (gloo) against one process on the same global batch.

The reference runs the encoder on the same per-rank chunks (BN normalises per
process on CPU, as it does under DDP without SyncBatchNorm), concatenates the
embeddings, and takes the plain one-process loss. After DDP's gradient
averaging, every parameter gradient must match.
"""
import pytest
import torch

from conftest import run_script
from loss import nt_xent

import ddp_worker  # noqa: E402  (tests/ is on sys.path under pytest)


def reference(world):
    model = ddp_worker.make_model()
    x1, x2 = ddp_worker.make_batch()
    n = ddp_worker.GLOBAL_BATCH // world
    z1s, z2s = [], []
    for r in range(world):
        _, z = model(torch.cat([x1[r * n:(r + 1) * n], x2[r * n:(r + 1) * n]]))
        z1, z2 = z.chunk(2)
        z1s.append(z1)
        z2s.append(z2)
    value = nt_xent(torch.cat(z1s), torch.cat(z2s), ddp_worker.TEMPERATURE)
    value.backward()
    return value.detach(), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}


def run_worker(tmp_path, *extra):
    out = tmp_path / "ddp.pt"
    result = run_script(["tests/ddp_worker.py", out, *extra], tmp_path, torchrun=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out)


def test_two_processes_match_one_process(tmp_path):
    got = run_worker(tmp_path)
    ref_loss, ref_grads = reference(got["world"])
    assert got["loss"].item() == pytest.approx(ref_loss.item(), rel=1e-6)
    assert set(got["grads"]) == set(ref_grads) and len(ref_grads) > 50
    for name, g in ref_grads.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_gather_without_gradient_is_caught(tmp_path):
    """The negative control: the common port bug gives the same loss, wrong gradients."""
    got = run_worker(tmp_path, "--broken-gather")
    ref_loss, ref_grads = reference(got["world"])
    assert got["loss"].item() == pytest.approx(ref_loss.item(), rel=1e-6)
    worst = max(((got["grads"][k] - g).norm() / g.norm()).item() for k, g in ref_grads.items())
    assert worst > 0.05

