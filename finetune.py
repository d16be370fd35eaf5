"""Fine-tuning a pretrained encoder on a fraction of the labels (Chen et al. 2020, Sec. 6 and B.5;
SimCLRv2, Chen et al. 2020b, Sec. 2.2).

  python finetune.py runs/imagenet/encoder.pt --label-fraction 0.01
  python finetune.py r50_1x_sk0.pt --subset-file 1percent.txt   # the official ImageNet lists
  torchrun --nproc_per_node=8 finetune.py runs/imagenet/encoder.pt --label-fraction 0.1

Trains the whole encoder plus a new zero-initialised linear head on a class-balanced subset
(round(fraction x n) images of every class, chosen by --seed) or on the images --subset-file names;
crop + flip, cosine decay, 60 epochs at 1% of the labels or fewer and 30 above; the test set scored
once, after the last epoch. Two recipes (--recipe, the start line says which and why): v2, the
official SimCLRv2 fine-tuning (LARS without decay or trust ratio for BN, biases and the classifier,
lr 0.005 x sqrt(batch), batch 1024 on ImageNet, from projection-head layer 1), the default for a
checkpoint with a three-layer head; v1, the SimCLR v1 paper's (Nesterov SGD, lr 0.05 x batch/256,
batch 4096 on ImageNet, from h) otherwise. Under SGD the start line gives the measured kernel scale
(an official v2 checkpoint gets a warning: its weights are 16.8x smaller than v1's); --conv-scale
rescales them without changing the function.

Writes NAME.json (--out), NAME.pt (the fine-tuned network with its classifier, for linear_eval.py
--checkpoint-classifier and distill.py) and NAME.ckpt.pt (for an exact --resume), the two .pt at
the end of every epoch and when SIGTERM or SIGINT stops the run. Ends with the line `top-1 accuracy:
XX.XX%`.

Protocols and every flag: docs/evaluation.md and docs/semi-supervised.md.
"""
import argparse
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
import resume
from augment import EvalTransform
from board import Board, results_folder
from distributed import (AMP_DTYPES, EpochSums, StopRequest, add_amp_flags, fail, grad_scaler, rank0_first,
                         resolve_amp, run, setup, wrap_ddp, write_results)
from features import Progress, extract_features, to_device, topk_accuracy
from lars import backward_step, fine_tuning_optimizer, fused_sgd_available, scaled_lr, warmup_cosine
from model import (CheckpointError, Classifier, ProjectionHead, build_encoder, conv_weight_scale, load_encoder,
                   load_head, pretrain_settings, rescale_convs, save_classifier, tensor_bytes)

# The two recipes' values; flags left unset take them. batch: ImageNet (imagefolder), other datasets.
RECIPES = {
    "v1": {"optimizer": "sgd", "lr": 0.05, "lr_scaling": "linear", "from_head_layer": 0, "batch": (4096, 256)},
    "v2": {"optimizer": "lars", "lr": 0.005, "lr_scaling": "sqrt", "from_head_layer": 1, "batch": (1024, 256)},
}
V1_V2_SCALE = 16.8  # official README: SimCLRv1 ResNet-50 conv kernels are on average 16.8x SimCLRv2's


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_Formatter)
    p.add_argument("checkpoint", help="encoder.pt or ckpt.pt written by pretrain.py (or convert_official.py)")
    p.add_argument("--label-fraction", type=float, default=0.01, help="share of each class's labelled images used")
    p.add_argument("--subset-file", default=None, help="train on the images this file names instead (one per line)")
    p.add_argument("--dataset", default=None, choices=data.DATASETS, help="default: the pretraining dataset")
    p.add_argument("--data-dir", default=None, help="default: the pretraining one")
    p.add_argument("--image-size", type=int, default=None, help="default: the pretraining one (same dataset) or the dataset's")
    p.add_argument("--synthetic-size", type=int, default=None, help="generated training images; default: the pretraining one")
    p.add_argument("--recipe", default="auto", choices=("auto", "v1", "v2"),
                   help="v2: the official SimCLRv2 fine-tuning (LARS); v1: the SimCLR v1 paper's (SGD); auto: v2 "
                        "for a checkpoint with a three-layer projection head, else v1")
    p.add_argument("--optimizer", default=None, choices=("lars", "sgd"),
                   help="default: the recipe's (v2: lars, v1: sgd with Nesterov momentum)")
    p.add_argument("--epochs", type=int, default=None, help="default: 60 at label fraction <= 1%%, else 30")
    p.add_argument("--batch-size", type=int, default=None,
                   help="global batch; default: the recipe's (imagefolder: v2 1024, v1 4096), 256 otherwise")
    p.add_argument("--lr", type=float, default=None, help="base learning rate; default: the recipe's (v2 0.005, v1 0.05)")
    p.add_argument("--lr-scaling", default=None, choices=("linear", "sqrt"),
                   help="peak lr = lr x batch/256 (linear) or lr x sqrt(batch) (sqrt); default: the recipe's "
                        "(v2 sqrt, v1 linear)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--momentum", type=float, default=0.9, help="momentum of LARS, or SGD's Nesterov momentum")
    p.add_argument("--eta", type=float, default=0.001, help="LARS trust coefficient")
    p.add_argument("--conv-scale", type=float, default=1.0,
                   help="multiply every BN-normalised conv kernel of the encoder by this first (the same function; "
                        "sets SGD's effective step): 16.8 brings SimCLRv2 weights to SimCLRv1's scale")
    p.add_argument("--random-init", action="store_true", help="start from a randomly initialised encoder (supervised baseline)")
    p.add_argument("--from-head-layer", type=int, default=None,
                   help="fine-tune from this projection-head layer, its layers kept (official ft_proj_selector); "
                        "0: from h, the head dropped; default: the recipe's (v2 1, v1 0)")
    p.add_argument("--workers", type=int, default=None, help="data loading processes per rank; default: CPUs / ranks, at most 8")
    p.add_argument("--seed", type=int, default=0, help="subset choice, head init, data order, augmentation")
    p.add_argument("--strict-data", action="store_true",
                   help="stop at an unreadable training image instead of skipping it (test images always must be readable)")
    add_amp_flags(p, what="the network (fp16 trains with dynamic loss scaling)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="channels_last on CUDA")
    p.add_argument("--out", default=None,
                   help="results NAME.json, beside it NAME.pt (the fine-tuned network) and NAME.ckpt.pt (resume "
                        "state); default: next to the checkpoint")
    p.add_argument("--resume", action="store_true",
                   help="continue from NAME.ckpt.pt where it stopped (mid-epoch too), with the same flags")
    p.add_argument("--auto-resume", action="store_true", help="resume if NAME.ckpt.pt exists, else start")
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
                 "weight_decay": "[0, inf)", "momentum": "[0, 1)", "eta": "(0, inf)", "conv_scale": "(0, inf)",
                 "dist_timeout": "(0, inf)"}  # flags.check; the recipe's values (None until then) are checked in resolve


def choose_recipe(args, head):
    """Fill the recipe's values into the flags left unset -> the start line that says which and why."""
    layers = head.config["num_layers"] if head is not None else 0
    if args.recipe == "auto":
        args.recipe = "v2" if layers >= 3 else "v1"
        why = (f"the checkpoint's projection head has {layers} layers (SimCLRv2)" if layers >= 3 else
               f"the checkpoint's projection head has {layers} layers" if layers else "the checkpoint has no projection head")
    else:
        why = f"--recipe {args.recipe}"
    recipe = RECIPES[args.recipe]
    if args.from_head_layer is None and recipe["from_head_layer"] and head is None:
        args.from_head_layer = 0  # the v2 recipe asked for on a checkpoint without a head (SimCLR v1's)
        why += "; it has no projection head to fine-tune from, so from h"
    for name in ("optimizer", "lr", "lr_scaling", "from_head_layer"):
        if getattr(args, name) is None:
            setattr(args, name, recipe[name])
    args.batch_size = args.batch_size or recipe["batch"][0 if args.dataset == "imagefolder" else 1]
    source = ("the official SimCLRv2 fine-tuning: LARS, sqrt scaling, from head layer 1" if args.recipe == "v2"
              else "the SimCLR v1 paper: Nesterov SGD, linear scaling, from h")
    return f"recipe {args.recipe} ({source}) because {why}"


def kept_head(args, proj):
    """The projection head when --from-head-layer keeps some of it (else None); one line if it cannot."""
    k = args.from_head_layer
    if k == 0:
        return None
    if proj is None:
        fail(f"--from-head-layer {k}: {args.checkpoint} carries no projection head")
    if k > proj.config["num_layers"]:
        fail(f"--from-head-layer {k}: the checkpoint's projection head has {proj.config['num_layers']} layers")
    return ProjectionHead(**proj.config) if args.random_init else proj


def apply_conv_scale(args, encoder, proj, settings):
    """--conv-scale on the encoder -> what it did, and under SGD the measured kernel scale (with a
    warning for an official SimCLRv2 checkpoint), for the start lines (None: nothing to say)."""
    if args.conv_scale != 1:
        before = conv_weight_scale(encoder)
        rescale_convs(encoder, args.conv_scale)
        text = f"--conv-scale {args.conv_scale:g}: conv kernels at {before:.3g}x He init, now {conv_weight_scale(encoder):.3g}x"
    else:
        text = f"conv kernels at {conv_weight_scale(encoder):.3g}x He init on average (model.conv_weight_scale)"
    if args.optimizer != "sgd":
        return None if args.conv_scale == 1 else text + "; LARS does not depend on it"
    text = f"SGD on weights of this scale: {text}"
    official_v2 = (proj is not None and proj.config["num_layers"] >= 3
                   and str(settings.get("source", "")).startswith("google-research/simclr"))  # convert_official.py's
    if official_v2 and args.conv_scale == 1 and not args.random_init:
        text = (f"warning: {text}. This is an official SimCLRv2 checkpoint, whose kernels the official README "
                f"measures {V1_V2_SCALE}x smaller than SimCLRv1's, for which the v1 protocol's lr was tuned; SGD's "
                f"step on a BN-normalised kernel grows as 1/|w|^2, so here it is ~{V1_V2_SCALE ** 2:.0f}x hotter. Use "
                f"the v2 recipe (--optimizer lars), or --conv-scale {V1_V2_SCALE} (same function, v1 scale)")
    return text


def main():
    args = get_args()
    encoder, ckpt = load_encoder(args.checkpoint)
    proj = load_head(args.checkpoint, ckpt)
    settings = pretrain_settings(ckpt)
    recipe_text = resolve(args, settings, proj, encoder.config["cifar_stem"])
    proj = kept_head(args, proj) if args.from_head_layer else proj
    ctx = setup(args.batch_size, args.dist_timeout)
    args.amp, amp_text = resolve_amp(args.amp, ctx.device)
    args.channels_last = args.channels_last and ctx.cuda
    board = Board(results_folder(args.out), args.tensorboard, ctx.master)  # rank 0 writes
    job = build_data(args, ctx)  # also makes the results folder, every input checked
    args.resume = resume.prepare(job.state_path, args.resume, args.auto_resume, ctx.master)
    if ctx.master:
        resume.remove_leftovers(job.state_path, job.model_path)
    torch.manual_seed(args.seed)
    if args.random_init:
        encoder = build_encoder(**encoder.config)
    scale_text = apply_conv_scale(args, encoder, proj, settings)
    net, model, optimizer, scaler = build_model(job, encoder, proj)
    train_loader, test_loader = make_loaders(job)
    steps_per_epoch = job.steps_per_epoch = len(train_loader)
    start_epoch, start_step, start_sums = 0, 0, []
    if args.resume:
        start_epoch, start_step, start_sums, _ = resume.load_state(
            job.state_path, model, optimizer, scaler, steps_per_epoch, args, encoder.config, master=ctx.master,
            compared=("recipe", "optimizer", "lr", "lr_scaling", "batch_size", "epochs", "weight_decay", "seed"))
    job.saved = (start_epoch, start_step) if args.resume else None  # what the folder holds for a resume
    print_start(job, encoder, settings, (amp_text, recipe_text, scale_text), (start_epoch, start_step))

    t_train, stop, train_loss, train_acc = time.time(), StopRequest(), None, None
    for epoch in range(start_epoch, args.epochs):
        first = start_step if epoch == start_epoch else 0  # a resumed epoch starts where it stopped
        train_loader.sampler.set_epoch(epoch, skip=first * job.per_rank)
        model.train()  # BN in train mode: the whole network is fine-tuned
        sums = EpochSums(ctx.device, start_sums if first and ctx.master else None)  # (rank 0 carries the saved sums)
        progress = Progress(f"epoch {epoch + 1}/{args.epochs}", (steps_per_epoch - first) * args.batch_size,
                            args.progress_every, ctx.master)
        for i, (x, y, _) in enumerate(train_loader, start=first):
            lr = warmup_cosine(epoch * steps_per_epoch + i, args.epochs * steps_per_epoch, job.peak_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, logits, y = train_step(job, model, optimizer, scaler, x, y)
            sums.add(loss, logits, y)
            progress.update(len(y) * ctx.world)
            if i + 1 < steps_per_epoch and resume.stop_due(ctx, i + 1) and resume.stop_agreed(stop, ctx):
                so_far = sums.so_far(ctx)
                resume.stop_and_exit(ctx, stop, lambda: save(job, net, model, optimizer, scaler, epoch, i + 1, so_far),
                                     f"after step {i + 1}/{steps_per_epoch} of epoch {epoch + 1}", job.state_path)
        train_loss, train_acc = sums.end(ctx, epoch, args.epochs, lr, board, "finetune", (epoch + 1) * steps_per_epoch)
        if ctx.master:
            save(job, net, model, optimizer, scaler, epoch + 1, 0, [])
        if epoch + 1 < args.epochs and resume.stop_agreed(stop, ctx):  # a signal in the epoch's last steps
            resume.stop_and_exit(ctx, stop, None, f"after epoch {epoch + 1}", job.state_path)
    job.phases["train"] = round(time.time() - t_train, 1)

    t_test = time.time()
    net.eval()  # the test set, once, after the last epoch
    scores, test_y = extract_features(net, test_loader, ctx.device, AMP_DTYPES[args.amp], args.channels_last,
                                      what="test", progress_every=args.progress_every)
    job.phases["test"] = round(time.time() - t_test, 1)
    accs = topk_accuracy(scores.float(), test_y, (1, 5) if job.classes >= 5 else (1,))
    report(job, board, args.epochs * steps_per_epoch, encoder, settings, accs, train_loss, train_acc, len(test_y))


def resolve(args, settings, proj, cifar_stem=False):
    """Fill the defaults that depend on the checkpoint, its projection head (the recipe) and the dataset;
    check them and that the results can be written (nothing is made yet) -> the recipe's start line."""
    args.dataset, args.data_dir, args.image_size, args.synthetic_size = data.defaults_from_checkpoint(
        settings, args.dataset, args.data_dir, args.image_size, args.synthetic_size)
    recipe_text = choose_recipe(args, proj)
    args.epochs = args.epochs or (60 if args.label_fraction <= 0.01 else 30)
    if args.workers is None:
        args.workers = data.default_workers()
    if args.out is None:
        tag = (os.path.splitext(os.path.basename(args.subset_file))[0] if args.subset_file
               else f"{100 * args.label_fraction:g}pct")
        args.out = f"{os.path.splitext(args.checkpoint)[0]}.finetune_{tag}{'_random_init' if args.random_init else ''}"
        args.out += f"_first{args.max_images}.json" if args.max_images else ".json"  # a dry run keeps the real results
    flags.check(fail, args, NUMBER_RANGES)  # the defaults filled in here too
    flags.check_image_size(fail, args.image_size, cifar_stem)
    output.check_file(args.out, "--out", create_folder=False)  # NAME.pt and NAME.ckpt.pt go beside it
    return recipe_text


def build_data(args, ctx):
    """The labelled subset, the test set and the batch that fits the subset -> the job the functions
    below share."""
    def build_all():
        train = data.build_dataset(args.dataset, args.data_dir, "train", args.image_size, args.synthetic_size)
        test = data.build_dataset(args.dataset, args.data_dir, "test", args.image_size, args.synthetic_size)
        chosen = data.labelled_subset(train, args.subset_file, args.label_fraction, args.seed)
        return train, data.first_images(test, args.max_images), chosen[:args.max_images]  # --max-images: first N

    train_raw, test_raw, chosen = rank0_first(ctx, build_all, data.DataError)
    args.batch_size, note = data.fit_batch(len(chosen), args.batch_size, ctx.world, "the labelled subset",
                                           hint="; raise --label-fraction")  # a small subset: all of it
    per_rank = args.batch_size // ctx.world
    peak_lr = scaled_lr(args.lr, args.batch_size, args.lr_scaling)
    if ctx.master:  # every input is checked: now the results folder is made
        output.check_file(args.out, "--out")
        class_note = data.class_note(test_raw)  # labels are numbered by the training split's classes
        if class_note:
            print(class_note, flush=True)
    if note and ctx.master:
        print(f"{note}, peak lr {peak_lr:.4g}", flush=True)
    stem = args.out[:-len(".json")] if args.out.endswith(".json") else args.out
    return SimpleNamespace(args=args, ctx=ctx, train_raw=train_raw, test_raw=test_raw, chosen=chosen,
                           classes=data.num_classes(train_raw), per_rank=per_rank, peak_lr=peak_lr,
                           model_path=stem + ".pt", state_path=stem + ".ckpt.pt",
                           phases={})  # seconds each phase took, for the results JSON


def build_model(job, encoder, proj):
    """The encoder (and kept head layers) with a zero-initialised linear head, wrapped for DDP, its
    optimizer and fp16's loss scaler -> (net, model to train, optimizer, scaler or None)."""
    args, ctx = job.args, job.ctx
    k = args.from_head_layer
    dim = (encoder.feature_dim if k == 0 else proj.config["out_dim"] if k == proj.config["num_layers"]
           else proj.config["hidden_dim"])
    linear = nn.Linear(dim, job.classes)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    net = Classifier(encoder, linear, proj if k else None, k).to(ctx.device)
    if args.channels_last:
        net.to(memory_format=torch.channels_last)
    model = wrap_ddp(net, ctx)  # torchrun: SyncBatchNorm over several GPUs, DDP on ctx.device; `net` stays live
    scaler = grad_scaler(args.amp, ctx.device)  # fp16 only
    fused = args.optimizer == "sgd" and scaler is not None and fused_sgd_available(ctx.device)
    optimizer = fine_tuning_optimizer(args.optimizer, [p for n, p in net.named_parameters() if not n.startswith("linear.")],
                                      net.linear.parameters(), job.peak_lr, args.momentum, args.weight_decay, args.eta,
                                      fused=fused)
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


def print_start(job, encoder, settings, texts, start):
    args, ctx = job.args, job.ctx
    if not ctx.master:
        return
    subset_classes = len(set(data.labels_of(job.train_raw)[job.chosen].tolist()))
    for text in texts:
        if text:
            print(text, flush=True)
    print(json.dumps(vars(args), sort_keys=True), flush=True)
    origin = ("random weights" if args.random_init
              else f"pretrained {settings.get('epoch', '?')} epochs on {settings.get('dataset', '?')}")
    kept = f" + projection-head layers 1..{args.from_head_layer}" if args.from_head_layer else ""
    scaling = "batch/256" if args.lr_scaling == "linear" else "sqrt(batch)"
    print(f"encoder {encoder.config} ({origin}){kept}; "
          f"{len(job.chosen)} of {len(job.train_raw)} labelled images ({subset_classes} of {job.classes} classes), "
          f"{len(job.test_raw)} test; {args.optimizer}, peak lr {job.peak_lr:.4g} = {args.lr} x {scaling}, "
          f"{job.steps_per_epoch} steps/epoch, processes {ctx.world}, device {ctx.device}", flush=True)
    if args.resume:
        print(f"resumed from {job.state_path} at epoch {start[0] + 1}, step {start[1] + 1}", flush=True)
    if start[0] >= args.epochs:
        print(f"nothing to train: {job.state_path} has finished {start[0]} of {args.epochs} epochs", flush=True)


def train_step(job, model, optimizer, scaler, x, y):
    """One optimizer step on a batch -> (loss, logits, labels on the device)."""
    args, device = job.args, job.ctx.device
    x, y = to_device(x, device, args.channels_last), y.to(device, non_blocking=True)  # x: uint8 -> float there
    with torch.autocast(device.type, dtype=AMP_DTYPES[args.amp], enabled=args.amp != "off"):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    backward_step(loss, optimizer, scaler)  # fp16: a step whose scaled gradients overflowed is skipped
    return loss, logits, y


def save(job, net, model, optimizer, scaler, epochs_done, step_in_epoch, sums):
    """Rank 0 writes the resume state and the fine-tuned network, each atomically; a write that fails
    is one line (output.WriteError) that says what the folder still holds."""
    args, kept = job.args, resume.kept_text(job.state_path, job.saved)
    resume.save_state(job.state_path, model, optimizer, scaler, epochs_done, step_in_epoch, job.steps_per_epoch,
                      sums, args, kept=kept)
    job.saved = (epochs_done, step_in_epoch)
    kept = resume.kept_text(job.state_path, job.saved)
    with output.writing(job.model_path, "--out", needed=tensor_bytes(net.state_dict()), after=f"; {kept}"):
        save_classifier(job.model_path, net, dataset=args.dataset, data_dir=args.data_dir, image_size=args.image_size,
                        synthetic_size=args.synthetic_size, epoch=epochs_done, step_in_epoch=step_in_epoch,
                        finetuned_from=os.path.abspath(args.checkpoint), recipe=args.recipe, classes=job.classes,
                        train_images=len(job.chosen))


def report(job, board, steps, encoder, settings, accs, train_loss, train_acc, test_images):
    """The results JSON, the TensorBoard results, and the last lines."""
    args, ctx, phases = job.args, job.ctx, job.phases
    results = {
        "checkpoint": os.path.abspath(args.checkpoint), "protocol": "finetune", "random_init": args.random_init,
        "recipe": args.recipe, "optimizer": args.optimizer, "lr_scaling": args.lr_scaling,
        "from_head_layer": args.from_head_layer, "conv_scale": args.conv_scale,
        "label_fraction": None if args.subset_file else args.label_fraction, "subset_file": args.subset_file,
        "train_images": len(job.chosen), "test_images": test_images, "classes": job.classes, "dataset": args.dataset,
        "image_size": args.image_size, "encoder_config": encoder.config, "pretrain_epochs": settings.get("epoch"),
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "peak_lr": job.peak_lr,
        "weight_decay": args.weight_decay, "seed": args.seed, "amp": args.amp, "final_train_loss": train_loss,
        "final_train_acc": train_acc, "top1": accs[0], "top5": accs[1] if len(accs) > 1 else None,
        "train_time_s": phases["train"], "phase_seconds": phases, "processes": ctx.world,
        "max_images": args.max_images, "model": os.path.abspath(job.model_path),
    }
    if ctx.master:  # printed before anything is written: a failed write loses nothing seen
        print(f"fine-tuned top-1 {accs[0]:.2f}%" + (f", top-5 {accs[1]:.2f}%" if len(accs) > 1 else ""), flush=True)
    write_results(results, args.out, ctx)
    board.add(steps, **{"finetune/top1": accs[0], "finetune/top5": results["top5"]})
    board.close()
    if ctx.master:
        print(f"wrote {args.out} (the network: {job.model_path})")
        print(f"top-1 accuracy: {accs[0]:.2f}%", flush=True)


if __name__ == "__main__":
    run(main, (data.DataError, CheckpointError, output.WriteError), data.error_text)
