"""SimCLR pretraining (Chen et al. 2020): one process on GPU/CPU, or torchrun DDP.

  python pretrain.py --dataset cifar10 --data-dir data --arch resnet18 --batch-size 512 --epochs 1000
  torchrun --nproc_per_node=8 pretrain.py --dataset imagefolder --data-dir /data/imagenet --batch-size 4096

Defaults are the paper's ImageNet run (ResNet-50, 224 px, batch 4096, 100 epochs, LARS at lr
0.3 x batch/256, temperature 0.1, weight decay 1e-6). For CIFAR and images <= 32 px, unset flags
take the official README's CIFAR recipe: CIFAR stem, colour strength 0.5, no blur, temperature 0.5,
lr 1.0 x batch/256, weight decay 1e-4. The resolved settings are printed at start. Writes
OUT/ckpt.pt (for --resume), OUT/encoder.pt (for linear_eval.py, finetune.py, export.py) and
OUT/log.jsonl at the end of every epoch, and when SIGTERM or SIGINT stops the run.

Exit status: 0 done, 2 bad input or an --out that cannot be written (read-only, full, a file in the
way), 3 non-finite loss, 4 another process died, 5 out of memory, 128 + N stopped by signal N (saved;
resume with --resume).

Every flag, the outputs and a healthy run: docs/pretraining.md. GPUs: docs/gpus.md. What the
options beyond the official recipe did on Fashion-MNIST: docs/results.md.
"""
import argparse
import datetime
import json
import os
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
import torchvision

import data
import flags
import output
import resume
from augment import CROP_SAMPLERS, EvalTransform, SimCLRViews, distort
from board import Board
from distributed import (AMP_DTYPES, OUT_OF_MEMORY, StopRequest, add_amp_flags, all_sum, fail, grad_scaler,
                         rank0_first, resolve_amp, run, setup, wrap_ddp)
from features import extract_features, knn_accuracy
from lars import LARS, gradients_finite, scaled_lr, warmup_cosine
from loss import contrast_accuracy, contrastive_logits
from model import (ARCHS, CONV_INITS, INPUT_NORMS, CheckpointError, ProjectionHead, SimCLR, build_encoder,
                   save_encoder, tensor_bytes, unwrap)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_Formatter)
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default="imagefolder", choices=data.DATASETS,
                   help="imagefolder: DIR/train/CLASS/* (labels ignored); folder: every image under DIR, any "
                        "layout, no labels; stl10: train+unlabeled; synthetic: generated images, no download")
    d.add_argument("--data-dir", default="data", help="dataset root; CIFAR/STL-10/MNIST/Fashion-MNIST are downloaded here if missing")
    d.add_argument("--image-size", type=int, default=None,
                   help="crop size; default: 224 imagefolder, 96 stl10, 28 mnist/fashionmnist, 32 cifar/synthetic")
    d.add_argument("--synthetic-size", type=int, default=512, help="number of generated training images")
    d.add_argument("--max-images", type=int, default=None,
                   help="use only the first N images of each split (pretraining, kNN train and test): a quick "
                        "end-to-end check of a large dataset before the real run")
    d.add_argument("--workers", type=int, default=None, help="data loading processes per rank; default: CPUs / ranks, at most 8")
    d.add_argument("--scaled-decode", action=argparse.BooleanOptionalAction, default=None,
                   help="decode a JPEG at 1/4 or 1/8 of its size (libjpeg's DCT scaling) when both crops still have "
                        "--image-size pixels each way there: 12 MP photos 2-3x cheaper to crop; the same crops, "
                        "pixels within a level on average. Default: on for folder and imagefolder (the JPEG files); "
                        "no effect on the other datasets")
    m = p.add_argument_group("model")
    m.add_argument("--arch", default="resnet50", choices=list(ARCHS))
    m.add_argument("--width", type=float, default=1, help="channel multiplier of every convolution (paper: 1, 2, 4)")
    m.add_argument("--cifar-stem", action=argparse.BooleanOptionalAction, default=None,
                   help="3x3 stride-1 stem without max-pool; default: on for images <= 32 px")
    m.add_argument("--zero-init-residual", action=argparse.BooleanOptionalAction, default=True,
                   help="start the last BN gamma of every residual block at 0 (official); --no-zero-init-residual: "
                        "at 1, as torchvision and lightly")
    m.add_argument("--sk-ratio", type=float, default=0.0,
                   help="selective kernels with ResNet-D stem and shortcuts (SimCLRv2 'sk1': 0.0625; "
                        "resnet50/101/152 only); 0: plain ResNet")
    m.add_argument("--input-norm", default="none", choices=tuple(INPUT_NORMS),
                   help="beyond the official recipe: 'imagenet' feeds the encoder (x - mean) / std with ImageNet's "
                        "mean and std (torchvision's and lightly's transforms); saved with the encoder, so eval "
                        "scripts apply it too. Default 'none': [0, 1] pixels, as the official code")
    m.add_argument("--conv-init", default="kaiming", choices=CONV_INITS,
                   help="beyond the official recipe: 'pytorch' keeps nn.Conv2d's own (smaller, uniform) init, as "
                        "lightly's ResNet; default 'kaiming': He normal, fan_out (torchvision; official: He-scaled)")
    m.add_argument("--bn-per-view", action="store_true",
                   help="beyond the official recipe: forward each view on its own, so every BN layer normalises "
                        "each view with its own batch statistics (lightly's examples); default: both views in one "
                        "BN batch, as the official code")
    m.add_argument("--proj-layers", type=int, default=2, help="projection head depth (2: SimCLR v1, 3: v2)")
    m.add_argument("--proj-hidden-dim", type=int, default=None, help="default: the encoder's feature dim")
    m.add_argument("--proj-dim", type=int, default=128, help="output dim of the projection head")
    m.add_argument("--proj-out-bn", action=argparse.BooleanOptionalAction, default=True,
                   help="BN (scale, no shift) on the head's output, as the official head; --no-proj-out-bn: a "
                        "plain Linear with a bias there instead (lightly's SimCLRProjectionHead)")
    a = p.add_argument_group("augmentation")
    a.add_argument("--strength", type=float, default=None, help="colour distortion strength s; default 1.0 (0.5 CIFAR recipe)")
    a.add_argument("--blur", action=argparse.BooleanOptionalAction, default=None,
                   help="Gaussian blur with p=0.5; default: on (off for the CIFAR recipe)")
    a.add_argument("--crop-sampler", default="official", choices=CROP_SAMPLERS,
                   help="random resized crop: official draws boxes as the official code (TensorFlow's "
                        "sample_distorted_bounding_box: smaller crops, at least 10%% of the image); inception "
                        "draws the area uniformly in 8-100%% (the paper's text, torchvision)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=100)
    o.add_argument("--batch-size", type=int, default=4096, help="global batch (images, not views), split across ranks")
    o.add_argument("--lr", type=float, default=None,
                   help="base learning rate; default 0.3 (linear scaling; 1.0 for the CIFAR recipe, as the official "
                        "README) or 0.075 (sqrt scaling)")
    o.add_argument("--lr-scaling", default="linear", choices=("linear", "sqrt"),
                   help="peak lr = lr * batch/256 (linear) or lr * sqrt(batch) (sqrt)")
    o.add_argument("--warmup-epochs", type=float, default=10, help="linear warmup from 0, then cosine decay to 0, per step")
    o.add_argument("--weight-decay", type=float, default=None,
                   help="default 1e-6 (the paper's); 1e-4 for the CIFAR recipe (the official README's)")
    o.add_argument("--momentum", type=float, default=0.9)
    o.add_argument("--eta", type=float, default=0.001, help="LARS trust coefficient")
    o.add_argument("--optimizer", default="lars", choices=("lars", "sgd"),
                   help="lars: the paper's (biases and BN parameters without weight decay or trust ratio); sgd: "
                        "momentum SGD with weight decay on every parameter, as lightly's and most PyTorch ports' "
                        "CIFAR benchmarks (same learning-rate schedule and buffer convention, no trust ratio)")
    o.add_argument("--temperature", type=float, default=None, help="NT-Xent temperature; default 0.1 (0.5 CIFAR recipe; 0.2 did better in short "
                        "Fashion-MNIST runs, docs/results.md)")
    r = p.add_argument_group("run")
    r.add_argument("--out", default="runs/simclr", help="folder for ckpt.pt, encoder.pt and log.jsonl")
    r.add_argument("--resume", action="store_true",
                   help="continue from OUT/ckpt.pt where it stopped (mid-epoch too), with the same schedule")
    r.add_argument("--auto-resume", action="store_true",
                   help="resume if OUT/ckpt.pt exists, else start: one command for a job that a scheduler requeues")
    r.add_argument("--strict-data", action="store_true", help="stop at an unreadable image instead of skipping it")
    r.add_argument("--dist-timeout", type=float, default=10,
                   help="minutes a collective waits for a process that died or hangs before the others fail")
    r.add_argument("--seed", type=int, default=0)
    add_amp_flags(r)
    r.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="channels_last memory format on CUDA")
    r.add_argument("--distort-on", choices=("device", "workers"), default=None,
                   help="where colour distortion and blur run. device: the data workers only decode, crop and "
                        "flip into uint8, and each batch is distorted on the GPU; workers: the whole view is made "
                        "in the data workers. Default: device on CUDA, workers on CPU")
    r.add_argument("--compile", action="store_true",
                   help="torch.compile the model (the loss stays eager, in float32); one process on CUDA, or CPU "
                        "processes: refused for several CUDA processes, whose SyncBatchNorm it cannot compile")
    r.add_argument("--activation-checkpointing", action="store_true",
                   help="keep only the input of the stem and of each residual block for the backward pass and "
                        "recompute the rest there: exact (same loss, gradients, BN statistics); ResNet-50 on CPU: "
                        "3.4x less activation memory, 1.3-1.4x the step time. For a per-GPU "
                        "batch that does not fit otherwise, e.g. --batch-size 4096 on 8 GPUs of 40 GB")
    r.add_argument("--log-every", type=int, default=50,
                   help="steps between log lines; also how often the loss is checked for NaN and stop signals are "
                        "acted on (the only steps that wait for the GPU in one process; with several CUDA processes "
                        "SyncBatchNorm waits once per BN layer)")
    r.add_argument("--knn-every", type=int, default=None,
                   help="kNN accuracy of the encoder every K epochs and at the end (needs labels); "
                        "default: 10, 0 (off) for imagefolder, and for folder without --knn-data")
    r.add_argument("--knn-data", default=None,
                   help="a labelled folder DIR/train/CLASS/*, DIR/val/CLASS/* for the kNN monitor instead of the "
                        "pretraining dataset's labels (for --dataset folder, which has none)")
    r.add_argument("--knn-k", type=int, default=200, help="neighbours of the kNN monitor")
    r.add_argument("--knn-temperature", type=float, default=0.1, help="kNN vote weight exp(sim / t)")
    r.add_argument("--tensorboard", action="store_true",
                   help="also write the logged scalars to OUT/tensorboard (needs pip install tensorboard)")
    args = p.parse_args(argv)

    # The CIFAR recipe (paper Appendix B.9, official README) for CIFAR and small images, unless set.
    if args.image_size is None:
        args.image_size = data.NATIVE_SIZE[args.dataset]
    cifar = args.dataset in ("cifar10", "cifar100") or args.image_size <= 32
    if args.cifar_stem is None:
        args.cifar_stem = args.image_size <= 32
    if args.strength is None:
        args.strength = 0.5 if cifar else 1.0
    if args.blur is None:
        args.blur = not cifar
    if args.temperature is None:
        args.temperature = 0.5 if cifar else 0.1
    if args.lr is None:  # official README, CIFAR-10: --learning_rate=1.0 (linear scaling); no sqrt figure
        args.lr = 0.075 if args.lr_scaling == "sqrt" else 1.0 if cifar else 0.3
    if args.weight_decay is None:
        args.weight_decay = 1e-4 if cifar else 1e-6
    if args.knn_every is None:
        args.knn_every = 10 if args.knn_data else 0 if args.dataset in ("imagefolder", "folder") else 10
    if args.knn_every and args.dataset == "folder" and not args.knn_data:
        p.error("--dataset folder has no labels for the kNN monitor: add --knn-data DIR (a labelled folder, "
                "DIR/train/CLASS/*, DIR/val/CLASS/*) or drop --knn-every")
    if args.workers is None:
        args.workers = data.default_workers()
    if args.scaled_decode is None:
        args.scaled_decode = args.dataset in ("imagefolder", "folder")
    flags.check(p.error, args, NUMBER_RANGES)
    flags.check_image_size(p.error, args.image_size, args.cifar_stem)
    if args.sk_ratio and not (0 < args.sk_ratio < 1 and args.arch in ("resnet50", "resnet101", "resnet152")):
        p.error(f"--sk-ratio {args.sk_ratio:g}: selective kernels need 0 < ratio < 1 (SimCLRv2: 0.0625) and a "
                "bottleneck --arch (resnet50/101/152); the official code builds no SK ResNet-18/34")
    if args.compile and args.activation_checkpointing:  # dynamo cannot trace checkpoint's custom context_fn
        p.error("--compile and --activation-checkpointing cannot be combined (torch.compile does not trace the "
                "recomputation's guard of the BN statistics); use one of them")
    if args.warmup_epochs > args.epochs and os.environ.get("RANK", "0") == "0":  # once, from rank 0
        print(f"warning: --warmup-epochs {args.warmup_epochs:g} is longer than the run (--epochs {args.epochs}): "
              f"the learning rate stays below {args.epochs / args.warmup_epochs:.0%} of its peak; "
              "lower --warmup-epochs", file=sys.stderr, flush=True)
    return args


# Every numeric flag's interval (flags.check); --sk-ratio has its own check in get_args.
NUMBER_RANGES = {
    "epochs": "[1, inf)", "batch_size": "[1, inf)", "image_size": "[1, inf)", "synthetic_size": "[1, inf)",
    "log_every": "[1, inf)", "max_images": "[1, inf)", "workers": "[0, inf)", "width": "(0, inf)",
    "proj_layers": "[1, inf)", "proj_hidden_dim": "[1, inf)", "proj_dim": "[1, inf)", "strength": "[0, inf)",
    "lr": "[0, inf)", "warmup_epochs": "[0, inf)", "weight_decay": "[0, inf)", "momentum": "[0, 1)",
    "eta": "(0, inf)", "temperature": "(0, inf)", "knn_every": "[0, inf)", "knn_k": "[1, inf)",
    "knn_temperature": "(0, inf)", "dist_timeout": "(0, inf)",
}


def to_device_views(x1, x2, args, device, generator, seed):
    """Both views of a batch as one (2n, 3, H, W) float batch on the device: distorted
    there (batched, generator seeded with `seed`) when the workers only cropped."""
    # Each view straight from the loader's pinned memory (a concatenation on the host would be a
    # pageable copy, which the host waits for); both views go through one BN batch.
    x = torch.cat([x1.to(device, non_blocking=True), x2.to(device, non_blocking=True)])
    if args.distort_on == "device":
        generator.manual_seed(seed)
        x = distort(x.float().div_(255.0), args.strength, args.blur, generator)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


# The epoch's running sums, on the device and in ckpt.pt's epoch_sums (a mid-epoch stop resumes them).
EPOCH_SUMS = ("loss", "contrast accuracy", "unreadable images", "steps skipped by fp16 loss scaling")
NO_SUMS = (0.0,) * len(EPOCH_SUMS)


def check_compile(args, ctx):
    """--compile is refused where it cannot work: several CUDA processes, i.e. DDP with SyncBatchNorm.
    SyncBatchNorm's autograd function (torch/nn/modules/_functions.py) all-gathers the statistics
    and drops ranks with empty inputs by a boolean mask, a tensor of data-dependent shape:
    dynamo breaks the graph at every such layer or fails (pytorch/pytorch#100239, #107372,
    #161302). One process, also one started by torchrun (plain BatchNorm: distributed.wrap_ddp
    converts none there), and CPU processes (no SyncBatchNorm) compile."""
    if args.compile and ctx.cuda and ctx.world > 1:
        fail("--compile with several CUDA processes (DDP + SyncBatchNorm) is not supported: torch.compile cannot "
             "compile SyncBatchNorm; drop --compile, or use --compile with one process")


def forward_backward(model, x, temperature, amp=None, scaler=None):
    """NT-Xent of the views x = [x1; x2] and its gradients -> (loss, contrast accuracy).
    amp: the autocast dtype of the network (None: float32); the loss is float32 either way.
    scaler: fp16's GradScaler, whose scale multiplies the loss for the backward pass."""
    with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        _, z = model(x)
    z1, z2 = z.chunk(2)
    logits, targets = contrastive_logits(z1, z2, temperature)  # float32, negatives from all ranks
    loss = F.cross_entropy(logits, targets)
    accuracy = contrast_accuracy(logits.detach(), targets)
    del logits  # (2n, 2N): not kept through the backward pass
    (loss if scaler is None else scaler.scale(loss)).backward()
    return loss.detach(), accuracy


def train_step(model, optimizer, x, temperature, amp, ctx, nonfinite, step, scaler=None):
    """Forward, NT-Xent, backward and LARS on the views x, without waiting for the device
    -> (global mean loss, contrast accuracy and overflow (1: skipped by loss scaling, fp16),
    updated `nonfinite` record). From the first non-finite loss on (on any rank), the weights
    are left as they were.

    With a scaler (fp16), a step whose scaled gradients overflowed is skipped the same way,
    decided on the device, and the scaler lowers its scale; such a step is not a non-finite
    loss (the loss itself is float32). GradScaler.step would wait for the host (it reads
    found_inf with .item()), so the scaler only unscales and updates its scale here."""
    optimizer.zero_grad(set_to_none=True)
    loss, accuracy = forward_backward(model, x, temperature, amp, scaler)
    stats = all_sum(torch.stack([loss, accuracy]), ctx) / ctx.world  # same on every rank
    nonfinite = first_nonfinite(nonfinite, stats[0], step)
    update = nonfinite[0] < 0
    overflow = torch.zeros_like(loss)
    if scaler is not None:
        scaler.unscale_(optimizer)  # the gradients divided by the scale, in place
        # unscale_ has found the overflow too, but keeps it only in the scaler's private per-optimizer
        # state; one max-norm pass over the gradients reads it from them instead
        finite = gradients_finite(optimizer)  # the same on every rank: DDP averaged the gradients
        update, overflow = update & finite, (~finite).to(loss.dtype)
    optimizer.step(update=update)
    if scaler is not None:
        scaler.update()  # halves the scale after an overflow, doubles it after 2000 clean steps
    return torch.cat([stats, overflow.view(1)]), nonfinite


def first_nonfinite(record, loss, step):
    """record = [step, loss] of the first non-finite loss so far ([-1, 0] while none), updated
    on the device: the host learns of it at the next log line, without waiting every step."""
    now = torch.stack([torch.full_like(loss, step), loss])
    return torch.where((record[0] < 0) & ~torch.isfinite(loss), now, record)


OOM_ERRORS = tuple({getattr(torch, "OutOfMemoryError", None), torch.cuda.OutOfMemoryError} - {None})


# What a full GPU raises besides OutOfMemoryError: cuDNN and cuBLAS failing to allocate their workspace
# or handle (RuntimeError, torch.AcceleratorError on newer torch) and the CUDA runtime's own error.
OOM_TEXTS = ("out of memory", "CUDNN_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE")


def is_out_of_memory(e):
    """torch.OutOfMemoryError (torch >= 2.5), torch.cuda.OutOfMemoryError, or a RuntimeError
    that says the GPU is full (older torch, cuDNN, cuBLAS, "CUDA error: out of memory")."""
    return isinstance(e, OOM_ERRORS) or (isinstance(e, RuntimeError) and any(t in str(e) for t in OOM_TEXTS))


def out_of_memory_text(args, ctx, per_rank, step, kept):
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        where = f"per GPU, on a {props.total_memory / 2**30:.1f} GiB {props.name}"
    else:
        where = f"per process, on the CPU ({os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM)"
    ways = [] if args.activation_checkpointing else ["--activation-checkpointing (exact, ~1.3x the step time)"]
    ways += [f"more GPUs for the same --batch-size {args.batch_size}",
             "a smaller --batch-size with --lr-scaling sqrt (the paper's choice for small batches)"]
    return (f"out of memory at step {step + 1}: {per_rank} images ({2 * per_rank} views) of {args.image_size} px "
            f"{where}. Ways out: {'; '.join(ways)}. On disk: {kept}")


def main():
    args = get_args()
    ctx = setup(args.batch_size, args.dist_timeout)  # torchrun: one process per GPU (NCCL) or CPU slot (gloo)
    device, master, world = ctx.device, ctx.master, ctx.world
    args.amp, amp_text = resolve_amp(args.amp, device)  # "bf16", "fp16" (with loss scaling) or "off"
    args.channels_last = args.channels_last and ctx.cuda  # a CUDA-only feature
    check_compile(args, ctx)
    args.distort_on = args.distort_on or ("device" if ctx.cuda else "workers")
    per_rank = args.batch_size // world
    peak_lr = scaled_lr(args.lr, args.batch_size, args.lr_scaling)
    ckpt_path = prepare_out(args, master)  # decides the resume; makes nothing yet
    board = Board(os.path.join(args.out, "tensorboard"), args.tensorboard, master)  # rank 0 writes, from the first log line
    loader, views, knn = build_data(args, ctx, per_rank)  # make_loader checks /dev/shm for their batches
    steps_per_epoch = len(loader)
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = int(round(args.warmup_epochs * steps_per_epoch))

    # Model: encoder f and head g; global BN (SyncBatchNorm) across CUDA processes.
    torch.manual_seed(args.seed)
    encoder = build_encoder(args.arch, args.width, args.cifar_stem, activation_checkpointing=args.activation_checkpointing,
                            zero_init_residual=args.zero_init_residual, sk_ratio=args.sk_ratio,
                            input_norm=args.input_norm, conv_init=args.conv_init)
    head = ProjectionHead(encoder.feature_dim, args.proj_hidden_dim, args.proj_dim, args.proj_layers, args.proj_out_bn)
    model = SimCLR(encoder, head, bn_chunks=2 if args.bn_per_view else 1)
    optimizer = LARS([p for p in model.parameters() if p.requires_grad], lr=peak_lr, momentum=args.momentum,
                     weight_decay=args.weight_decay, eta=args.eta,
                     trust_ratio=args.optimizer == "lars", exclude_1d=args.optimizer == "lars")
    scaler = grad_scaler(args.amp, device)  # fp16 only
    start_epoch, start_step, start_sums = (restore(args, ckpt_path, model, optimizer, scaler, steps_per_epoch, master)
                                           if args.resume else (0, 0, NO_SUMS))
    if master:  # every input is checked: now --out is made
        make_out(args, needed=checkpoint_bytes(args, model))
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    # torchrun: DDP on ctx.device; global BN over several CUDA processes' views (paper Sec. 2.1).
    model = wrap_ddp(model, ctx)  # `encoder` stays the live module (converted in place)
    if args.compile:
        model = torch.compile(model)
    if master:
        print_start(args, ctx, encoder, amp_text, views_text=str(views), peak_lr=peak_lr, per_rank=per_rank,
                    steps=(steps_per_epoch, total_steps, warmup_steps), start=(start_epoch, start_step), path=ckpt_path)
    job = SimpleNamespace(args=args, ctx=ctx, model=model, encoder=encoder, optimizer=optimizer, scaler=scaler,
                          peak_lr=peak_lr, ckpt_path=ckpt_path, steps_per_epoch=steps_per_epoch, board=board,
                          saved=(start_epoch, start_step) if args.resume else None, dataset_size=len(loader.dataset))  # what the helpers below share
    if master and start_epoch >= args.epochs and not os.path.exists(os.path.join(args.out, "encoder.pt")):
        write_encoder(job, start_epoch, start_step)  # a finished run whose export was deleted
        print(f"wrote {os.path.join(args.out, 'encoder.pt')} again from {ckpt_path}", flush=True)
    generator = torch.Generator()  # draws the device-side distortion parameters, seeded per (seed, step, rank)
    stop = StopRequest()
    nonfinite = torch.tensor([-1.0, 0.0], device=device)  # [step, loss] of the first non-finite loss
    t_start, steps_done = time.time(), 0
    for epoch in range(start_epoch, args.epochs):
        first = start_step if epoch == start_epoch else 0  # a resumed epoch starts where it stopped
        loader.sampler.set_epoch(epoch, skip=first * per_rank)
        model.train()
        sums = torch.tensor(start_sums if first else NO_SUMS, device=device)  # see EPOCH_SUMS
        unreadable = 0  # this process's, since the last log line
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t_epoch = t_log = time.time()
        for i, ((x1, x2), _, bad_images) in enumerate(loader, start=first):
            # The step never waits for the GPU: the NaN check and stop signals are read at log lines.
            step = epoch * steps_per_epoch + i
            lr = warmup_cosine(step, total_steps, peak_lr, warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            try:
                x = to_device_views(x1, x2, args, device, generator,
                                    seed=((args.seed + 1) * 1_000_003 + step) * 4_099 + ctx.rank)
                stats, nonfinite = train_step(model, optimizer, x, args.temperature, AMP_DTYPES[args.amp], ctx,
                                              nonfinite, step, scaler)
            except RuntimeError as e:
                if not is_out_of_memory(e):
                    raise
                # This rank alone may have run out, with the others inside a collective: every rank
                # that runs out says so and exits without destroying the group; torchrun ends the rest.
                fail(out_of_memory_text(args, ctx, per_rank, step, kept_text(job)), code=OUT_OF_MEMORY,
                     every_rank=ctx.ddp)
            sums[:2] += stats[:2]
            sums[3] += stats[2]  # steps skipped by fp16 loss scaling
            unreadable += int(bad_images.sum())
            steps_done += 1

            if (i + 1) % args.log_every == 0 or i + 1 == steps_per_epoch:
                stopping = check_in(job, stop, nonfinite, sums, unreadable)
                unreadable = 0
                if master:
                    now = time.time()
                    done = min(i + 1 - first, (i % args.log_every) + 1)
                    eta = (now - t_start) / steps_done * (total_steps - step - 1)
                    rate = done * args.batch_size / max(now - t_log, 1e-9)
                    print(f"epoch {epoch + 1}/{args.epochs} step {i + 1}/{steps_per_epoch} loss {stats[0]:.4f} "
                          f"acc {stats[1]:.3f} lr {lr:.4g} img/s {rate:.0f}"
                          f"{memory_text(ctx)}{scale_text(scaler)} eta {datetime.timedelta(seconds=int(eta))}",
                          flush=True)
                    board.add(step + 1, **{"train/loss": stats[0], "train/contrast_acc": stats[1], "train/lr": lr,
                                           "train/images_per_s": rate, "train/peak_gpu_memory_gib": peak_memory(ctx)})
                    t_log = now
                if stopping and i + 1 < steps_per_epoch:  # at an epoch's end, the epoch checkpoint below serves
                    stop_and_exit(job, stop, epoch, i + 1, sums)

        end_epoch(job, knn, epoch, sums, lr, time.time() - t_epoch, steps_done=steps_per_epoch - first)
        # A signal during the epoch's last step, its kNN or its save: agree on it, then stop.
        if resume.stop_agreed(stop, ctx) and epoch + 1 < args.epochs:
            stop_and_exit(job, stop, epoch + 1, 0, None)


def prepare_out(args, master):
    """The resume decision, and whether --out can be written, told without making anything: the
    folder is made once every input is checked (make_out) -> path of ckpt.pt."""
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    args.resume = resume.prepare(ckpt_path, args.resume, args.auto_resume, master)
    return ckpt_path


def checkpoint_bytes(args, model):
    """About the bytes ckpt.pt and encoder.pt take: the model's tensors, and as many again for
    the optimizer's momentum (ckpt.pt), and the model once more (encoder.pt, with the head)."""
    return 3 * tensor_bytes(unwrap(model).state_dict())


def make_out(args, needed):
    """Rank 0 makes --out (a probe file written and removed there), removes what a killed save left,
    and stops when the file system lacks the room for the checkpoints (`needed` bytes: both files
    new; a resumed run replaces files that are there, so it needs the room of the largest)."""
    resume.remove_leftovers(*(os.path.join(args.out, n) for n in ("ckpt.pt", "encoder.pt")))  # a killed save's
    output.check_folder(args.out, "--out")
    there = sum(os.path.getsize(os.path.join(args.out, n)) for n in ("ckpt.pt", "encoder.pt")
                if os.path.isfile(os.path.join(args.out, n)))
    needed = max(needed - there, 2 * needed // 3 if there else 0)
    free = output.free_bytes(args.out)
    if free is not None and free < needed:
        raise output.WriteError(f"no space left on device for {args.out}: the checkpoints need about "
                                f"{output.size_text(needed)}, {output.size_text(free)} free there; free some "
                                "space or choose another --out")


def build_data(args, ctx, per_rank):
    """The pretraining loader and, with --knn-every, the kNN monitor's -> (loader, views, knn)."""
    def build(split):
        # the views decode the pretraining JPEGs themselves, at the scale their crops need (--scaled-decode)
        dataset = (data.build_dataset("imagefolder", args.knn_data, split) if args.knn_data and split != "pretrain"
                   else data.build_dataset(args.dataset, args.data_dir, split, args.image_size, args.synthetic_size,
                                           encoded=args.scaled_decode and split == "pretrain"))
        return data.first_images(dataset, args.max_images)

    raw = rank0_first(ctx, lambda: build("pretrain"), data.DataError)  # rank 0 downloads first
    if ctx.master:
        print(data.describe(raw, args.dataset, args.data_dir, None), flush=True)
    if len(raw) < args.batch_size:
        fail(f"the dataset has {len(raw)} images, fewer than one global batch of {args.batch_size}; lower --batch-size")
    views = SimCLRViews(args.image_size, strength=args.strength, blur=args.blur, crop_sampler=args.crop_sampler,
                        scaled_decode=args.scaled_decode)
    # The workers make whole views, or only the uint8 crops when the device distorts the batch.
    train_set = data.SeededTransform(raw, views if args.distort_on == "workers" else views.crops, seed=args.seed,
                                     strict=args.strict_data, hint=data.TRAIN_HINT)
    loader = data.make_loader(train_set, per_rank, train=True, workers=args.workers,
                              rank=ctx.rank, world=ctx.world, seed=args.seed, pin_memory=ctx.cuda)
    knn = {"loaders": None}
    if args.knn_every:  # labelled train and test images, evaluation transform (no augmentation)
        labelled = rank0_first(ctx, lambda: (build("train"), build("test")), data.DataError)
        plain = EvalTransform(args.image_size, train=False)
        knn["loaders"] = [data.make_loader(data.SeededTransform(d, plain, strict=strict, hint=hint), per_rank,
                                           train=False, workers=args.workers, rank=ctx.rank, world=ctx.world,
                                           pin_memory=ctx.cuda)
                          for d, strict, hint in zip(labelled, (args.strict_data, True), (data.TRAIN_HINT, data.TEST_HINT))]
        knn["classes"] = data.num_classes(labelled[0])  # the test labels are numbered by the training classes
        note = data.class_note(labelled[1])
        if note and ctx.master:
            print(note.replace("the test accuracy", "the kNN accuracy"), flush=True)
    return loader, views, knn


def restore(args, ckpt_path, model, optimizer, scaler, steps_per_epoch, master):
    """Load ckpt.pt into the model, optimizer and fp16 loss scaler (resume.load_state) -> (epoch, step
    in that epoch, epoch sums so far). The checkpoint does not depend on --activation-checkpointing:
    resume with or without it."""
    start_epoch, start_step, sums, _ = resume.load_state(
        ckpt_path, model, optimizer, scaler, steps_per_epoch, args, model.encoder.config, master=master,
        compared=("dataset", "batch_size", "epochs", "lr", "lr_scaling", "warmup_epochs", "temperature", "strength",
                  "blur", "image_size", "weight_decay", "crop_sampler", "optimizer", "scaled_decode"),
        saved_defaults={"scaled_decode": False})  # a checkpoint without it decoded every JPEG at full size
    return start_epoch, start_step, sums + list(NO_SUMS[len(sums):])  # checkpoints before fp16 kept three


def print_start(args, ctx, encoder, amp_text, views_text, peak_lr, per_rank, steps, start, path):
    steps_per_epoch, total_steps, warmup_steps = steps
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, device {ctx.device}"
          f"{' (' + torch.cuda.get_device_name(ctx.device) + ')' if ctx.cuda else f', {torch.get_num_threads()} CPU threads'}, "
          f"processes {ctx.world}", flush=True)
    print(amp_text, flush=True)
    if ctx.ddp and not ctx.cuda:
        print("note: SyncBatchNorm needs CUDA; on CPU each process normalises over its own "
              f"{2 * per_rank} views", flush=True)
    print(json.dumps(vars(args), sort_keys=True), flush=True)
    print(f"peak lr {peak_lr:.4g} = {args.lr} x {'batch/256' if args.lr_scaling == 'linear' else 'sqrt(batch)'}, "
          f"{per_rank} images x 2 views per rank, {steps_per_epoch} steps/epoch, {total_steps} steps, "
          f"{warmup_steps} warmup, encoder {sum(p.numel() for p in encoder.parameters()) / 1e6:.2f}M params "
          f"({encoder.feature_dim}-d), {views_text}", flush=True)
    if args.resume:
        print(f"resumed from {path} at epoch {start[0] + 1}, step {start[1] + 1}", flush=True)
    if start[0] >= args.epochs:
        print(f"nothing to do: the checkpoint has finished {start[0]} of {args.epochs} epochs", flush=True)


def peak_memory(ctx):
    """Rank 0's peak GPU memory in GiB since the epoch began (None on the CPU)."""
    return torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.cuda else None


def memory_text(ctx):
    return f" mem {peak_memory(ctx):.1f}GiB" if ctx.cuda else ""


def scale_text(scaler):
    return f" scale {scaler.get_scale():g}" if scaler is not None else ""  # at log lines only: get_scale waits


def check_in(job, stop, nonfinite, sums, unreadable):
    """At a log line (the same steps on every rank): count the unreadable images of all
    ranks into sums, stop on a non-finite loss, and return whether any rank was asked to stop."""
    args, ctx = job.args, job.ctx
    flags = all_sum(torch.tensor([float(stop.signum), float(unreadable)], device=ctx.device), ctx)
    sums[2] += flags[1]
    bad_step, bad_loss = nonfinite.tolist()  # waits for the device: one of the few places that do
    if bad_step >= 0:  # every rank holds the same record and stops together
        spe = job.steps_per_epoch
        fail(f"loss is {bad_loss} at step {int(bad_step) + 1} (epoch {int(bad_step) // spe + 1}, step "
             f"{int(bad_step) % spe + 1}/{spe}); weights were not updated from that step on; "
             f"{kept_text(job)}. Likely causes: learning rate too high "
             f"(peak {job.peak_lr:.3g}), temperature too low ({args.temperature}), "
             "or bad input data", code=3)
    return flags[0].item() > 0


def save(job, epochs_done, step_in_epoch, sums):
    """Rank 0 writes the resume state (resume.save_state; the epoch sums are loss, accuracy,
    unreadable images and fp16 overflow steps so far) and the encoder export, each atomically. A
    write that fails stops the run with one line (output.WriteError) and leaves the files as they were."""
    resume.save_state(job.ckpt_path, job.model, job.optimizer, job.scaler, epochs_done, step_in_epoch,
                      job.steps_per_epoch, sums, job.args, kept=kept_text(job))
    job.saved = (epochs_done, step_in_epoch)
    write_encoder(job, epochs_done, step_in_epoch)


def write_encoder(job, epochs_done, step_in_epoch):
    """encoder.pt, the encoder-only export the evaluation scripts read."""
    args, path = job.args, os.path.join(job.args.out, "encoder.pt")
    with output.writing(path, "--out", needed=tensor_bytes(unwrap(job.model).state_dict()),
                        after=f"; {kept_text(job)}"):
        save_encoder(path, job.encoder, head=unwrap(job.model).head, dataset=args.dataset, data_dir=args.data_dir,
                     image_size=args.image_size, epoch=epochs_done, step_in_epoch=step_in_epoch, args=vars(args))


def kept_text(job):
    """What --out holds for a resume, for an error line."""
    return resume.kept_text(job.ckpt_path, job.saved)


def stop_and_exit(job, stop, epoch, step_in_epoch, sums):
    """After a stop signal: save where the run stands (mid-epoch when sums are given), then exit."""
    spe = job.steps_per_epoch
    where = (f"after step {epoch * spe + step_in_epoch} (epoch {epoch + 1}, step {step_in_epoch}/{spe})"
             if sums is not None else f"after epoch {epoch}")
    resume.stop_and_exit(job.ctx, stop, (lambda: save(job, epoch, step_in_epoch, sums.tolist())) if sums is not None
                         else None, where, job.ckpt_path)


def end_epoch(job, knn, epoch, sums, lr, epoch_time, steps_done):
    """The epoch's record: mean loss and accuracy, kNN accuracy when due; rank 0 saves and logs it."""
    args, ctx, encoder, spe = job.args, job.ctx, job.encoder, job.steps_per_epoch
    mean_loss, mean_acc, skipped, overflows = (sums[:2] / spe).tolist() + [int(v) for v in sums[2:].tolist()]
    record = {"epoch": epoch + 1, "step": (epoch + 1) * spe, "loss": mean_loss,
              "contrast_acc": mean_acc, "lr": lr, "epoch_time_s": round(epoch_time, 3),
              "images_per_s": round(steps_done * args.batch_size / epoch_time, 1), "unreadable_images": skipped}
    if job.scaler is not None:  # fp16: the steps loss scaling skipped, and the scale the epoch ended with
        record.update(overflow_steps=overflows, loss_scale=job.scaler.get_scale())
    if ctx.cuda:  # of rank 0, over the epoch's steps
        record["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(ctx.device) / 2**30, 3)
    if knn["loaders"] and ((epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs):
        t_knn = time.time()
        encoder.eval()  # BN running statistics, as the evaluation scripts use
        (train_f, train_y), (test_f, test_y) = (
            extract_features(encoder, ld, ctx.device, AMP_DTYPES[args.amp], args.channels_last,
                             what=f"kNN {split} features")
            for ld, split in zip(knn["loaders"], ("train", "test")))
        encoder.train()
        record["knn_top1"] = knn_accuracy(train_f, train_y, test_f, test_y, knn["classes"],
                                          args.knn_k, args.knn_temperature, ctx.device)
        if ctx.master:
            print(f"epoch {epoch + 1} kNN top-1 {record['knn_top1']:.2f}% (k={args.knn_k}, "
                  f"{len(train_y)} train / {len(test_y)} test images, {time.time() - t_knn:.1f}s)", flush=True)
    if ctx.master:
        save(job, epoch + 1, 0, list(NO_SUMS))
        output.append_line(os.path.join(args.out, "log.jsonl"), json.dumps(record))
        job.board.add(record["step"], **{"epoch/loss": mean_loss, "epoch/contrast_acc": mean_acc,
                                         "epoch/knn_top1": record.get("knn_top1"),
                                         "epoch/images_per_s": record["images_per_s"],
                                         "epoch/peak_gpu_memory_gib": record.get("peak_gpu_memory_gib")})
        print(f"epoch {epoch + 1} done in {epoch_time:.1f}s: loss {mean_loss:.4f} acc {mean_acc:.3f}"
              f"{memory_text(ctx)}{skipped_text(job, skipped)}; saved {job.ckpt_path}", flush=True)


def skipped_text(job, skipped):
    """The epoch line's count of unreadable images, and why it can change between epochs."""
    if not skipped:
        return ""
    read = job.steps_per_epoch * job.args.batch_size
    left = job.dataset_size - read
    why = (f" (among the {read} images read this epoch; the {left} of its shuffled order that do not fill a "
           "last batch are not read, so the count can differ between epochs)" if left else "")
    return f"; skipped {skipped} unreadable images{why}"


if __name__ == "__main__":
    run(main, (data.DataError, CheckpointError, output.WriteError), data.error_text,
        peer_hint="the checkpoint in --out holds the last completed epoch; find the first error above, fix it, "
                  "and run the same command with --resume")
