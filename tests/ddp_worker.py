"""One DDP step of SimCLR under torchrun (gloo, CPU); rank 0 saves the loss and
the averaged parameter gradients for tests/test_distributed.py to compare with
one process on the same global batch.

    torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py OUT.pt [--broken-gather] [--cuda]

--broken-gather swaps in the gather of several popular ports (all_gather with
no gradient, the local slice put back): the test must catch it.

--cuda (tests/test_cuda.py): every process on cuda:0, the model wrapped as the scripts wrap it
(distributed.wrap_ddp: SyncBatchNorm, DDP on the device), TF32 off; rank 0 also saves the BN
running statistics. The collectives go through gloo on CUDA tensors: NCCL refuses two ranks on
one GPU ("Duplicate GPU detected", ncclInvalidUsage), and one GPU is what a test machine has.
"""
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import loss  # noqa: E402
from model import ProjectionHead, SimCLR, build_encoder  # noqa: E402
from distributed import Context, teardown, wrap_ddp  # noqa: E402

GLOBAL_BATCH, SIZE, TEMPERATURE = 8, 16, 0.2


def make_model(arch="resnet18", cifar_stem=True, activation_checkpointing=False):
    """A narrow SimCLR (width 0.125, 16-d output), seeded, with every parameter nudged so that
    the last-BN gammas are non-zero and gradients reach every layer in one step."""
    torch.manual_seed(0)
    encoder = build_encoder(arch, width=0.125, cifar_stem=cifar_stem, activation_checkpointing=activation_checkpointing)
    model = SimCLR(encoder, ProjectionHead(encoder.feature_dim, out_dim=16))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def make_batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(GLOBAL_BATCH, 3, SIZE, SIZE, generator=g), torch.rand(GLOBAL_BATCH, 3, SIZE, SIZE, generator=g)


def broken_gather(x):
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def main():
    out = sys.argv[1]
    if "--broken-gather" in sys.argv:
        loss.gather_with_grad = broken_gather
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    n = GLOBAL_BATCH // world
    x1, x2 = make_batch()
    x1, x2 = x1[rank * n:(rank + 1) * n], x2[rank * n:(rank + 1) * n]
    if "--cuda" in sys.argv:
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # float32 to compare
        ctx = Context(ddp=True, rank=rank, world=world, local_rank=int(os.environ["LOCAL_RANK"]), device=device)
        model = wrap_ddp(make_model().to(device), ctx)
        assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
        x1, x2 = x1.to(device), x2.to(device)
    else:
        model = DDP(make_model())
    _, z = model(torch.cat([x1, x2]))
    z1, z2 = z.chunk(2)
    value = loss.nt_xent(z1, z2, TEMPERATURE)
    value.backward()
    mean_loss = value.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    if rank == 0:
        grads = {k: p.grad.cpu() for k, p in model.module.named_parameters() if p.grad is not None}
        stats = {k: v.cpu() for k, v in model.module.state_dict().items() if "running_" in k or "num_batches" in k}
        torch.save({"loss": mean_loss.cpu(), "grads": grads, "bn_stats": stats, "world": world}, out)
    teardown(0)  # as the scripts end: gloo's destructor can abort or hang at interpreter exit


if __name__ == "__main__":
    main()
