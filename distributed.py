"""Process set-up shared by the scripts: torchrun (NCCL on CUDA, gloo on CPU)
or one plain process on GPU or CPU, the GPU a process uses, the mixed precision
that fits it (--amp), the one-line error exit, a teardown that always ends the
process, stop signals, the global random generators' state, and the epoch accounting and results
file of the evaluation scripts."""
import datetime
import faulthandler
import gc
import inspect
import math
import os
import random
import signal
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import output


@dataclass
class Context:
    """What setup() decided for this process. `device` is the one device it uses: every DDP
    wrapper, .to() and torch.cuda call takes it (or its index). `local_rank` is the launcher's
    LOCAL_RANK, a position among the node's processes and no GPU index: a process that sees one
    GPU (srun --gpus-per-task=1) uses cuda:0 whatever its LOCAL_RANK."""
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
    it sees one process exit with an error). rank0_first's wait is not bounded by it."""
    global _PREPARE_GROUP
    ddp = "RANK" in os.environ
    world = int(os.environ.get("WORLD_SIZE", 1)) if ddp else 1
    if global_batch is not None and global_batch % world:
        fail(f"--batch-size {global_batch} does not divide by the {world} processes; use a multiple of {world}")
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if ddp else 0
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", gpu_index(local_rank, torch.cuda.device_count())) if cuda else torch.device("cpu")
    if ddp:
        if cuda:
            torch.cuda.set_device(device)
        # device_id (torch >= 2.3) binds the NCCL communicator to this GPU; without it barriers warn
        # that they guess the device
        bind = {"device_id": device} if cuda and "device_id" in inspect.signature(dist.init_process_group).parameters else {}
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes), **bind)
        # rank0_first's wait for rank 0 (an ImageNet scan on a slow disk can take longer than the collective
        # timeout) goes through a gloo group of its own with a long timeout. A rank 0 that dies still ends
        # it at once: gloo reads the closed connection. Held here until the process ends (see teardown).
        _PREPARE_GROUP = dist.new_group(backend="gloo", timeout=PREPARE_TIMEOUT)
    if cuda:
        # TF32 only where it is only speed: cuDNN convolutions (the encoder under --amp off; under amp
        # they run in bf16/fp16 anyway). Matmuls stay true float32: the loss logits, the kNN
        # similarities and the linear classifiers (docs/gpus.md, "What is float32"). (PyTorch's
        # defaults, set explicitly: a copied snippet may have turned matmul TF32 on.)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return Context(ddp, dist.get_rank() if ddp else 0, world, local_rank, device)


def wrap_ddp(model, ctx, sync_bn=True):
    """model, already on ctx.device, wrapped for training under torchrun: with several CUDA
    processes its BatchNorm layers become SyncBatchNorm (sync_bn: statistics over every process's
    batch), and DDP averages the gradients on this process's GPU, ctx.device. Without torchrun,
    the model itself.

    DDP takes ctx.device, never LOCAL_RANK: where each process sees only its own GPU, LOCAL_RANK
    3 uses cuda:0, and DDP given [3] accepts it, then fails at the first forward (it copies the
    inputs to cuda:3 on a side stream: torch/nn/parallel/_functions.py _get_stream indexes a list
    of device_count() streams, IndexError). One process gets no SyncBatchNorm: there it would
    fall back to plain BatchNorm anyway (SyncBatchNorm.forward, world size 1), and torch.compile
    compiles BatchNorm (pretrain.py --compile)."""
    if not ctx.ddp:
        return model
    if sync_bn and ctx.cuda and ctx.world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # the submodules are converted in place
    return DDP(model, device_ids=[ctx.device] if ctx.cuda else None)


PREPARE_TIMEOUT = datetime.timedelta(hours=24)  # rank0_first: how long the others wait for rank 0's preparation
_PREPARE_GROUP = None


def gpu_index(local_rank, visible):
    """The GPU of the process with this LOCAL_RANK, among the `visible` ones (CUDA_VISIBLE_DEVICES).

    torchrun on a node shows every process all GPUs: process LOCAL_RANK takes GPU LOCAL_RANK.
    A launcher that gives each process its own GPU (SLURM --gpus-per-task=1, or a
    CUDA_VISIBLE_DEVICES per process) shows it one, while LOCAL_RANK still counts the node's
    processes: it takes that one (torch.cuda.set_device(LOCAL_RANK) would fail there with
    "invalid device ordinal")."""
    if local_rank < visible:
        return local_rank
    if visible == 1:
        return 0
    fail(f"LOCAL_RANK is {local_rank} but this process sees {visible} GPUs "
         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start one process per GPU "
         "(torchrun --nproc_per_node=<GPUs>), or give each process one GPU (srun --gpus-per-task=1)")


# ----------------------------------------------------------------------------
# Mixed precision (--amp)

AMP_CHOICES = ("auto", "bf16", "fp16", "off")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def add_amp_flags(parser, default="auto", what="the encoder"):
    """--amp auto|bf16|fp16|off and --no-amp (= off) on an argparse parser or group."""
    parser.add_argument("--amp", nargs="?", const="auto", default=default, choices=AMP_CHOICES,
                        help=f"autocast precision of {what}; auto: bf16 on GPUs of compute capability >= 8.0 "
                             "(A100, H100, RTX 30xx/40xx), fp16 with dynamic loss scaling below (V100, T4, RTX 20xx), "
                             "off (float32) on the CPU. The loss and the classifiers stay float32")
    parser.add_argument("--no-amp", dest="amp", action="store_const", const="off", help="same as --amp off")


def resolve_amp(choice, device, train=True):
    """--amp on `device` -> (precision: "bf16", "fp16" or "off"; the start line that says which and why).

    auto picks bf16 on CUDA GPUs of compute capability 8.0 and newer, which have bf16 units;
    below (V100 7.0, T4 and RTX 20xx 7.5) torch 2.1-2.3 stop at the first bf16 step ("Current
    CUDA Device does not support bfloat16") and later versions emulate bf16 on slow paths, so
    auto picks fp16 there (training with loss scaling: see grad_scaler). On the CPU auto is off;
    an explicit bf16 or fp16 runs CPU autocast (fp16 where the installed torch has it)."""
    scaling = " + loss scaling" if train else ""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        gpu = f"{torch.cuda.get_device_name(device)}, compute capability {major}.{minor}"
        native_bf16 = major >= 8
        if choice == "auto":
            choice = "bf16" if native_bf16 else "fp16"
        if choice == "bf16" and not native_bf16:
            with torch.cuda.device(device):  # is_bf16_supported() asks about the current GPU
                emulated = torch.cuda.is_bf16_supported()
            if not emulated:
                fail(f"--amp bf16: the {gpu} has no bf16 and torch {torch.__version__} does not emulate it; "
                     "use --amp fp16 (or auto)")
            return "bf16", f"amp: bf16 as asked ({gpu}, no bf16 units: emulated, slow; --amp fp16 is fast here)"
        if choice == "off":
            return "off", f"amp: off (float32; {gpu})"
        return choice, f"amp: {choice}{scaling if choice == 'fp16' else ''} ({gpu}{', no bf16' if not native_bf16 else ''})"
    if choice in ("auto", "off"):
        return "off", "amp: off (float32" + (" on the CPU; --amp bf16 or fp16 runs CPU autocast)" if choice == "auto" else ")")
    if choice == "fp16" and not cpu_fp16_available():
        fail(f"--amp fp16 on the CPU needs CPU float16 autocast and a CPU GradScaler (torch 2.4 and later have "
             f"both); this is torch {torch.__version__}: use --amp bf16 or --amp off")
    return choice, f"amp: {choice}{scaling if choice == 'fp16' else ''} on the CPU (CPU autocast)"


def cpu_fp16_available():
    """Whether this torch runs float16 autocast and the GradScaler's kernels on the CPU
    (tried, since the versions differ: older ones warn and run float32)."""
    if not hasattr(torch.amp, "GradScaler"):
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.autocast("cpu", dtype=torch.float16):
                half = torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float16
            torch._amp_foreach_non_finite_check_and_unscale_([torch.ones(2)], torch.zeros(()), torch.ones(()))
        except (RuntimeError, NotImplementedError):
            return False
    return half


def grad_scaler(precision, device):
    """The dynamic loss scaler of fp16 training (None otherwise): torch.amp.GradScaler, or
    torch.cuda.amp.GradScaler on torch < 2.3, which lacks it. bf16 has float32's range and
    needs none."""
    if precision != "fp16":
        return None
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device.type)
    return torch.cuda.amp.GradScaler()


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
    An exception of the types in `errors` on rank 0 stops every process with its message.

    The waits (the others for rank 0, then rank 0 for the others) go through setup's gloo
    group, bounded by PREPARE_TIMEOUT, not by the collective timeout: scanning an ImageNet
    folder on a network disk can take longer. A process that dies meanwhile ends them at once."""
    error, result = None, None
    if ctx.master:
        try:
            result = build()
        except errors as e:
            error = str(e)
    if ctx.ddp:
        shared = [error]
        dist.broadcast_object_list(shared, src=0, group=_PREPARE_GROUP)
        error = shared[0]
    if error:
        fail(error)
    if not ctx.master:
        try:
            result = build()
        except errors as e:
            fail(str(e), every_rank=True)  # its own line, "(rank N)"
    if ctx.ddp:
        dist.barrier(group=_PREPARE_GROUP)
    return result


def all_sum(x, ctx):
    """Sum of a tensor over all processes (the tensor itself in one process)."""
    if ctx.ddp:
        x = x.clone()
        dist.all_reduce(x)
    return x


class EpochSums:
    """The accounting of one classifier epoch in linear_eval.py and finetune.py: the loss sum, the
    correct predictions and the image count, kept on the device so that no step waits for the host,
    summed over the processes once at the epoch's end (unless each process saw every image), checked
    for a non-finite loss, printed, and sent to TensorBoard.

        sums = EpochSums(device)
        for x, y in batches: ...; sums.add(loss, logits, y)
        train_loss, train_acc = sums.end(ctx, epoch, args.epochs, lr, t_epoch, board, "linear")
    """

    def __init__(self, device, start=None, accuracy="train acc"):
        """start: the sums so far of an epoch resumed in its middle (from `so_far`), on one rank only.
        accuracy: what the share of argmax(logits) == y is called (distill.py: agreement with the teacher)."""
        self.sums = torch.tensor(start if start else [0.0, 0.0, 0.0], device=device)  # loss sum, correct, count
        self.start, self.accuracy = time.time(), accuracy

    def so_far(self, ctx):
        """The sums of all processes so far (an all-reduce under torchrun): what a mid-epoch stop saves."""
        return all_sum(self.sums, ctx).tolist()

    def add(self, loss, logits, y):
        # the count made on the device: torch.tensor(n, device=...) is a copy the host waits for
        self.sums += torch.stack([loss.detach() * len(y), (logits.argmax(1) == y).sum().float(),
                                  torch.full((), float(len(y)), device=self.sums.device)])

    def end(self, ctx, epoch, epochs, lr, board, tag, step, reduce=True):
        """-> (mean loss, accuracy in %) of the epoch over all processes; reduce=False when every
        process saw the same images (linear_eval.py --cached-features)."""
        sums = all_sum(self.sums, ctx) if reduce else self.sums
        loss, acc = (sums[0] / sums[2]).item(), (100 * sums[1] / sums[2]).item()
        if not math.isfinite(loss):
            fail(f"{tag} loss is {loss} in epoch {epoch + 1}; lower --lr", code=3)
        if ctx.master:
            print(f"epoch {epoch + 1}/{epochs} loss {loss:.4f} {self.accuracy} {acc:.2f}% lr {lr:.4g} "
                  f"({time.time() - self.start:.1f}s)", flush=True)
        board.add(step, **{f"{tag}/train_loss": loss, f"{tag}/{self.accuracy.replace(' ', '_')}": acc, f"{tag}/lr": lr})
        return loss, acc


def write_results(results, path, ctx):
    """Rank 0 writes an evaluation's results as JSON, atomically (a temporary file, then a rename);
    a failed write is an output.WriteError (one line), leaving no temporary file."""
    if ctx.master:
        output.write_json(path, results, "--out")


class StopRequest:
    """SIGTERM / SIGINT (what schedulers send before preemption, and Ctrl-C) set a flag;
    the training loop acts on it at its next log line: saves, and exits. A SIGINT after any first
    signal (a Ctrl-C once the stop is under way) stops at once; further SIGTERMs (torchrun forwards
    the one it gets) do not interrupt the save."""

    def __init__(self):
        self.signum = 0
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a Ctrl-C after the first signal: stop without saving
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
