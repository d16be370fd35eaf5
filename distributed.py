"""Process set-up shared by the scripts: torchrun (NCCL on CUDA, gloo on CPU)
or one plain process on GPU or CPU, and the one-line error exit."""
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Context:
    ddp: bool
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def master(self):
        return self.rank == 0

    @property
    def cuda(self):
        return self.device.type == "cuda"


def setup(global_batch=None):
    """Initialise the process group under torchrun; check the batch divides by the processes."""
    ddp = "RANK" in os.environ
    world = int(os.environ.get("WORLD_SIZE", 1)) if ddp else 1
    if global_batch is not None and global_batch % world:
        fail(f"--batch-size {global_batch} does not divide by the {world} processes; use a multiple of {world}")
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if ddp else 0
    cuda = torch.cuda.is_available()
    if ddp:
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return Context(ddp, dist.get_rank() if ddp else 0, world, local_rank, device)


def fail(message, code=2):
    """Exit with one line on stderr (from rank 0 only under torchrun), no traceback."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr, flush=True)
    cleanup()
    sys.exit(code)


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank0_first(ctx, build, errors):
    """build() on rank 0 (which may download), then on the others once it worked.
    An exception of the types in `errors` on rank 0 stops every process with its message."""
    error, result = None, None
    if ctx.master:
        try:
            result = build()
        except errors as e:
            error = str(e)
    if ctx.ddp:
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error:
        fail(error)
    if not ctx.master:
        try:
            result = build()
        except errors as e:
            fail(f"rank {ctx.rank}: {e}")
    return result


def all_mean(x, ctx):
    """Mean of a tensor over all processes (the tensor itself in one process)."""
    if ctx.ddp:
        x = x.clone()
        dist.all_reduce(x)
        x /= ctx.world
    return x
