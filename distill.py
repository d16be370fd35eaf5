"""Distillation with unlabeled images, SimCLRv2's third step (Chen et al. 2020b, Sec. 2.3).

  python distill.py runs/fmnist/encoder.finetune_10pct.pt --out runs/self_distill            # self-distillation
  python distill.py teacher.pt --arch resnet18 --width 0.5 --out runs/small                   # big-to-small
  python distill.py teacher.pt --init runs/fmnist/encoder.pt --out runs/from_pretrained       # student from an encoder
  torchrun --nproc_per_node=8 distill.py r152_3x_sk1_ft1.pt --arch resnet50 --dataset imagefolder \\
      --data-dir /data/imagenet --out runs/r50_student

The teacher is a fine-tuned network with its classifier: finetune.py's NAME.pt, or a converted
official finetuned_* checkpoint. It stays fixed, in eval mode, and labels every image on the fly,
as the student sees it (no cache). The student is the teacher's encoder architecture (self-
distillation) or --arch/--width (a plain ResNet with the teacher's stem), from random weights or
from --init ENCODER.pt, with a new linear classifier on h. It trains on every
image of the training split (STL-10: train+unlabeled; --dataset folder: every image under
--data-dir), labels unused, with random crop + flip only, to minimise

    -sum_y P_T(y|x; t) log P_S(y|x; t)   (+ --label-weight x the cross-entropy of the labelled images)

with P(y|x; t) = softmax(logits / t), t = --temperature (loss.distillation_loss; eq. 2 and 3 of the
paper). The labelled images are those finetune.py picks with the same --label-fraction and --seed
(or --subset-file); they count only with --label-weight > 0.

Defaults: LARS as the official distillation colab has it (biases and BN without weight decay or
trust ratio; the classifier's weight adapted like every other), weight decay 1e-4, momentum 0.9,
t = 1, cosine decay per step (the colab's); lr 0.1 x sqrt(batch) (SimCLRv2's pretraining rule;
the colab's toy run uses 2.0), no warmup, 100 epochs (a choice: the paper's budget is not in its
code), batch 4096 imagefolder, 256 otherwise; BN synchronised across CUDA processes.

Writes to --out at the end of every epoch, and when SIGTERM or SIGINT stops the run mid-epoch:
ckpt.pt (the state --resume continues from exactly), student.pt (the student in the encoder.pt
format with its classifier: linear_eval.py --checkpoint-classifier scores it, and it can teach
in turn), log.jsonl (one line per epoch: loss, agreement with the teacher); at the end
results.json with the test top-1 of student and teacher and their agreement, and the line
`top-1 accuracy: XX.XX%` (the student's).
"""
import argparse
import json
import os
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset

import data
import flags
import output
import resume
from augment import EvalTransform
from board import Board
from distributed import (AMP_DTYPES, EpochSums, StopRequest, add_amp_flags, fail, grad_scaler, rank0_first,
                         resolve_amp, run, setup, wrap_ddp, write_results)
from features import Progress, extract_features, to_device, topk_accuracy
from lars import backward_step, fine_tuning_optimizer, fused_sgd_available, scaled_lr, warmup_cosine
from loss import distillation_loss
from model import (ARCHS, CheckpointError, Classifier, build_encoder, load_classifier, load_encoder,
                   pretrain_settings, save_classifier, tensor_bytes)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_Formatter)
    p.add_argument("teacher", help="a fine-tuned network with its classifier (finetune.py's NAME.pt, convert_official.py's)")
    s = p.add_argument_group("student")
    s.add_argument("--arch", default=None, choices=list(ARCHS), help="default: the teacher's (self-distillation)")
    s.add_argument("--width", type=float, default=None, help="default: the teacher's")
    s.add_argument("--init", default=None, help="start the student's encoder from this encoder.pt (else random weights)")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default=None, choices=data.DATASETS,
                   help="the unlabeled images: the training split (stl10: train+unlabeled; folder: every image "
                        "under --data-dir); default: the teacher's dataset")
    d.add_argument("--data-dir", default=None, help="default: the teacher's")
    d.add_argument("--test-data-dir", default=None,
                   help="a labelled imagefolder (DIR/val/CLASS/*) for the test accuracy with --dataset folder; "
                        "default: the teacher's dataset")
    d.add_argument("--image-size", type=int, default=None, help="default: the teacher's (same dataset) or the dataset's")
    d.add_argument("--synthetic-size", type=int, default=None, help="generated training images; default: the teacher's")
    d.add_argument("--max-images", type=int, default=None,
                   help="use only the first N training and test images (a quick end-to-end check)")
    d.add_argument("--workers", type=int, default=None, help="data loading processes per rank; default: CPUs / ranks, at most 8")
    d.add_argument("--strict-data", action="store_true", help="stop at an unreadable training image instead of skipping it")
    o = p.add_argument_group("loss and optimisation")
    o.add_argument("--temperature", type=float, default=1.0, help="t of both softmaxes in the distillation term")
    o.add_argument("--label-weight", type=float, default=0.0,
                   help="weight of the labelled cross-entropy (paper eq. 3: (1 - a) / a); 0: no labels used")
    o.add_argument("--label-fraction", type=float, default=0.01,
                   help="with --label-weight: the labelled images, chosen per class as finetune.py does")
    o.add_argument("--subset-file", default=None, help="with --label-weight: the labelled images this file names")
    o.add_argument("--epochs", type=int, default=100)
    o.add_argument("--batch-size", type=int, default=None, help="global batch; default: 4096 imagefolder, 256 otherwise")
    o.add_argument("--optimizer", default="lars", choices=("lars", "sgd"),
                   help="lars: as the official distillation colab; sgd: Nesterov momentum SGD")
    o.add_argument("--lr", type=float, default=0.1, help="base learning rate")
    o.add_argument("--lr-scaling", default="sqrt", choices=("linear", "sqrt"),
                   help="peak lr = lr x batch/256 (linear) or lr x sqrt(batch) (sqrt)")
    o.add_argument("--warmup-epochs", type=float, default=0, help="linear warmup from 0, then cosine decay to 0, per step")
    o.add_argument("--weight-decay", type=float, default=1e-4)
    o.add_argument("--momentum", type=float, default=0.9)
    o.add_argument("--eta", type=float, default=0.001, help="LARS trust coefficient")
    r = p.add_argument_group("run")
    r.add_argument("--out", default="runs/distill", help="folder for ckpt.pt, student.pt, log.jsonl, results.json")
    r.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt where it stopped (mid-epoch too)")
    r.add_argument("--auto-resume", action="store_true", help="resume if OUT/ckpt.pt exists, else start")
    r.add_argument("--seed", type=int, default=0, help="student init, labelled subset, data order, augmentation")
    add_amp_flags(r, what="teacher and student (fp16 trains with dynamic loss scaling)")
    r.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="channels_last on CUDA")
    r.add_argument("--progress-every", type=float, default=30.0, help="seconds between progress lines")
    r.add_argument("--tensorboard", action="store_true",
                   help="also write the loss and agreement to OUT/tensorboard (needs pip install tensorboard)")
    r.add_argument("--dist-timeout", type=float, default=10,
                   help="minutes a collective waits for a process that died or hangs before the others fail")
    args = p.parse_args(argv)
    flags.check(p.error, args, NUMBER_RANGES)
    return args


NUMBER_RANGES = {"width": "(0, inf)", "image_size": "[1, inf)", "synthetic_size": "[1, inf)", "max_images": "[1, inf)",
                 "workers": "[0, inf)", "temperature": "(0, inf)", "label_weight": "[0, inf)",
                 "label_fraction": "(0, 1]", "epochs": "[1, inf)", "batch_size": "[1, inf)", "lr": "[0, inf)",
                 "warmup_epochs": "[0, inf)", "weight_decay": "[0, inf)", "momentum": "[0, 1)", "eta": "(0, inf)",
                 "progress_every": "[0, inf)", "dist_timeout": "(0, inf)"}  # flags.check


class KnownLabels(Dataset):
    """dataset[i] with label labels[i]: the true one for the labelled subset, -1 for the rest."""

    def __init__(self, dataset, labels):
        self.dataset, self.labels = dataset, labels
        if hasattr(dataset, "samples"):
            self.samples = dataset.samples  # SeededTransform names unreadable files by them

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i][0], int(self.labels[i])


def main():
    args = get_args()
    encoder, ckpt = load_encoder(args.teacher)
    teacher = load_classifier(args.teacher, ckpt, encoder)
    resolve(args, pretrain_settings(ckpt))
    ctx = setup(args.batch_size, args.dist_timeout)
    args.amp, amp_text = resolve_amp(args.amp, ctx.device)
    args.channels_last = args.channels_last and ctx.cuda
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    args.resume = resume.prepare(ckpt_path, args.resume, args.auto_resume, ctx.master)  # checks; makes nothing
    job = build_data(args, ctx, teacher.classes)
    torch.manual_seed(args.seed)
    student, model, teacher, optimizer, scaler = build_models(job, teacher)
    job.ckpt_path, job.student_path = ckpt_path, os.path.join(args.out, "student.pt")
    if ctx.master:  # every input is checked: now --out is made
        output.check_folder(args.out, "--out")
        resume.remove_leftovers(job.ckpt_path, job.student_path)
    job.board = Board(os.path.join(args.out, "tensorboard"), args.tensorboard, ctx.master)  # rank 0 writes
    loader, test_loader = make_loaders(job)
    spe = job.steps_per_epoch = len(loader)
    total_steps, warmup_steps = args.epochs * spe, int(round(args.warmup_epochs * spe))
    start_epoch, start_step, start_sums = 0, 0, []
    if args.resume:
        start_epoch, start_step, start_sums, _ = resume.load_state(
            ckpt_path, model, optimizer, scaler, spe, args, student.encoder.config, master=ctx.master,
            compared=("teacher", "temperature", "label_weight", "lr", "lr_scaling", "batch_size", "epochs",
                      "optimizer", "weight_decay", "seed"))
    job.saved = (start_epoch, start_step) if args.resume else None  # what --out holds for a resume
    print_start(job, student, teacher, amp_text, (start_epoch, start_step))

    t_train, stop = time.time(), StopRequest()
    for epoch in range(start_epoch, args.epochs):
        first = start_step if epoch == start_epoch else 0  # a resumed epoch starts where it stopped
        loader.sampler.set_epoch(epoch, skip=first * job.per_rank)
        model.train()  # the student only: the teacher stays in eval mode
        sums = EpochSums(ctx.device, start_sums if first and ctx.master else None, accuracy="agreement")
        progress = Progress(f"epoch {epoch + 1}/{args.epochs}", (spe - first) * args.batch_size, args.progress_every,
                            ctx.master)
        t_epoch = time.time()
        for i, (x, y, _) in enumerate(loader, start=first):
            lr = warmup_cosine(epoch * spe + i, total_steps, job.peak_lr, warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, logits, teacher_pred = train_step(job, model, teacher, optimizer, scaler, x, y)
            sums.add(loss, logits, teacher_pred)  # "accuracy" = agreement with the teacher's argmax
            progress.update(len(x) * ctx.world)
            if i + 1 < spe and resume.stop_due(ctx, i + 1) and resume.stop_agreed(stop, ctx):
                so_far = sums.so_far(ctx)
                resume.stop_and_exit(ctx, stop, lambda: save(job, student, model, optimizer, scaler, epoch, i + 1, so_far),
                                     f"after step {i + 1}/{spe} of epoch {epoch + 1}", ckpt_path)
        end_epoch(job, student, model, optimizer, scaler, epoch, sums, lr, time.time() - t_epoch)
        if epoch + 1 < args.epochs and resume.stop_agreed(stop, ctx):  # a signal in the epoch's last steps
            resume.stop_and_exit(ctx, stop, None, f"after epoch {epoch + 1}", ckpt_path)
    job.phases["train"] = round(time.time() - t_train, 1)
    evaluate(job, student, teacher, test_loader)


def resolve(args, settings):
    """Fill the defaults that come from the teacher's checkpoint and the dataset."""
    args.dataset, args.data_dir, args.image_size, args.synthetic_size = data.defaults_from_checkpoint(
        settings, args.dataset, args.data_dir, args.image_size, args.synthetic_size)
    if args.dataset != "folder":  # a labelled dataset: tested on its own test split
        if args.test_data_dir:
            fail("--test-data-dir is for --dataset folder; the other datasets are tested on their own test split")
        args.test_dataset, args.test_data_dir = args.dataset, args.data_dir
    elif args.test_data_dir:
        args.test_dataset = "imagefolder"
    elif settings.get("dataset") not in (None, "folder"):  # the teacher's labelled dataset
        args.test_dataset, args.test_data_dir = settings["dataset"], settings.get("data_dir", "data")
    else:
        args.test_dataset = None  # no test accuracy (said at the end)
    args.batch_size = args.batch_size or (4096 if args.dataset == "imagefolder" else 256)
    if args.workers is None:
        args.workers = data.default_workers()
    if args.label_weight and args.dataset == "folder":
        fail("--dataset folder has no labels, so --label-weight has nothing to weigh; distil without it, or on a "
             "labelled dataset")


def student_encoder(args, teacher):
    """The student's encoder: --init's, or a new one of the teacher's architecture (self-distillation)
    or of --arch/--width (a plain ResNet with the teacher's stem and input scaling)."""
    if args.init:
        encoder, _ = load_encoder(args.init)
        for name in ("arch", "width"):
            if getattr(args, name) is not None and getattr(args, name) != encoder.config[name]:
                fail(f"--{name} {getattr(args, name)} differs from the {name} of --init {args.init} "
                     f"({encoder.config[name]}); give one of them")
        return encoder
    config = dict(teacher.encoder.config)
    if args.arch is not None or args.width is not None:
        keep = ("cifar_stem", "tf_same_pool", "input_norm")
        config = {k: v for k, v in config.items() if k in keep}
        config.update(arch=args.arch or teacher.encoder.config["arch"], width=args.width or teacher.encoder.config["width"])
    return build_encoder(**config)


def build_models(job, teacher):
    """The student (a new linear classifier on h) wrapped for DDP, the teacher (eval mode, no
    gradients), the optimizer and fp16's loss scaler."""
    args, ctx = job.args, job.ctx
    encoder = student_encoder(args, teacher)
    flags.check_image_size(fail, args.image_size, encoder.config["cifar_stem"])
    # PyTorch's default init, not zeros: LARS scales the classifier's steps by its norm (as the colab's
    # Keras layer starts from its default init; the fine-tuning code zero-initialises but excludes it)
    student = Classifier(encoder, nn.Linear(encoder.feature_dim, teacher.classes)).to(ctx.device)
    teacher = teacher.to(ctx.device).eval().requires_grad_(False)  # fixed: BN uses its running statistics
    if args.channels_last:
        student.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)
    model = wrap_ddp(student, ctx)  # torchrun: global BN over several GPUs, DDP on ctx.device; `student` stays live
    scaler = grad_scaler(args.amp, ctx.device)  # fp16 only
    fused = args.optimizer == "sgd" and scaler is not None and fused_sgd_available(ctx.device)
    # the official distillation colab's LARS: the classifier's weight adapted too (only BN and biases excluded)
    optimizer = fine_tuning_optimizer(args.optimizer, student.parameters(), [], job.peak_lr, args.momentum,
                                      args.weight_decay, args.eta, fused=fused)
    return student, model, teacher, optimizer, scaler


def build_data(args, ctx, classes):
    """Every training image (labels kept only for the labelled subset) and the test set -> the job
    the functions below share."""
    def build_all():
        train = data.first_images(data.build_dataset(args.dataset, args.data_dir, "pretrain", args.image_size,
                                                     args.synthetic_size), args.max_images)
        test = None
        if args.test_data_dir is not None:
            test = data.first_images(data.build_dataset(args.test_dataset, args.test_data_dir, "test", args.image_size,
                                                        args.synthetic_size), args.max_images)
        return train, test, known_labels(args, train)

    train_raw, test_raw, labels = rank0_first(ctx, build_all, data.DataError)
    for what, dataset in (("the training images", train_raw), ("the test split", test_raw)):
        if dataset is not None and dataset.classes and len(dataset.classes) != classes:
            fail(f"the teacher's classifier has {classes} classes, {what} of {args.dataset} {len(dataset.classes)}; "
                 "distil on the dataset the teacher was fine-tuned for")
    if len(train_raw) < args.batch_size:
        fail(f"the dataset has {len(train_raw)} images, fewer than one global batch of {args.batch_size}; lower --batch-size")
    per_rank = args.batch_size // ctx.world
    peak_lr = scaled_lr(args.lr, args.batch_size, args.lr_scaling)
    return SimpleNamespace(args=args, ctx=ctx, train_raw=train_raw, test_raw=test_raw, labels=labels,
                           labelled=int((labels >= 0).sum()), per_rank=per_rank, peak_lr=peak_lr, phases={})


def known_labels(args, train):
    """Per training image its label if it is in the labelled subset (--label-weight > 0), else -1."""
    known = np.full(len(train), -1, dtype=np.int64)
    if not args.label_weight:
        return known
    chosen = data.labelled_subset(train, args.subset_file, args.label_fraction, args.seed)  # finetune.py's choice
    known[chosen] = data.labels_of(train)[chosen]
    return known


def make_loaders(job):
    """Every training image with crop + flip (shuffled by --seed), and the test set (or None)."""
    args, ctx = job.args, job.ctx
    train = data.SeededTransform(KnownLabels(job.train_raw, job.labels), EvalTransform(args.image_size, train=True),
                                 seed=args.seed, strict=args.strict_data)
    loader = data.make_loader(train, job.per_rank, train=True, workers=args.workers, rank=ctx.rank, world=ctx.world,
                              seed=args.seed, pin_memory=ctx.cuda)
    test = None
    if job.test_raw is not None:
        test = data.make_loader(data.SeededTransform(job.test_raw, EvalTransform(args.image_size, train=False), strict=True),
                                job.per_rank, train=False, workers=args.workers, rank=ctx.rank, world=ctx.world,
                                pin_memory=ctx.cuda)
    return loader, test


def print_start(job, student, teacher, amp_text, start):
    args, ctx = job.args, job.ctx
    if not ctx.master:
        return
    print(amp_text, flush=True)
    print(json.dumps(vars(args), sort_keys=True), flush=True)
    params = lambda m: sum(p.numel() for p in m.encoder.parameters()) / 1e6  # noqa: E731
    kind = "self-distillation" if student.encoder.config == teacher.encoder.config else "distillation"
    print(f"{kind}: teacher {teacher.encoder.config} ({params(teacher):.2f}M, classifier on "
          f"{f'head layer {teacher.head_layer}' if teacher.head_layer else 'h'}) -> student {student.encoder.config} "
          f"({params(student):.2f}M, {'from ' + args.init if args.init else 'random init'}); {len(job.train_raw)} "
          f"images of {args.dataset}, {job.labelled} with labels used (weight {args.label_weight:g}); "
          f"t = {args.temperature:g}; {args.optimizer}, peak lr {job.peak_lr:.4g}, {job.steps_per_epoch} steps/epoch, "
          f"processes {ctx.world}, device {ctx.device}", flush=True)
    if args.resume:
        print(f"resumed from {job.ckpt_path} at epoch {start[0] + 1}, step {start[1] + 1}", flush=True)


def train_step(job, model, teacher, optimizer, scaler, x, labels):
    """The teacher labels the batch, the student takes one step -> (loss, student logits, teacher's classes)."""
    args, device = job.args, job.ctx.device
    x, labels = to_device(x, device, args.channels_last), labels.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=AMP_DTYPES[args.amp], enabled=args.amp != "off"):
        with torch.no_grad():
            teacher_logits = teacher(x)  # on the same crop as the student, every time: no stale labels
        logits = model(x)
    loss = distillation_loss(logits, teacher_logits, args.temperature, labels, args.label_weight)  # float32
    optimizer.zero_grad(set_to_none=True)
    backward_step(loss, optimizer, scaler)  # fp16: a step whose scaled gradients overflowed is skipped
    return loss, logits, teacher_logits.argmax(1)


def save(job, student, model, optimizer, scaler, epochs_done, step_in_epoch, sums):
    """Rank 0 writes the resume state and the student, each atomically; a write that fails is one
    line (output.WriteError) that says what --out still holds."""
    args = job.args
    resume.save_state(job.ckpt_path, model, optimizer, scaler, epochs_done, step_in_epoch, job.steps_per_epoch,
                      sums, args, kept=resume.kept_text(job.ckpt_path, job.saved))
    job.saved = (epochs_done, step_in_epoch)
    with output.writing(job.student_path, "--out", needed=tensor_bytes(student.state_dict()),
                        after=f"; {resume.kept_text(job.ckpt_path, job.saved)}"):
        save_classifier(job.student_path, student, dataset=args.test_dataset, data_dir=args.test_data_dir,
                        image_size=args.image_size, synthetic_size=args.synthetic_size, epoch=epochs_done,
                        step_in_epoch=step_in_epoch, teacher=os.path.abspath(args.teacher), distilled_on=args.dataset,
                        temperature=args.temperature, label_weight=args.label_weight)


def end_epoch(job, student, model, optimizer, scaler, epoch, sums, lr, seconds):
    """The epoch's mean loss and agreement; rank 0 saves and logs them."""
    args, ctx, spe = job.args, job.ctx, job.steps_per_epoch
    loss, agreement = sums.end(ctx, epoch, args.epochs, lr, job.board, "distill", (epoch + 1) * spe)
    if ctx.master:
        save(job, student, model, optimizer, scaler, epoch + 1, 0, [])
        output.append_line(os.path.join(args.out, "log.jsonl"), json.dumps(
            {"epoch": epoch + 1, "step": (epoch + 1) * spe, "loss": loss, "agreement": agreement, "lr": lr,
             "epoch_time_s": round(seconds, 3)}))


def evaluate(job, student, teacher, test_loader):
    """Test top-1 of the student and the teacher and their agreement; the results and the last lines."""
    args, ctx = job.args, job.ctx
    results = {"teacher": os.path.abspath(args.teacher), "student_config": student.encoder.config,
               "teacher_config": teacher.encoder.config, "init": args.init, "dataset": args.dataset,
               "images": len(job.train_raw), "labelled_images_used": job.labelled, "temperature": args.temperature,
               "label_weight": args.label_weight, "epochs": args.epochs, "batch_size": args.batch_size,
               "optimizer": args.optimizer, "lr": args.lr, "peak_lr": job.peak_lr, "seed": args.seed,
               "amp": args.amp, "processes": ctx.world, "max_images": args.max_images}
    if test_loader is None:
        if ctx.master:
            print(f"no labelled test split for {args.dataset}: pass --test-data-dir to measure the test accuracy")
    else:
        t = time.time()
        student.eval()
        amp = AMP_DTYPES[args.amp]
        (s_scores, y), (t_scores, _) = (extract_features(net, test_loader, ctx.device, amp, args.channels_last,
                                                         what=f"{name} test", progress_every=args.progress_every)
                                        for net, name in ((student, "student"), (teacher, "teacher")))
        ks = (1, 5) if teacher.classes >= 5 else (1,)
        accs, teacher_accs = topk_accuracy(s_scores.float(), y, ks), topk_accuracy(t_scores.float(), y, ks)
        agreement = 100.0 * (s_scores.argmax(1) == t_scores.argmax(1)).float().mean().item()
        job.phases["test"] = round(time.time() - t, 1)
        results.update(test_images=len(y), top1=accs[0], top5=accs[-1] if len(ks) > 1 else None,
                       teacher_top1=teacher_accs[0], teacher_top5=teacher_accs[-1] if len(ks) > 1 else None,
                       test_agreement=agreement)
        job.board.add(args.epochs * job.steps_per_epoch, **{"distill/top1": accs[0], "distill/teacher_top1": teacher_accs[0],
                                                            "distill/test_agreement": agreement})
    results["phase_seconds"] = job.phases
    if ctx.master and test_loader is not None:  # printed before anything is written: a failed write loses nothing seen
        print(f"student top-1 {results['top1']:.2f}%, teacher top-1 {results['teacher_top1']:.2f}%, agreement "
              f"{results['test_agreement']:.2f}% on {results['test_images']} test images", flush=True)
    write_results(results, os.path.join(args.out, "results.json"), ctx)
    job.board.close()
    if ctx.master:
        print(f"wrote {os.path.join(args.out, 'results.json')} (the student: {job.student_path})")
        if test_loader is not None:
            print(f"top-1 accuracy: {results['top1']:.2f}%", flush=True)


if __name__ == "__main__":
    run(main, (data.DataError, CheckpointError, output.WriteError), data.error_text)
