"""Fine-tuning a pretrained encoder on a fraction of the labels (Chen et al. 2020, Sec. 6 and B.5).

  python finetune.py runs/imagenet/encoder.pt --label-fraction 0.01
  python finetune.py runs/imagenet/encoder.pt --subset-file 1percent.txt   # the official ImageNet lists
  torchrun --nproc_per_node=8 finetune.py runs/imagenet/encoder.pt --label-fraction 0.1

Trains the whole encoder plus a new zero-initialised linear head on a class-balanced subset
(round(fraction x n) images of every class, chosen by --seed) or on the images --subset-file names.
The protocol: SGD with Nesterov momentum 0.9, lr 0.05 x batch/256, no weight decay, cosine, 60
epochs at 1% of the labels or fewer and 30 above, batch 4096 (imagefolder) or 256, crop + flip; the
test set scored once, after the last epoch. --from-head-layer K (SimCLRv2: 1) fine-tunes from the
checkpoint's projection-head layer K. Ends with the line `top-1 accuracy: XX.XX%` and writes JSON
next to the checkpoint.

Protocols and every flag: docs/evaluation.md.
"""
import argparse
import inspect
import json
import os
import time
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Subset

import data
import flags
import output
from augment import EvalTransform
from board import Board, results_folder
from distributed import (AMP_DTYPES, EpochSums, add_amp_flags, fail, grad_scaler, rank0_first, resolve_amp, run,
                         setup, wrap_ddp, write_results)
from features import Progress, extract_features, to_device, topk_accuracy
from lars import warmup_cosine
from model import CheckpointError, ProjectionHead, build_encoder, load_encoder, load_head, pretrain_settings


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_Formatter)
    p.add_argument("checkpoint", help="encoder.pt or ckpt.pt written by pretrain.py")
    p.add_argument("--label-fraction", type=float, default=0.01, help="share of each class's labelled images used")
    p.add_argument("--subset-file", default=None, help="train on the images this file names instead (one per line)")
    p.add_argument("--dataset", default=None, choices=data.DATASETS, help="default: the pretraining dataset")
    p.add_argument("--data-dir", default=None, help="default: the pretraining one")
    p.add_argument("--image-size", type=int, default=None, help="default: the pretraining one (same dataset) or the dataset's")
    p.add_argument("--synthetic-size", type=int, default=None, help="generated training images; default: the pretraining one")
    p.add_argument("--epochs", type=int, default=None, help="default: 60 at label fraction <= 1%%, else 30")
    p.add_argument("--batch-size", type=int, default=None, help="global batch; default: 4096 imagefolder, 256 otherwise")
    p.add_argument("--lr", type=float, default=0.05, help="base learning rate: peak lr = lr x batch/256")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--momentum", type=float, default=0.9, help="Nesterov momentum")
    p.add_argument("--random-init", action="store_true", help="start from a randomly initialised encoder (supervised baseline)")
    p.add_argument("--from-head-layer", type=int, default=0,
                   help="fine-tune from this projection-head layer, its layers kept (official ft_proj_selector; "
                        "v2: 1); 0: from h, the head dropped")
    p.add_argument("--workers", type=int, default=None, help="data loading processes per rank; default: CPUs / ranks, at most 8")
    p.add_argument("--seed", type=int, default=0, help="subset choice, head init, data order, augmentation")
    p.add_argument("--strict-data", action="store_true",
                   help="stop at an unreadable training image instead of skipping it (test images always must be readable)")
    add_amp_flags(p, what="the network (fp16 trains with dynamic loss scaling)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="channels_last on CUDA")
    p.add_argument("--out", default=None, help="results JSON; default: next to the checkpoint")
    p.add_argument("--max-images", type=int, default=None,
                   help="use only the first N images of the labelled subset and of the test set (a quick check)")
    p.add_argument("--progress-every", type=float, default=30.0, help="seconds between progress lines")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write the loss and accuracy to tensorboard/NAME beside the results NAME.json "
                        "(needs pip install tensorboard)")
    p.add_argument("--dist-timeout", type=float, default=10,
                   help="minutes a collective waits for a process that died or hangs before the others fail")
    args = p.parse_args(argv)
    flags.check(p.error, args, NUMBER_RANGES)
    return args


NUMBER_RANGES = {"label_fraction": "(0, 1]", "from_head_layer": "[0, inf)", "max_images": "[1, inf)",
                 "progress_every": "[0, inf)", "epochs": "[1, inf)", "batch_size": "[1, inf)",
                 "image_size": "[1, inf)", "synthetic_size": "[1, inf)", "workers": "[0, inf)", "lr": "[0, inf)",
                 "weight_decay": "[0, inf)", "momentum": "[0, 1)", "dist_timeout": "(0, inf)"}  # flags.check


def kept_head(args, ckpt):
    """The checkpoint's projection head when --from-head-layer needs it (else None); one line if it cannot."""
    k = args.from_head_layer
    if k == 0:
        return None
    proj = load_head(args.checkpoint, ckpt)
    if proj is None:
        fail(f"--from-head-layer {k}: {args.checkpoint} carries no projection head")
    if k > proj.config["num_layers"]:
        fail(f"--from-head-layer {k}: the checkpoint's projection head has {proj.config['num_layers']} layers")
    return proj


def head_layers(args, encoder, proj):
    """-> (encoder followed by the first --from-head-layer layers of proj, their output dim)."""
    k = args.from_head_layer
    if k == 0:
        return encoder, encoder.feature_dim
    if args.random_init:
        proj = ProjectionHead(**proj.config)
    dim = proj.config["out_dim"] if k == proj.config["num_layers"] else proj.config["hidden_dim"]
    return nn.Sequential(encoder, proj.first_layers(k)), dim


def sgd_for_scaler(scaler, device):
    """SGD options for fp16 loss scaling: the fused SGD (torch >= 2.3 on CUDA, later also on the
    CPU) takes the scaler's overflow flag into its kernel, so GradScaler.step skips an overflow
    step on the device; with the plain SGD GradScaler.step waits for the host every step (it
    reads found_inf with .item()). The same update, up to rounding."""
    if scaler is None or "fused" not in inspect.signature(torch.optim.SGD).parameters:
        return {}
    w = torch.zeros(1, device=device, requires_grad=True)
    w.grad = torch.zeros_like(w)
    try:  # tried: which devices have the fused kernel differs between versions
        torch.optim.SGD([w], lr=0.1, momentum=0.9, nesterov=True, fused=True).step()
    except (RuntimeError, NotImplementedError):
        return {}
    return {"fused": True}


def main():
    args = get_args()
    encoder, ckpt = load_encoder(args.checkpoint)
    proj = kept_head(args, ckpt)
    settings = pretrain_settings(ckpt)
    resolve(args, settings, encoder.config["cifar_stem"])
    ctx = setup(args.batch_size, args.dist_timeout)
    args.amp, amp_text = resolve_amp(args.amp, ctx.device)
    args.channels_last = args.channels_last and ctx.cuda
    board = Board(results_folder(args.out), args.tensorboard, ctx.master)  # rank 0 writes
    if ctx.master:
        print(amp_text, flush=True)
    job = build_data(args, ctx)
    torch.manual_seed(args.seed)
    if args.random_init:
        encoder = build_encoder(**encoder.config)
    net, model, optimizer, scaler = build_model(job, encoder, proj)
    train_loader, test_loader = make_loaders(job)
    steps_per_epoch = len(train_loader)
    total_steps = args.epochs * steps_per_epoch
    print_start(job, encoder, settings, steps_per_epoch)

    t_train = time.time()
    for epoch in range(args.epochs):
        train_loader.sampler.set_epoch(epoch)
        model.train()  # BN in train mode: the whole network is fine-tuned
        sums = EpochSums(ctx.device)
        progress = Progress(f"epoch {epoch + 1}/{args.epochs}", steps_per_epoch * args.batch_size,
                            args.progress_every, ctx.master)
        for i, (x, y, _) in enumerate(train_loader):
            lr = warmup_cosine(epoch * steps_per_epoch + i, total_steps, job.peak_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, logits, y = train_step(job, model, optimizer, scaler, x, y)
            sums.add(loss, logits, y)
            progress.update(len(y) * ctx.world)
        train_loss, train_acc = sums.end(ctx, epoch, args.epochs, lr, board, "finetune", (epoch + 1) * steps_per_epoch)
    job.phases["train"] = round(time.time() - t_train, 1)

    t_test = time.time()
    net.eval()  # the test set, once, after the last epoch
    scores, test_y = extract_features(net, test_loader, ctx.device, AMP_DTYPES[args.amp], args.channels_last,
                                      what="test", progress_every=args.progress_every)
    job.phases["test"] = round(time.time() - t_test, 1)
    accs = topk_accuracy(scores.float(), test_y, (1, 5) if job.classes >= 5 else (1,))
    report(job, board, total_steps, encoder, settings, accs, train_loss, train_acc, len(test_y))


def resolve(args, settings, cifar_stem=False):
    """Fill the defaults that depend on the checkpoint and the dataset; check them and that the
    results file can be written (nothing is made yet)."""
    args.dataset, args.data_dir, args.image_size, args.synthetic_size = data.defaults_from_checkpoint(
        settings, args.dataset, args.data_dir, args.image_size, args.synthetic_size)
    args.epochs = args.epochs or (60 if args.label_fraction <= 0.01 else 30)
    args.batch_size = args.batch_size or (4096 if args.dataset == "imagefolder" else 256)
    if args.workers is None:
        args.workers = data.default_workers()
    if args.out is None:
        tag = (os.path.splitext(os.path.basename(args.subset_file))[0] if args.subset_file
               else f"{100 * args.label_fraction:g}pct")
        args.out = f"{os.path.splitext(args.checkpoint)[0]}.finetune_{tag}{'_random_init' if args.random_init else ''}"
        args.out += f"_first{args.max_images}.json" if args.max_images else ".json"  # a dry run keeps the real results
    flags.check(fail, args, NUMBER_RANGES)  # the defaults filled in here too
    if flags.image_size_problem(args.image_size, cifar_stem):
        fail(flags.image_size_problem(args.image_size, cifar_stem))
    output.check_file(args.out, "--out", create_folder=False)


def build_data(args, ctx):
    """The labelled subset, the test set and the batch that fits the subset -> the job the functions
    below share."""
    def build_all():
        train = data.build_dataset(args.dataset, args.data_dir, "train", args.image_size, args.synthetic_size)
        test = data.build_dataset(args.dataset, args.data_dir, "test", args.image_size, args.synthetic_size)
        chosen = (data.subset_from_file(train, args.subset_file) if args.subset_file
                  else data.balanced_subset(data.labels_of(train), args.label_fraction, args.seed))
        return train, data.first_images(test, args.max_images), chosen[:args.max_images]  # --max-images: first N

    train_raw, test_raw, chosen = rank0_first(ctx, build_all, data.DataError)
    args.batch_size, note = data.fit_batch(len(chosen), args.batch_size, ctx.world, "the labelled subset",
                                           hint="; raise --label-fraction")  # a small subset: all of it
    per_rank, peak_lr = args.batch_size // ctx.world, args.lr * args.batch_size / 256
    if ctx.master:  # every input is checked: now the results folder is made
        output.check_file(args.out, "--out")
        class_note = data.class_note(test_raw)  # labels are numbered by the training split's classes
        if class_note:
            print(class_note, flush=True)
    if note and ctx.master:
        print(f"{note}, peak lr {peak_lr:.4g} = {args.lr} x {args.batch_size}/256", flush=True)
    return SimpleNamespace(args=args, ctx=ctx, train_raw=train_raw, test_raw=test_raw, chosen=chosen,
                           classes=data.num_classes(train_raw), per_rank=per_rank, peak_lr=peak_lr,
                           phases={})  # seconds each phase took, for the results JSON


def build_model(job, encoder, proj):
    """The encoder (and kept head layers) with a zero-initialised linear head, wrapped for DDP, its
    SGD and fp16's loss scaler -> (net, model to train, optimizer, scaler or None)."""
    args, ctx = job.args, job.ctx
    trunk, dim = head_layers(args, encoder, proj)
    head = nn.Linear(dim, job.classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    net = nn.Sequential(trunk, head).to(ctx.device)
    if args.channels_last:
        net.to(memory_format=torch.channels_last)
    model = wrap_ddp(net, ctx)  # torchrun: SyncBatchNorm over several GPUs, DDP on ctx.device; `net` stays live
    scaler = grad_scaler(args.amp, ctx.device)  # fp16 only
    optimizer = torch.optim.SGD(model.parameters(), lr=job.peak_lr, momentum=args.momentum, nesterov=True,
                                weight_decay=args.weight_decay, **sgd_for_scaler(scaler, ctx.device))
    return net, model, optimizer, scaler


def make_loaders(job):
    """The labelled subset with crop + flip (shuffled, by --seed) and the test set (every image counts)."""
    args, ctx = job.args, job.ctx
    train_set = data.SeededTransform(Subset(job.train_raw, job.chosen.tolist()), EvalTransform(args.image_size, train=True),
                                     seed=args.seed, strict=args.strict_data, hint=data.TRAIN_HINT)
    test_set = data.SeededTransform(job.test_raw, EvalTransform(args.image_size, train=False), strict=True,
                                    hint=data.TEST_HINT)
    return (data.make_loader(train_set, job.per_rank, train=True, workers=args.workers, rank=ctx.rank,
                             world=ctx.world, seed=args.seed, pin_memory=ctx.cuda),
            data.make_loader(test_set, job.per_rank, train=False, workers=args.workers, rank=ctx.rank,
                             world=ctx.world, pin_memory=ctx.cuda))


def print_start(job, encoder, settings, steps_per_epoch):
    args, ctx = job.args, job.ctx
    if not ctx.master:
        return
    subset_classes = len(set(data.labels_of(job.train_raw)[job.chosen].tolist()))
    print(json.dumps(vars(args), sort_keys=True), flush=True)
    origin = ("random weights" if args.random_init
              else f"pretrained {settings.get('epoch', '?')} epochs on {settings.get('dataset', '?')}")
    kept = f" + projection-head layers 1..{args.from_head_layer}" if args.from_head_layer else ""
    print(f"encoder {encoder.config} ({origin}){kept}; "
          f"{len(job.chosen)} of {len(job.train_raw)} labelled images ({subset_classes} of {job.classes} classes), "
          f"{len(job.test_raw)} test; peak lr {job.peak_lr:.4g} = {args.lr} x {args.batch_size}/256, "
          f"{steps_per_epoch} steps/epoch, processes {ctx.world}, device {ctx.device}", flush=True)


def train_step(job, model, optimizer, scaler, x, y):
    """One SGD step on a batch -> (loss, logits, labels on the device)."""
    args, device = job.args, job.ctx.device
    x, y = to_device(x, device, args.channels_last), y.to(device, non_blocking=True)  # x: uint8 -> float there
    with torch.autocast(device.type, dtype=AMP_DTYPES[args.amp], enabled=args.amp != "off"):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:  # fp16: skips a step whose scaled gradients overflowed, and lowers the scale
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return loss, logits, y


def report(job, board, steps, encoder, settings, accs, train_loss, train_acc, test_images):
    """The results JSON, the TensorBoard results, and the last lines."""
    args, ctx, phases = job.args, job.ctx, job.phases
    results = {
        "checkpoint": os.path.abspath(args.checkpoint), "protocol": "finetune", "random_init": args.random_init,
        "from_head_layer": args.from_head_layer,
        "label_fraction": None if args.subset_file else args.label_fraction, "subset_file": args.subset_file,
        "train_images": len(job.chosen), "test_images": test_images, "classes": job.classes, "dataset": args.dataset,
        "image_size": args.image_size, "encoder_config": encoder.config, "pretrain_epochs": settings.get("epoch"),
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "peak_lr": job.peak_lr,
        "weight_decay": args.weight_decay, "seed": args.seed, "amp": args.amp, "final_train_loss": train_loss,
        "final_train_acc": train_acc, "top1": accs[0], "top5": accs[1] if len(accs) > 1 else None,
        "train_time_s": phases["train"], "phase_seconds": phases, "processes": ctx.world,
        "max_images": args.max_images,
    }
    if ctx.master:  # printed before anything is written: a failed write loses nothing seen
        print(f"fine-tuned top-1 {accs[0]:.2f}%" + (f", top-5 {accs[1]:.2f}%" if len(accs) > 1 else ""), flush=True)
    write_results(results, args.out, ctx)
    board.add(steps, **{"finetune/top1": accs[0], "finetune/top5": results["top5"]})
    board.close()
    if ctx.master:
        print(f"wrote {args.out}")
        print(f"top-1 accuracy: {accs[0]:.2f}%", flush=True)


if __name__ == "__main__":
    run(main, (data.DataError, CheckpointError, output.WriteError), data.error_text)
