"""Process set-up shared by the scripts: torchrun (NCCL on CUDA, gloo on CPU)
or one plain process on GPU or CPU, the one-line error exit, a teardown that
always ends the process, stop signals, and the global random generators' state."""
import datetime
import faulthandler
import gc
import os
import random
import signal
import sys
import threading
import time
import traceback
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


RANK0_GRACE_SECONDS = 30  # how long another rank waits for rank 0 to report an error they share


def fail(message, code=2, every_rank=False):
    """Exit with one line on stderr (from rank 0 only under torchrun, unless every_rank), no traceback.
    Inside run(), the process group is then torn down there (see teardown).

    Under torchrun the other ranks, which meet the same error, wait: torchrun stops every
    process as soon as one exits with an error, so one that exited first could cut rank 0 off
    before its line is out. Once rank 0 has exited, torchrun's SIGTERM ends the wait at once; a
    rank still waiting after RANK0_GRACE_SECONDS met an error of its own, and says it."""
    rank = int(os.environ.get("RANK", 0))
    if rank != 0 and not every_rank:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not a stop request now: end the process
        time.sleep(RANK0_GRACE_SECONDS)
        every_rank = True
    if rank == 0 or every_rank:
        where = f" (rank {rank})" if every_rank and "RANK" in os.environ else ""
        print(f"{os.path.basename(sys.argv[0])}{where}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


PEER_FAILED = 4  # the exit status of a process whose peer died or stopped answering
OUT_OF_MEMORY = 5  # the exit status of a process that ran out of memory (its peers may wait in a collective)


def run(main, errors, describe=str, peer_hint="find the first error above"):
    """Run a script's main() and end the process with its status: 0, fail()'s code, 128 + signal
    after a stop request, or 1 after an unexpected error (with its traceback).

    An exception of the types in `errors`, raised anywhere (data workers included), ends it with
    one line, `describe(e)`; so does a collective failing because another process died or
    stopped answering, on every rank, with `peer_hint`. Under torchrun the process group is
    then torn down in an order that cannot hang (see teardown)."""
    try:
        try:
            main()
        except errors as e:
            fail(describe(e))
        except RuntimeError as e:
            if not (dist.is_available() and dist.is_initialized() and peer_failure(e)):
                raise
            fail(f"another process of this run died or stopped answering ({' '.join(str(e).split())[:200]}); "
                 f"{peer_hint}", code=PEER_FAILED, every_rank=True)
    except SystemExit as e:  # fail(), a stop request, argparse
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        status = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    except BaseException as e:  # a bug, or a second Ctrl-C: keep the traceback
        traceback.print_exc()
        status = 130 if isinstance(e, KeyboardInterrupt) else 1
    else:
        status = 0
    # Here main()'s frames are gone, and with them the references to the DDP wrapper, whose
    # reducer holds the process group, and to the data loaders.
    if dist.is_available() and dist.is_initialized():
        teardown(status, destroy=status not in (PEER_FAILED, OUT_OF_MEMORY))
    sys.exit(status)


# Torch >= 2.2 raises DistError (or a subclass) from a failed collective; torch 2.1 has only
# DistBackendError, and older builds neither.
DIST_ERRORS = tuple(getattr(dist, name) for name in ("DistError", "DistBackendError") if hasattr(dist, name))


def peer_failure(e):
    """Whether an error comes from a collective whose peer process died or stopped answering."""
    text = str(e)
    return isinstance(e, DIST_ERRORS) or any(
        s in text for s in ("gloo", "NCCL", "Connection reset by peer", "Connection closed", "Timed out", "timed out"))


TEARDOWN_SECONDS = 60  # a teardown that takes longer is abandoned: every result is saved before it starts


def teardown(status, destroy=True):
    """Destroy the process group and end the process with `status`, in an order that cannot hang.

    run() calls it once main() has returned. gc.collect() first frees whatever reference cycles
    still hold (a DDP wrapper, data loaders and their workers) while the group is registered,
    so freeing them destroys nothing. destroy_process_group() then shuts the backends down
    (NCCL aborts its communicators) and forgets the group. The process ends with os._exit,
    after flushing output, while this function still holds the last reference to the group.

    Why not let Python free the group: dropping its last reference on the main thread runs the
    gloo backend's C++ destructor, which joins gloo's worker threads while holding the GIL. A
    worker that still needs the GIL (to free the Python object of a finished collective's
    tensor, for one) then waits for it forever, and so does the main thread: a finished run
    that never exits and ignores SIGTERM (seen intermittently on torch 2.1 and 2.4, with stack
    dumps). The operating system reclaims those threads and sockets at exit instead.

    destroy=False (a peer died) skips destroy_process_group, which could wait on the dead peer.
    Whatever still blocks is bounded: SIGTERM and SIGINT end the process at once again (the
    results are saved), and a watchdog exits with `status` after TEARDOWN_SECONDS. The watchdog
    is a Python thread, so it cannot run while a C++ call holds the GIL; for that case
    faulthandler's own thread dumps every thread's stack and exits with status 1 at twice that time."""
    for out in (sys.stdout, sys.stderr):
        out.flush()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    threading.Thread(target=_exit_after, args=(TEARDOWN_SECONDS, status), daemon=True).start()
    faulthandler.dump_traceback_later(2 * TEARDOWN_SECONDS, exit=True)  # see the docstring's last line
    gc.collect()
    world = dist.group.WORLD  # held until os._exit, so the group's destructor never runs (see above)
    if destroy:
        try:
            dist.destroy_process_group(world)
        except Exception as e:  # exit anyway: the results are saved
            print(f"warning: destroying the process group failed: {' '.join(str(e).split())[:200]}",
                  file=sys.stderr)
    for out in (sys.stdout, sys.stderr):
        out.flush()
    os._exit(status)


def _exit_after(seconds, status):
    time.sleep(seconds)
    who = f" (rank {os.environ['RANK']})" if "RANK" in os.environ else ""
    print(f"{os.path.basename(sys.argv[0])}{who}: teardown did not finish within {seconds} s; exiting with "
          f"status {status} (results were saved before it began)", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(status)


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
    the training loop acts on it at its next log line: saves, and exits. A second SIGINT stops at once;
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
        print(f"{who}received {signal.Signals(signum).name}: stopping at the next log line and saving "
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
