"""Exact resume of the training scripts (pretrain.py, finetune.py, distill.py): the resume state
they write at the end of every epoch and when a stop signal ends a run mid-epoch, and what
--resume reads back, so that the resumed run takes the very steps the uninterrupted one would.

    resume = prepare(ckpt_path, args.resume, args.auto_resume, ctx.master)   # decides; makes nothing
    remove_leftovers(ckpt_path, other_outputs)                               # once every input is checked
    epoch, step, sums, ckpt = load_state(ckpt_path, model, optimizer, scaler, steps_per_epoch, args,
                                         encoder.config, compared=("lr", "batch_size"))
    ... every few steps:  if stop_agreed(stop, ctx): stop_and_exit(ctx, stop, save_mid_epoch, where, ckpt_path)
    ... each epoch's end: save_state(ckpt_path, model, optimizer, scaler, epoch + 1, 0, steps_per_epoch, [], args)

The state is a plain dict (torch.load(weights_only=True) reads it) written atomically: the model
(unwrapped), optimizer, fp16 loss scaler, complete epochs, steps done in the next one, the epoch's
running sums so far, the global random generators, the CPU thread count and the arguments. The
data order and every augmentation are seeded by (seed, epoch, index) (data.SeededTransform), so
skipping the steps already done is all a mid-epoch resume needs on the data side.
"""
import os
import signal
import sys

import torch
import torch.distributed as dist

import output
from distributed import all_sum, fail, restore_rng_states, rng_states
from model import CHECKPOINT_FORMAT, read_checkpoint, save_atomic, tensor_bytes, unwrap

# How often finetune.py and distill.py look for a stop signal under torchrun: every rank must stop
# after the same step, which takes an all-reduce the host waits for (in one process: every step, free).
STOP_CHECK_STEPS = 10


def prepare(ckpt_path, resume, auto_resume, master, flag="--out"):
    """The resume decision -> whether to resume from ckpt_path. One line when --resume finds nothing,
    or when a state exists and --resume was not given (nothing is overwritten); rank 0 also checks,
    without making anything, that the folder can be written (output.check_folder)."""
    if auto_resume:
        resume = os.path.exists(ckpt_path)
    if resume and not os.path.exists(ckpt_path):
        fail(f"--resume: nothing to resume, {ckpt_path} does not exist")
    if not resume and os.path.exists(ckpt_path):
        fail(f"{ckpt_path} already exists; pass --resume to continue that run, or choose another {flag}")
    if master:
        output.check_folder(os.path.dirname(os.path.abspath(ckpt_path)), flag, create=False)
    return resume


def remove_leftovers(*paths):
    """Remove what a save that was killed left beside these files (PATH.tmp.*): the files themselves
    are intact. Rank 0 calls it once the run's inputs are checked and its folder is made."""
    for path in paths:
        folder, name = os.path.split(os.path.abspath(path))
        if os.path.isdir(folder):
            for leftover in os.listdir(folder):
                if leftover.startswith(f"{name}.tmp."):
                    os.remove(os.path.join(folder, leftover))


def kept_text(path, saved):
    """What the folder holds for a resume, for an error line. saved: (complete epochs, steps of the
    next one) of the last state written by this run or the one it resumed, or None."""
    if saved is None:
        return "no checkpoint was written yet"
    epoch, step = saved
    where = f"epoch {epoch}" + (f" and {step} steps of epoch {epoch + 1}" if step else "")
    return f"{path} holds the run after {where} (--resume continues from there)"


def save_state(path, model, optimizer, scaler, epochs_done, step_in_epoch, steps_per_epoch, sums, args,
               kept=None, flag="--out", **extra):
    """Write the resume state atomically (rank 0 calls it). sums: the running sums of the epoch
    stopped in (floats), [] at an epoch's end. A write that fails is one line (output.WriteError)
    that ends with `kept` (kept_text: what is on disk instead) and leaves the file as it was."""
    model = unwrap(model)
    encoder = getattr(model, "encoder", model)
    state = {
        "format": CHECKPOINT_FORMAT,
        "encoder_config": dict(encoder.config),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epochs_done,               # complete epochs
        "step_in_epoch": step_in_epoch,     # steps done in the next one (stopped mid-epoch)
        "step": epochs_done * steps_per_epoch + step_in_epoch,  # the learning-rate schedule's position
        "steps_per_epoch": steps_per_epoch,
        "epoch_sums": list(sums),
        "scaler": scaler.state_dict() if scaler is not None else None,  # fp16 loss scaling
        "rng": rng_states(),
        "cpu_threads": torch.get_num_threads(),  # CPU sums depend on it (see load_state)
        "args": vars(args),
        **extra,
    }
    with output.writing(path, flag, needed=tensor_bytes(state), after=f"; {kept}" if kept else ""):
        save_atomic(state, path)


def load_state(path, model, optimizer, scaler, steps_per_epoch, args, encoder_config, compared=(), master=True,
               saved_defaults=None):
    """Load a resume state into the model, optimizer and fp16 loss scaler and restore the random
    generators -> (epoch, step in that epoch, the epoch's sums so far, the state dict). One line
    when it holds another model or stopped mid-epoch in epochs of another length. A state without
    a scaler state (bf16 or float32 run) resumes an fp16 run with a fresh scaler. The arguments
    named in `compared` that differ from the saved ones are printed as a warning; `saved_defaults`
    stands in for arguments a state written by an older version does not hold."""
    ckpt = read_checkpoint(path)
    if ckpt.get("encoder_config") != encoder_config or "model" not in ckpt or "optimizer" not in ckpt:
        fail(f"{path} holds a {ckpt.get('encoder_config')} model, not the {encoder_config} "
             "these flags ask for; resume with the original flags")
    try:
        unwrap(model).load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
    except (RuntimeError, ValueError, KeyError) as e:
        fail(f"{path} does not fit the model these flags build ({' '.join(str(e).split())[:240]}); "
             "resume with the original flags")
    start_epoch, start_step = ckpt["epoch"], ckpt.get("step_in_epoch", 0)
    if start_step and ckpt.get("steps_per_epoch") != steps_per_epoch:
        fail(f"{path} stopped in the middle of an epoch of {ckpt.get('steps_per_epoch')} steps, but these "
             f"flags make epochs of {steps_per_epoch}; resume with the original dataset and --batch-size")
    if "rng" in ckpt:
        restore_rng_states(ckpt["rng"])
    threads = ckpt.get("cpu_threads")
    if master and threads and threads != torch.get_num_threads() and not torch.cuda.is_available():
        print(f"note: {path} was written by a process with {threads} CPU thread{'s' * (threads > 1)}, this "
              f"one has {torch.get_num_threads()}: the CPU kernels split their sums by thread, so the resumed run "
              f"differs from an uninterrupted one in the last bits; with OMP_NUM_THREADS={threads} it is bitwise "
              "the same", flush=True)
    saved = {**(saved_defaults or {}), **(ckpt.get("args") or {})}
    changed = {k: (saved.get(k), v) for k, v in vars(args).items() if k in compared and saved.get(k) != v}
    if changed and master:
        print(f"warning: resuming with changed settings (checkpoint -> now): {changed}", flush=True)
    if scaler is not None and not ckpt.get("scaler") and master:
        print(f"note: {path} holds no fp16 loss-scaler state; the scaler starts afresh", flush=True)
    sums = list(ckpt.get("epoch_sums", [])) if start_step else []
    return start_epoch, start_step, sums, ckpt


def stop_agreed(stop, ctx):
    """Whether any process received a stop signal (the same answer on every rank). Under torchrun an
    all-reduce the host waits for; in one process a look at the flag."""
    if not ctx.ddp:
        return stop.signum != 0
    return all_sum(torch.tensor([float(stop.signum)], device=ctx.device), ctx).item() > 0


def stop_due(ctx, step_in_epoch):
    """Whether finetune.py and distill.py look for a stop signal after this step (see STOP_CHECK_STEPS)."""
    return not ctx.ddp or step_in_epoch % STOP_CHECK_STEPS == 0


def stop_and_exit(ctx, stop, save, where, path):
    """After a stop signal: rank 0 runs save() (None: nothing new to save) and says where the run
    stopped (`where`) and how to continue; every process then exits with 128 + the signal."""
    if ctx.master:
        if save is not None:
            save()
        cause = signal.Signals(stop.signum).name if stop.signum else "a signal to another process"
        print(f"stopped by {cause} {where}; saved {path}. Run the same command with --resume (or "
              "--auto-resume) to continue exactly from here", file=sys.stderr, flush=True)
    if ctx.ddp:
        dist.barrier()  # nobody exits before rank 0 has written the state
    sys.exit(128 + (stop.signum or signal.SIGTERM))
