"""Process set-up shared by the scripts: torchrun (NCCL on CUDA, gloo on CPU)
or one plain process on GPU or CPU, the one-line error exit, stop signals,
and the global random generators' state."""
import datetime
import os
import random
import signal
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


def setup(global_batch=None, timeout_minutes=10):
    """Initialise the process group under torchrun; check the batch divides by the processes.

    timeout_minutes bounds how long a collective waits for a process that died or hangs:
    the others then fail instead of waiting forever (torchrun also stops them as soon as
    it sees one process exit with an error)."""
    ddp = "RANK" in os.environ
    world = int(os.environ.get("WORLD_SIZE", 1)) if ddp else 1
    if global_batch is not None and global_batch % world:
        fail(f"--batch-size {global_batch} does not divide by the {world} processes; use a multiple of {world}")
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if ddp else 0
    cuda = torch.cuda.is_available()
    if ddp:
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return Context(ddp, dist.get_rank() if ddp else 0, world, local_rank, device)


def fail(message, code=2, every_rank=False):
    """Exit with one line on stderr (from rank 0 only under torchrun, unless every_rank), no traceback."""
    rank = int(os.environ.get("RANK", 0))
    if rank == 0 or every_rank:
        where = f" (rank {rank})" if every_rank and "RANK" in os.environ else ""
        print(f"{os.path.basename(sys.argv[0])}{where}: error: {message}", file=sys.stderr, flush=True)
    if not every_rank:  # every_rank: a peer failed, and tearing down the group could block on it
        cleanup()
    sys.exit(code)


def run(main, errors, describe=str, peer_hint="find the first error above"):
    """Run a script's main(): an exception of the types in `errors`, raised anywhere (data
    workers included), ends it with one line, `describe(e)`; so does a collective failing
    because another process died or stopped answering, on every rank, with `peer_hint`."""
    try:
        main()
    except errors as e:
        fail(describe(e))
    except RuntimeError as e:
        if not (dist.is_available() and dist.is_initialized() and peer_failure(e)):
            raise
        fail(f"another process of this run died or stopped answering ({' '.join(str(e).split())[:200]}); "
             f"{peer_hint}", code=4, every_rank=True)


# Torch >= 2.2 raises DistError (or a subclass) from a failed collective; torch 2.1 has only
# DistBackendError, and older builds neither.
DIST_ERRORS = tuple(getattr(dist, name) for name in ("DistError", "DistBackendError") if hasattr(dist, name))


def peer_failure(e):
    """Whether an error comes from a collective whose peer process died or stopped answering."""
    text = str(e)
    return isinstance(e, DIST_ERRORS) or any(
        s in text for s in ("gloo", "NCCL", "Connection reset by peer", "Connection closed", "Timed out", "timed out"))


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


def all_sum(x, ctx):
    """Sum of a tensor over all processes (the tensor itself in one process)."""
    if ctx.ddp:
        x = x.clone()
        dist.all_reduce(x)
    return x


class StopRequest:
    """SIGTERM / SIGINT (what schedulers send before preemption, and Ctrl-C) set a flag;
    the training loop finishes its step, saves, and exits. A second SIGINT stops at once;
    further SIGTERMs (torchrun forwards the one it gets) do not interrupt the save."""

    def __init__(self):
        self.signum = 0
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C
        self.signum = self.signum or signum
        who = f"rank {os.environ['RANK']} " if "RANK" in os.environ else ""
        print(f"{who}received {signal.Signals(signum).name}: stopping after this step and saving "
              "(Ctrl-C again to stop without saving)", file=sys.stderr, flush=True)


def rng_states():
    """The global generators (training itself draws only from seeded generators)."""
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states):
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
