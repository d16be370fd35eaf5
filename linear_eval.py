"""Linear evaluation of a pretrained encoder (Chen et al. 2020, Sec. 4 and B.6), and kNN.

  python linear_eval.py runs/cifar10/encoder.pt                     # the paper's protocol
  python linear_eval.py runs/cifar10/encoder.pt --cached-features   # features computed once, plus kNN
  torchrun --nproc_per_node=8 linear_eval.py runs/imagenet/encoder.pt --data-dir /data/imagenet

Reads encoder.pt or ckpt.pt and rebuilds the encoder from it; the dataset, data folder and image
size default to the pretraining ones. The protocol: a linear classifier on the frozen encoder's
features, SGD with Nesterov momentum, lr 0.1 x batch/256, cosine; imagefolder 90 epochs of batch
4096, otherwise 100 of batch 512; random crop + flip for training images; the test set scored once,
after the last epoch, every image counted once. --knn and --cached-features add weighted kNN
(k = 200, t = 0.1); --cached-features trains on features of un-augmented images computed once
(minutes instead of hours, no crop + flip). --checkpoint-classifier scores the classifier a
converted official checkpoint carries. Ends with the line `top-1 accuracy: XX.XX%` and writes JSON
next to the checkpoint.

Protocols, every flag, memory and time at ImageNet scale: docs/evaluation.md.
"""
import argparse
import json
import math
import os
import time
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import flags
import output
from augment import EvalTransform
from board import Board, results_folder
from distributed import (AMP_DTYPES, EpochSums, add_amp_flags, fail, rank0_first, resolve_amp, run, setup,
                         wrap_ddp, write_results)
from features import Progress, extract_features, feature_batches, knn_accuracy, to_device, topk_accuracy
from lars import scaled_lr, warmup_cosine
from model import CheckpointError, build_encoder, load_classifier, load_encoder, pretrain_settings


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_Formatter)
    p.add_argument("checkpoint", help="encoder.pt or ckpt.pt written by pretrain.py")
    p.add_argument("--dataset", default=None, choices=data.DATASETS, help="default: the pretraining dataset")
    p.add_argument("--data-dir", default=None, help="default: the pretraining one")
    p.add_argument("--image-size", type=int, default=None, help="default: the pretraining one (same dataset) or the dataset's")
    p.add_argument("--synthetic-size", type=int, default=None, help="generated training images; default: the pretraining one")
    p.add_argument("--epochs", type=int, default=None, help="default: 90 imagefolder, 100 otherwise")
    p.add_argument("--batch-size", type=int, default=None,
                   help="global batch; default: 4096 imagefolder, 512 otherwise, 256 with --checkpoint-classifier")
    p.add_argument("--lr", type=float, default=0.1, help="base learning rate: peak lr = lr x batch/256")
    p.add_argument("--weight-decay", type=float, default=None, help="default: 1e-6 imagefolder, 0 otherwise")
    p.add_argument("--momentum", type=float, default=0.9, help="Nesterov momentum")
    p.add_argument("--cached-features", action="store_true",
                   help="train on features computed once without augmentation (fast, no crop + flip)")
    p.add_argument("--random-init", action="store_true", help="evaluate a randomly initialised encoder instead")
    p.add_argument("--checkpoint-classifier", action="store_true",
                   help="train nothing: evaluate the classifier stored in the checkpoint on the test split")
    p.add_argument("--knn", action="store_true",
                   help="also report kNN accuracy in the paper protocol (one extra pass over the training set; "
                        "always reported with --cached-features)")
    p.add_argument("--knn-k", type=int, default=200, help="neighbours of the kNN classifier")
    p.add_argument("--knn-temperature", type=float, default=0.1, help="kNN vote weight exp(sim / t)")
    p.add_argument("--workers", type=int, default=None, help="data loading processes per rank; default: CPUs / ranks, at most 8")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strict-data", action="store_true",
                   help="stop at an unreadable training image instead of skipping it (test images always must be readable)")
    add_amp_flags(p, default=None, what="the frozen encoder (default: auto; off with --checkpoint-classifier, "
                                        "whose numbers are float32)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="channels_last on CUDA")
    p.add_argument("--out", default=None, help="results JSON; default: next to the checkpoint")
    p.add_argument("--max-images", type=int, default=None,
                   help="use only the first N images of each split (a quick check of the whole run)")
    p.add_argument("--progress-every", type=float, default=30.0, help="seconds between progress lines")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write the loss and accuracy to tensorboard/NAME beside the results NAME.json "
                        "(needs pip install tensorboard)")
    p.add_argument("--dist-timeout", type=float, default=10,
                   help="minutes a collective waits for a process that died or hangs before the others fail")
    return p.parse_args(argv)


NUMBER_RANGES = {"epochs": "[1, inf)", "batch_size": "[1, inf)", "knn_k": "[1, inf)", "image_size": "[1, inf)",
                 "synthetic_size": "[1, inf)", "workers": "[0, inf)", "max_images": "[1, inf)",
                 "progress_every": "[0, inf)", "lr": "[0, inf)", "weight_decay": "[0, inf)", "momentum": "[0, 1)",
                 "knn_temperature": "(0, inf)", "dist_timeout": "(0, inf)"}  # flags.check


def resolve(args, settings, cifar_stem=False):
    """Fill the defaults that depend on the checkpoint and the dataset; check the flags and that the
    results file can be written (nothing is made yet)."""
    args.dataset, args.data_dir, args.image_size, args.synthetic_size = data.defaults_from_checkpoint(
        settings, args.dataset, args.data_dir, args.image_size, args.synthetic_size)
    imagenet = args.dataset == "imagefolder"
    args.epochs = args.epochs or (90 if imagenet else 100)
    # --checkpoint-classifier only runs the network: the batch changes nothing but memory (float32)
    args.batch_size = args.batch_size or (256 if args.checkpoint_classifier else 4096 if imagenet else 512)
    if args.weight_decay is None:
        args.weight_decay = 1e-6 if imagenet else 0.0
    if args.workers is None:
        args.workers = data.default_workers()
    if args.amp is None:
        args.amp = "off" if args.checkpoint_classifier else "auto"  # float32, as the TF numbers being reproduced
    if args.checkpoint_classifier and (args.random_init or args.cached_features):
        fail("--checkpoint-classifier evaluates the stored classifier: it takes no --random-init or --cached-features")
    flags.check(fail, args, NUMBER_RANGES)
    flags.check_image_size(fail, args.image_size, cifar_stem)
    if args.out is None:
        tags = ("checkpoint_classifier" if args.checkpoint_classifier else
                "linear" + ("_random_init" if args.random_init else "") + ("_cached" if args.cached_features else ""))
        tags += f"_first{args.max_images}" if args.max_images else ""  # a dry run keeps the real results
        args.out = f"{os.path.splitext(args.checkpoint)[0]}.{tags}.json"
    output.check_file(args.out, "--out", create_folder=False)
    return args


def stored_classifier(args, encoder, ckpt):
    """The network of the checkpoint's classifier: the encoder, the projection-head layers the
    classifier reads (head_layer k > 0: v2 fine-tuned models) and the linear layer."""
    if ckpt.get("classifier") is None:
        fail(f"{args.checkpoint} stores no classifier (convert_official.py keeps the official head_supervised, "
             "finetune.py and distill.py save theirs); drop --checkpoint-classifier to train one")
    return load_classifier(args.checkpoint, ckpt, encoder)


def evaluate_checkpoint_classifier(args, encoder, ckpt, ctx):
    """Top-1/top-5 of the stored classifier on the test split; no training."""
    net = stored_classifier(args, encoder, ckpt).to(ctx.device).eval()  # BN uses the stored statistics
    test_raw = rank0_first(ctx, lambda: data.first_images(data.build_dataset(
        args.dataset, args.data_dir, "test", args.image_size, args.synthetic_size), args.max_images), data.DataError)
    classes = data.num_classes(test_raw)
    stored_classes = ckpt["classifier"]["weight"].shape[0]
    if classes > stored_classes:
        fail(f"the test split has {classes} classes, the stored classifier {stored_classes}")
    train_dir, val_dir = os.path.join(args.data_dir, "train"), os.path.join(args.data_dir, "val")
    if args.dataset == "imagefolder" and classes != stored_classes:  # labels by sorted class folder names
        fail(f"{train_dir} has {classes} class folders but the stored classifier has {stored_classes} classes, so "
             "the labels would not be the classifier's; use the dataset it was trained on" if os.path.isdir(train_dir)
             else f"{val_dir} has {classes} class folders and no {train_dir} beside it, but the stored classifier has "
             f"{stored_classes} classes: labels numbered by val/'s own folders would not be the classifier's. Add the "
             "training split's class folders as train/CLASS (only their names are read), or give val/ every class")
    if ctx.master:
        output.check_file(args.out, "--out")
    note = data.class_note(test_raw)
    loader = data.make_loader(data.SeededTransform(test_raw, EvalTransform(args.image_size, train=False), strict=True,
                                                   hint=data.TEST_HINT),
                              args.batch_size // ctx.world, train=False, workers=args.workers, rank=ctx.rank,
                              world=ctx.world, pin_memory=ctx.cuda)
    k = ckpt["classifier"]["head_layer"]
    if ctx.master:
        print(json.dumps(vars(args), sort_keys=True), flush=True)
        print(f"encoder {encoder.config} with its stored classifier ({stored_classes} classes, reading "
              f"{f'projection-head layer {k}' if k else 'h'}); {args.dataset}: {len(test_raw)} test images; "
              f"processes {ctx.world}, device {ctx.device}", flush=True)
        if note:
            print(note, flush=True)
    t = time.time()
    if ctx.cuda:  # the official numbers are float32: no TF32 in the encoder's convolutions either
        torch.backends.cudnn.allow_tf32 = False
    scores, test_y = extract_features(net, loader, ctx.device, AMP_DTYPES[args.amp], args.channels_last, what="test",
                                      progress_every=args.progress_every)
    accs = topk_accuracy(scores.float(), test_y, (1, 5) if stored_classes >= 5 else (1,))
    results = {
        "checkpoint": os.path.abspath(args.checkpoint), "protocol": "checkpoint_classifier",
        "dataset": args.dataset, "image_size": args.image_size, "test_images": len(test_y), "classes": classes,
        "encoder_config": encoder.config, "head_layer": k, "amp": args.amp,
        "top1": accs[0], "top5": accs[1] if len(accs) > 1 else None, "processes": ctx.world,
        "max_images": args.max_images, "phase_seconds": {"test": round(time.time() - t, 3)},
    }
    if ctx.master:  # printed before the results file is written: a failed write loses nothing seen
        print(f"stored classifier top-1 {accs[0]:.2f}%" + (f", top-5 {accs[1]:.2f}%" if len(accs) > 1 else ""),
              flush=True)
    write_results(results, args.out, ctx)
    if ctx.master:
        print(f"wrote {args.out}")
        print(f"top-1 accuracy: {accs[0]:.2f}%", flush=True)


def main():
    args = get_args()
    encoder, ckpt = load_encoder(args.checkpoint)
    settings = pretrain_settings(ckpt)
    args = resolve(args, settings, encoder.config["cifar_stem"])
    ctx = setup(args.batch_size, args.dist_timeout)
    args.amp, amp_text = resolve_amp(args.amp, ctx.device, train=False)  # the encoder only runs forward here
    args.channels_last = args.channels_last and ctx.cuda
    board = Board(results_folder(args.out), args.tensorboard, ctx.master)  # rank 0 writes
    if ctx.master:
        print(amp_text, flush=True)
    if args.checkpoint_classifier:
        return evaluate_checkpoint_classifier(args, encoder, ckpt, ctx)
    if args.random_init:
        torch.manual_seed(args.seed)
        encoder = build_encoder(**encoder.config)
    # The encoder is frozen and stays in eval mode: BN uses the running statistics
    # from pretraining; in train mode they would drift toward the evaluation data
    # and change the very features being evaluated.
    encoder.to(ctx.device).eval().requires_grad_(False)
    if args.channels_last:
        encoder.to(memory_format=torch.channels_last)
    job = build_data(args, ctx, encoder, settings)

    # Training-set features serve kNN and --cached-features only: the paper protocol trains
    # on augmented images, so without --knn it skips this pass over the training set.
    knn_top1 = train = None
    if args.cached_features or args.knn:
        # An unreadable training image is skipped (unless --strict-data); every test image must count.
        train = extract(job, job.train_raw, "train features", strict=args.strict_data)
    test_f, test_y = extract(job, job.test_raw, "test features")
    if train is not None:
        knn_top1 = knn(job, *train, test_f, test_y)
    if not args.cached_features:
        train = None  # the paper protocol trains on images: free the features first
    classifier, (train_loss, train_acc), steps = train_classifier(job, board, cached=train)
    with torch.no_grad():  # the test set, once, after the last epoch
        scores = torch.cat([classifier(h.float()) for h, _ in feature_batches(test_f, test_y, args.batch_size, ctx.device)])
    accs = topk_accuracy(scores, test_y.to(ctx.device), (1, 5) if job.classes >= 5 else (1,))
    report(job, board, steps, accs, knn_top1, train_loss, train_acc, len(test_y))


def build_data(args, ctx, encoder, settings):
    """The labelled training and test sets, the batch that fits them, the start lines -> the job
    the functions below share."""
    def build(split):  # --max-images: the first N images (class names kept)
        return data.first_images(data.build_dataset(args.dataset, args.data_dir, split, args.image_size,
                                                    args.synthetic_size), args.max_images)

    train_raw, test_raw = rank0_first(ctx, lambda: (build("train"), build("test")), data.DataError)
    classes = data.num_classes(train_raw)
    # a small dataset: the whole training set is the batch
    args.batch_size, note = data.fit_batch(len(train_raw), args.batch_size, ctx.world, "the training set")
    per_rank, peak_lr = args.batch_size // ctx.world, scaled_lr(args.lr, args.batch_size)  # lr x batch/256
    if ctx.master:  # every input is checked: now the results folder is made
        output.check_file(args.out, "--out")
        class_note = data.class_note(test_raw)  # labels are numbered by the training split's classes
        if class_note:
            print(class_note, flush=True)
        if note:
            print(f"{note}, peak lr {peak_lr:.4g} = {args.lr} x {args.batch_size}/256", flush=True)
        print(json.dumps(vars(args), sort_keys=True), flush=True)
        origin = ("random weights" if args.random_init
                  else f"pretrained {settings.get('epoch', '?')} epochs on {settings.get('dataset', '?')}")
        print(f"encoder {encoder.config} ({encoder.feature_dim}-d, {origin}); {args.dataset}: {len(train_raw)} train / "
              f"{len(test_raw)} test images, {classes} classes; peak lr {peak_lr:.4g} = {args.lr} x {args.batch_size}/256; "
              f"processes {ctx.world}, device {ctx.device}", flush=True)
    return SimpleNamespace(args=args, ctx=ctx, encoder=encoder, settings=settings, train_raw=train_raw,
                           test_raw=test_raw, classes=classes, per_rank=per_rank, peak_lr=peak_lr,
                           phases={})  # seconds each phase took, for the results JSON


def feature_loader(job, raw, transform=None, train=False, strict=True):
    """This rank's loader of `raw` through `transform` (default: the evaluation transform)."""
    args, ctx = job.args, job.ctx
    transform = transform or EvalTransform(args.image_size, train=False)
    return data.make_loader(data.SeededTransform(raw, transform, seed=args.seed, strict=strict,
                                                 hint=data.TEST_HINT if raw is job.test_raw else data.TRAIN_HINT),
                            job.per_rank,
                            train=train, workers=args.workers, rank=ctx.rank, world=ctx.world, seed=args.seed,
                            pin_memory=ctx.cuda)


def extract(job, raw, what, strict=True):
    """The frozen encoder's features of every image of `raw` -> (features, labels); times the phase."""
    t = time.time()
    out = extract_features(job.encoder, feature_loader(job, raw, strict=strict), job.ctx.device,
                           AMP_DTYPES[job.args.amp], job.args.channels_last, what=what,
                           progress_every=job.args.progress_every)
    job.phases[what.replace(" ", "_")] = round(time.time() - t, 1)
    return out


def knn(job, train_f, train_y, test_f, test_y):
    """Weighted kNN top-1 (%) of the test features among the training features."""
    args, t = job.args, time.time()
    top1 = knn_accuracy(train_f, train_y, test_f, test_y, job.classes, args.knn_k, args.knn_temperature, job.ctx.device)
    job.phases["knn"] = round(time.time() - t, 1)
    if job.ctx.master:
        print(f"features in {job.phases['train_features'] + job.phases['test_features']:.1f}s; kNN (k={args.knn_k}, "
              f"t={args.knn_temperature}) top-1 {top1:.2f}% ({job.phases['knn']:.1f}s)", flush=True)
    return top1


def train_classifier(job, board, cached=None):
    """A zero-initialised linear classifier on h, trained for --epochs: on the frozen encoder's features
    of augmented training images (the paper protocol), or on `cached` (features, labels) computed once
    -> (classifier, (loss, accuracy) of the last epoch, total steps)."""
    args, ctx = job.args, job.ctx
    classifier = nn.Linear(job.encoder.feature_dim, job.classes).to(ctx.device)
    nn.init.zeros_(classifier.weight)
    nn.init.zeros_(classifier.bias)
    if cached is not None:
        # Every process trains the same classifier on all cached features: no gradient exchange needed.
        steps_per_epoch, epoch_images, model = math.ceil(len(cached[1]) / args.batch_size), len(cached[1]), classifier
    else:
        loader = feature_loader(job, job.train_raw, EvalTransform(args.image_size, train=True), train=True,
                                strict=args.strict_data)
        steps_per_epoch, epoch_images = len(loader), len(loader) * args.batch_size
        model = wrap_ddp(classifier, ctx, sync_bn=False)  # torchrun: DDP on ctx.device (no BN to sync)
    optimizer = torch.optim.SGD(model.parameters(), lr=job.peak_lr, momentum=args.momentum, nesterov=True,
                                weight_decay=args.weight_decay)
    total_steps = args.epochs * steps_per_epoch
    t_train = time.time()
    for epoch in range(args.epochs):
        progress = Progress(f"epoch {epoch + 1}/{args.epochs}", epoch_images, args.progress_every, ctx.master)
        sums = EpochSums(ctx.device)
        batches = cached_batches(job, *cached, epoch) if cached is not None else encoded_batches(job, loader, epoch)
        for i, (h, y) in enumerate(batches):
            lr = warmup_cosine(epoch * steps_per_epoch + i, total_steps, job.peak_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            logits = model(h.float())
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums.add(loss, logits, y)
            progress.update(len(y) * (1 if cached is not None else ctx.world))
        last = sums.end(ctx, epoch, args.epochs, lr, board, "linear", (epoch + 1) * steps_per_epoch,
                        reduce=cached is None)  # cached: every process saw every feature
    job.phases["train"] = round(time.time() - t_train, 1)
    return classifier, last, total_steps


def cached_batches(job, train_f, train_y, epoch):
    """(features, labels) batches of one epoch, shuffled, from wherever the features are (GPU or host)."""
    order = torch.Generator().manual_seed(job.args.seed * 1000 + epoch)
    return feature_batches(train_f, train_y, job.args.batch_size, job.ctx.device, order)


def encoded_batches(job, loader, epoch):
    """(h, labels) batches of one epoch of augmented training images through the frozen encoder."""
    args, device = job.args, job.ctx.device
    loader.sampler.set_epoch(epoch)
    for x, y, _ in loader:
        x = to_device(x, device, args.channels_last)  # uint8 over the bus, float on the device
        with torch.no_grad(), torch.autocast(device.type, dtype=AMP_DTYPES[args.amp], enabled=args.amp != "off"):
            h = job.encoder(x)
        yield h, y.to(device, non_blocking=True)


def report(job, board, steps, accs, knn_top1, train_loss, train_acc, test_images):
    """The results JSON, the TensorBoard results, and the last lines."""
    args, ctx, phases = job.args, job.ctx, job.phases
    results = {
        "checkpoint": os.path.abspath(args.checkpoint), "protocol": "linear", "random_init": args.random_init,
        "cached_features": args.cached_features, "dataset": args.dataset, "image_size": args.image_size,
        "train_images": len(job.train_raw), "test_images": test_images, "classes": job.classes,
        "encoder_config": job.encoder.config, "pretrain_epochs": job.settings.get("epoch"),
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "peak_lr": job.peak_lr,
        "weight_decay": args.weight_decay, "final_train_loss": train_loss, "final_train_acc": train_acc,
        "top1": accs[0], "top5": accs[1] if len(accs) > 1 else None,
        "knn_top1": knn_top1, "knn_k": args.knn_k, "knn_temperature": args.knn_temperature,
        "train_time_s": phases["train"], "phase_seconds": phases, "processes": ctx.world,
        "max_images": args.max_images,
    }
    if ctx.master:  # printed before anything is written: a failed write loses nothing seen
        print((f"kNN top-1 {knn_top1:.2f}%; " if knn_top1 is not None else "") + f"linear top-1 {accs[0]:.2f}%"
              + (f", top-5 {accs[1]:.2f}%" if len(accs) > 1 else ""), flush=True)
    write_results(results, args.out, ctx)
    board.add(steps, **{"linear/top1": accs[0], "linear/top5": results["top5"], "knn/top1": knn_top1})
    board.close()
    if ctx.master:
        print(f"wrote {args.out}")
        print(f"top-1 accuracy: {accs[0]:.2f}%", flush=True)


if __name__ == "__main__":
    run(main, (data.DataError, CheckpointError, output.WriteError), data.error_text)
