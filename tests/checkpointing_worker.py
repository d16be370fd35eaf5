"""Two SimCLR steps (LARS update in between) of the same model with and without
activation checkpointing, under DDP with torchrun (gloo, CPU); rank 0 saves, for
every step, the loss, the averaged gradients and the BN buffers of both, and the
final weights, for tests/test_checkpointing.py to compare.

    torchrun --standalone --nproc_per_node=2 tests/checkpointing_worker.py OUT.pt [--cuda]

--cuda (for tests/test_cuda.py): every process on cuda:0, the model wrapped as pretrain.py wraps it
(distributed.wrap_ddp: SyncBatchNorm, DDP on the device), so the recomputation inside the backward
pass runs SyncBatchNorm's autograd function again, with its all-gather of the statistics, while its
running statistics stay frozen (model.frozen_running_stats). Nothing else runs that path: on the CPU
there is no SyncBatchNorm, and one process falls back to BatchNorm. The collectives go through gloo on
CUDA tensors (NCCL refuses two ranks on one GPU, see ddp_worker.py); TF32 off and deterministic cuDNN,
so that the two models differ only by the recomputation.
"""
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ddp_worker  # noqa: E402  (this folder, tests/, is on sys.path: the script's own, or pytest's)
from lars import LARS  # noqa: E402
from loss import nt_xent  # noqa: E402
from model import save_atomic  # noqa: E402
from distributed import Context, teardown, wrap_ddp  # noqa: E402

GLOBAL_BATCH, SIZE = 8, 32


def make_model(checkpointing):
    """A narrow ResNet-50 with the ImageNet stem (so the stem is checkpointed too)."""
    return ddp_worker.make_model("resnet50", cifar_stem=False, activation_checkpointing=checkpointing)


def two_steps(model, views, step_model=None):
    """views: one (2n, 3, H, W) batch per step -> per step (loss, grads, buffers), final weights.
    step_model: what runs forward/backward (a DDP wrapper of model), default model itself."""
    step_model = step_model or model
    optimizer = LARS(model.parameters(), lr=0.5, weight_decay=1e-4)
    steps = []
    for x in views:
        optimizer.zero_grad(set_to_none=True)
        _, z = step_model(x)
        loss = nt_xent(*z.chunk(2), temperature=0.2)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        steps.append({"loss": loss.detach().clone(), "grads": grads,
                      "buffers": {k: b.clone() for k, b in model.named_buffers()}})
        optimizer.step()
    return steps, {k: p.detach().clone() for k, p in model.named_parameters()}


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(2 * n, 3, SIZE, SIZE, generator=g) for _ in range(2)]


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    n = GLOBAL_BATCH // world
    views = [x.view(2, GLOBAL_BATCH, 3, SIZE, SIZE)[:, rank * n:(rank + 1) * n].reshape(2 * n, 3, SIZE, SIZE)
             for x in batches(GLOBAL_BATCH)]  # this rank's images, both views
    cuda = "--cuda" in sys.argv
    if cuda:
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.deterministic = True
        ctx = Context(ddp=True, rank=rank, world=world, local_rank=int(os.environ["LOCAL_RANK"]), device=device)
        views = [x.to(device) for x in views]
    results = {}
    for checkpointing in (False, True):
        model = make_model(checkpointing)
        if cuda:
            step_model = wrap_ddp(model.to(device), ctx)  # BN layers become SyncBatchNorm in place, in `model`
            assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()) > 50
        else:
            step_model = DDP(model)
        results[checkpointing] = two_steps(model, views, step_model)
    if rank == 0:
        save_atomic(results, sys.argv[1])  # tensors on the CPU, for a file any machine can read
    teardown(0)  # as the scripts end: gloo's destructor can abort or hang at interpreter exit


if __name__ == "__main__":
    main()
