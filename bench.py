"""Throughput benchmarks: the view pipeline, the pretraining step, the loss at large batch.

  python bench.py                          # CPU-sized defaults (what docs/speed.md reports)
  python bench.py --device cuda            # GPU: ResNet-50, 224 px, 256 images per step
  python bench.py --only views,loss        # some sections
  python bench.py --device cuda:1 --amp fp16   # that GPU (every CUDA call names it), fp16 + loss scaling

Sections, each measured in one run so that its ratios are fair on a noisy machine:
  views  per image and per CPU core (one thread's CPU time): the decode alone, the GPU path's CPU
         share (decode + crops + flips into uint8), whole views on the CPU, torchvision's pipeline;
         where the GPU path's time goes; the same on large photo-like JPEGs (--photo-sizes), with
         and without the scaled decode
  step   images/s of pretraining steps: (a) batches already on the device, (b) workers making whole
         views (--distort-on workers), (c) workers cropping, distortion on the device
  loss   time and peak memory of nt_xent against the broadcast form several ports use
  memory activation memory and time of a step, without and with activation checkpointing
  epoch  seconds for one epoch of ResNet-18 (CIFAR stem) on generated 32 px images
--amp sets the encoder's autocast in the step, memory and epoch sections (the loss section is
float32). A row that runs out of memory is a result ("failed"), a failed section is reported while
the others go on, and --json is rewritten after each section.

What each section measures, and the numbers: docs/speed.md.
"""
import argparse
import gc
import importlib.util
import io
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

import augment
import data
from augment import SimCLRViews
from lars import LARS
from loss import nt_xent
from model import ProjectionHead, SimCLR, build_encoder
import flags
import output
from distributed import AMP_DTYPES, Context, add_amp_flags, grad_scaler, resolve_amp
from pretrain import forward_backward, is_out_of_memory, to_device_views, train_step


def get_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (every CUDA call measures that GPU)")
    add_amp_flags(p, what="the encoder in the step, memory and epoch sections (as pretrain.py's --amp)")
    p.add_argument("--only", default="views,step,loss,memory,epoch", help="comma-separated sections")
    p.add_argument("--arch", default=None, help="step section; default resnet50 on CUDA, resnet18 on CPU")
    p.add_argument("--image-size", type=int, default=None, help="step section; default 224 on CUDA, 64 on CPU")
    p.add_argument("--batch-size", type=int, default=None, help="images per step; default 256 on CUDA, 32 on CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant; default 30 on CUDA, 8 on CPU")
    p.add_argument("--workers", type=int, default=None, help="data workers for (b), (c); default: all CPUs, at most 16")
    p.add_argument("--view-images", type=int, default=48, help="JPEG images per round of the views section")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds of the views section")
    p.add_argument("--photo-sizes", default="4032x3024,1600x1200",
                   help="views section: WxH,... of the large photo-like JPEGs; empty: none")
    p.add_argument("--photo-images", type=int, default=3, help="views section: large JPEGs of each size")
    p.add_argument("--views-baseline", default=None,
                   help="views section: also time the SimCLRViews of this other augment.py file (e.g. an earlier "
                        "commit's, from git show REV:augment.py) in the same rounds")
    p.add_argument("--loss-sizes", default=None, help="2N values; default 2048,8192,32768 (CPU: 2048,4096,8192,32768)")
    p.add_argument("--memory-cases", default=None,
                   help="memory section: IMAGESxPX,...; default 128x224,256x224,512x224 on CUDA, 64x96 on CPU")
    p.add_argument("--memory-arch", default="resnet50", help="memory section")
    p.add_argument("--memory-width", type=float, default=1.0, help="memory section")
    p.add_argument("--memory-rounds", type=int, default=3, help="memory section: timed rounds")
    p.add_argument("--epoch-images", type=int, default=None, help="default 50000 on CUDA, 1024 on CPU")
    p.add_argument("--json", default=None, help="also write all numbers to this file")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda:  # "cuda" -> "cuda:0": every CUDA call below names its GPU
        device = torch.device(args.device)
        args.device = str(torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index))
    flags.check(p.error, args, {name: "[1, inf)" for name in ("image_size", "batch_size", "steps", "view_images",
                                                              "rounds", "memory_rounds", "epoch_images",
                                                              "photo_images")}
                | {"workers": "[0, inf)", "memory_width": "(0, inf)"})
    args.arch = args.arch or ("resnet50" if cuda else "resnet18")
    args.image_size = args.image_size if args.image_size is not None else (224 if cuda else 64)
    args.batch_size = args.batch_size if args.batch_size is not None else (256 if cuda else 32)
    args.steps = args.steps if args.steps is not None else (30 if cuda else 8)
    args.workers = args.workers if args.workers is not None else min(16, os.cpu_count() or 1)
    args.loss_sizes = [int(v) for v in (args.loss_sizes or ("2048,8192,32768" if cuda else "2048,4096,8192,32768")).split(",")]
    args.epoch_images = args.epoch_images if args.epoch_images is not None else (50_000 if cuda else 1024)
    args.memory_cases = args.memory_cases or ("128x224,256x224,512x224" if cuda else "64x96")
    try:
        args.photo_sizes = [tuple(int(v) for v in size.lower().split("x")) for size in args.photo_sizes.split(",") if size]
    except ValueError:
        p.error(f"--photo-sizes takes WxH,... (e.g. 4032x3024,1600x1200), not {args.photo_sizes!r}")
    if any(len(size) != 2 or min(size) < 16 for size in args.photo_sizes):
        p.error("--photo-sizes must be WxH pairs of at least 16 px each")
    return args


# ----------------------------------------------------------------------------
# Test images: JPEGs of ImageNet's typical size, smooth structure plus noise.

def make_jpegs(n, seed=0, size=(500, 375)):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        coarse = Image.fromarray((rng.random((size[1] // 16, size[0] // 16, 3)) * 255).astype(np.uint8))
        img = np.asarray(coarse.resize(size, Image.BICUBIC), np.float32) + rng.normal(0, 10, (size[1], size[0], 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def make_photo(size, seed=0, quality=90):
    """A photo-like JPEG of size (W, H): shading at every scale from a third of the image down to
    8 px (octaves of enlarged noise, equal in amplitude: the 1/f spectrum of natural images), a
    dozen hard-edged shapes, and sensor-like noise (sd 2 levels). At 4032x3024 its file size
    (1.5 MB) and decode time match those of scikit-image's sample photos enlarged to that size with
    the same noise (1.1-1.9 MB, 55-65 ms on one core of an AMD EPYC)."""
    w, h = size
    g = torch.Generator().manual_seed(seed)
    small = (max(2, h // 8), max(2, w // 8))
    img = torch.zeros(1, 3, *small)
    cells = 3
    while cells <= min(small):
        field = torch.randn(1, 3, max(2, cells * h // w), cells, generator=g)
        img += 22 * F.interpolate(field, size=small, mode="bicubic", align_corners=False)
        cells *= 2
    img = F.interpolate(img, size=(h, w), mode="bicubic", align_corners=False)[0].permute(1, 2, 0) + 128
    base = Image.fromarray(img.clamp_(0, 255).to(torch.uint8).numpy())
    draw = ImageDraw.Draw(base)
    rng = np.random.default_rng(seed)
    for _ in range(12):
        x, y = rng.integers(0, w), rng.integers(0, h)
        r = rng.integers(max(1, min(w, h) // 30), max(2, min(w, h) // 6))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    pixels = torch.from_numpy(np.array(base)).float().add_(torch.randn(h, w, 3, generator=g), alpha=2.0)
    buf = io.BytesIO()
    Image.fromarray(pixels.add_(0.5).clamp_(0, 255).to(torch.uint8).numpy()).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


class Jpegs(Dataset):
    """Encoded JPEGs in memory, decoded on access as the image folders decode them (data.load_image):
    (uint8 (3, H, W), 0)."""

    def __init__(self, blobs):
        self.blobs = blobs

    def __len__(self):
        return len(self.blobs)

    def __getitem__(self, i):
        return augment.decode(self.blobs[i]), 0


def torchvision_pipeline(size=224):
    """The standard pipeline of the popular ports, per view."""
    from torchvision import transforms as T
    return T.Compose([
        T.RandomResizedCrop(size), T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8), T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(23, sigma=(0.1, 2.0))], p=0.5), T.ToTensor()])


# ----------------------------------------------------------------------------

def time_per_image(pipelines, blobs, rounds):
    """{name: thread CPU seconds per image} of each pipeline (name: (fn of an encoded image, views))
    on the same blobs, decoded each time: one warm-up call each, then `rounds` rounds in which every
    pipeline runs over all blobs in turn; medians. CPU time of this thread, not wall time: on a
    shared machine other processes would otherwise count against whichever pipeline runs while
    they do."""
    seconds = {name: [] for name in pipelines}
    for fn, _ in pipelines.values():
        fn(blobs[0])
    for _ in range(rounds):
        for name, (fn, _) in pipelines.items():
            t = time.thread_time()
            for blob in blobs:
                fn(blob)
            seconds[name].append((time.thread_time() - t) / len(blobs))
    return {name: statistics.median(s) for name, s in seconds.items()}


def view_rows(pipelines, per_image, decode):
    """Print and return one row per pipeline: ms, images/s and views/s per core, x the decode."""
    rows = {}
    for name, (_, views) in pipelines.items():
        ms = 1000 * per_image[name]
        rows[name] = {"ms_per_image": ms, "images_per_s": 1 / per_image[name],
                      "views_per_s": views / per_image[name] if views else None, "x_decode": per_image[name] / decode}
        rate = f"{views / per_image[name]:7.1f} views/s" if views else " " * 15
        print(f"  {name:45s} {ms:8.3f} ms  {1 / per_image[name]:7.1f} images/s {rate}   "
              f"{per_image[name] / decode:5.2f}x the decode")
    return rows


def pil_decode(blob):
    return Image.open(io.BytesIO(blob)).convert("RGB")  # what ImageFolder's default loader does


def bench_views(args):
    """Per image (two views), thread CPU time, one thread: the decode alone (the limit), the GPU
    path's CPU share (decode + two crop + flips: what --distort-on device workers do), whole views
    (--distort-on workers), and the torchvision pipeline, each on the same in-memory JPEGs; where
    the GPU path's time goes; the same on large photos with and without the scaled decode."""
    torch.set_num_threads(1)
    try:
        result = views_500x375(args)
        result["breakdown"] = views_breakdown(args)
        result["photos"] = {f"{w}x{h}": views_photos(args, (w, h)) for w, h in args.photo_sizes}
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    return result


def views_500x375(args):
    blobs = make_jpegs(args.view_images)
    standard, ours = torchvision_pipeline(224), SimCLRViews(224)
    scaled = SimCLRViews(224, scaled_decode=True)
    pipelines = {  # name: (what one image costs, views it makes)
        "decode, PIL (open + RGB)": (pil_decode, 0),
        "decode, torchvision decode_jpeg": (augment.decode, 0),
        "GPU path: decode + crop + flip": (ours.crops, 2),
        "GPU path, scaled decode on (folders' default)": (scaled.crops, 2),
        "GPU path from PIL: PIL decode + crop + flip": (lambda blob: ours.crops(pil_decode(blob)), 2),
        "CPU path: whole views": (ours, 2),
        "torchvision pipeline": (lambda blob: _two(standard, pil_decode(blob)), 2),  # one decode, two views
    }
    if args.views_baseline:  # another augment.py (e.g. an earlier commit's, on PIL images), in the same rounds
        spec = importlib.util.spec_from_file_location("augment_baseline", args.views_baseline)
        baseline = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(baseline)
        base_views = baseline.SimCLRViews(224)
        pipelines["baseline: whole views"] = (lambda blob: base_views(pil_decode(blob)), 2)
        pipelines["baseline: decode + crop + flip"] = (lambda blob: base_views.crops(pil_decode(blob)), 2)
    per_image = time_per_image(pipelines, blobs, args.rounds)
    decode = per_image["decode, torchvision decode_jpeg"]  # what the path below decodes with: the limit
    print(f"\n[views] per image (two 224 px views), one thread, thread CPU time, {len(blobs)} JPEGs of 500x375 "
          f"decoded each time, median of {args.rounds} interleaved rounds; per core = per CPU-second of one thread")
    rows = view_rows(pipelines, per_image, decode)
    tv, gpu, cpu = (per_image[k] for k in ("torchvision pipeline", "GPU path: decode + crop + flip", "CPU path: whole views"))
    result = {"per_image": rows, "ratio_ours_over_torchvision": tv / cpu, "ratio_crop_flip_over_torchvision": tv / gpu,
              "gpu_path_over_decode": gpu / decode, "gpu_path_over_pil_decode": gpu / per_image["decode, PIL (open + RGB)"]}
    print(f"  GPU path / decode: {gpu / decode:.2f}x (/ PIL's decode: {result['gpu_path_over_pil_decode']:.2f}x)")
    print(f"  ours / torchvision: {tv / cpu:.2f}x (whole views on the CPU)")
    print(f"  ours, crop + flip only / torchvision: {tv / gpu:.2f}x (the CPU work per view when the GPU distorts)")
    if args.views_baseline:
        result["ratio_ours_over_baseline"] = per_image["baseline: whole views"] / cpu
        result["ratio_crop_flip_over_baseline"] = per_image["baseline: decode + crop + flip"] / gpu
        print(f"  ours / baseline ({args.views_baseline}): whole views {result['ratio_ours_over_baseline']:.2f}x, "
              f"decode + crop + flip {result['ratio_crop_flip_over_baseline']:.2f}x")
    return result


def views_breakdown(args, size=224):
    """Where the GPU path's CPU time goes on the 500x375 JPEGs, part by part (each part timed alone
    on the same images and draws, interleaved rounds, medians): the decode; drawing the two boxes and
    flips; the copy of each crop (a view of the decoded image) into a contiguous channels-last
    tensor, which torch's AVX2 uint8 resize makes first; the resize kernel on those copies; the flip
    (one view in two on average); the collate (both views copied into the batch's rows, as
    data.collate does in a worker), none of which bench's GPU-path row includes."""
    blobs = make_jpegs(args.view_images)
    views = SimCLRViews(size)
    crop_flip = views.crop_flip
    hwcs = [augment.pixels(augment.decode(b)) for b in blobs]
    g = torch.Generator().manual_seed(0)
    draws = [[crop_flip.draw(*hwc.shape[:2], generator=g) for _ in range(2)] for hwc in hwcs]

    def crop_views(i):
        return [hwcs[i][t:t + h, l:l + w].unsqueeze(0).permute(0, 3, 1, 2) for (t, l, h, w), _ in draws[i]]

    copies = [[c.contiguous(memory_format=torch.channels_last) for c in crop_views(i)] for i in range(len(blobs))]
    resized = [[F.interpolate(c, size=(size, size), mode="bicubic", antialias=True) for c in cs] for cs in copies]
    outputs = [augment.resized_crop(hwcs[i], box, size, flip) for i in range(len(blobs)) for box, flip in draws[i]]
    index = list(range(len(blobs)))
    parts = {  # name: (fn of an image index, views)
        "decode (torchvision decode_jpeg)": (lambda i: augment.decode(blobs[i]), 0),
        "draw two boxes and flips": (lambda i: [crop_flip.draw(*hwcs[i].shape[:2], generator=g) for _ in range(2)], 0),
        "copy of each crop to channels-last": (lambda i: [c.contiguous(memory_format=torch.channels_last)
                                                           for c in crop_views(i)], 0),
        "resize kernel, two crops": (lambda i: [F.interpolate(c, size=(size, size), mode="bicubic", antialias=True)
                                                for c in copies[i]], 0),
        "flip (the views drawn flipped)": (lambda i: [r.flip(-1) for r, (_, flip) in zip(resized[i], draws[i]) if flip],
                                           0),
        "collate: two views into the batch": (lambda i: torch.stack([v.permute(1, 2, 0) for v in outputs[2 * i:2 * i + 2]]),
                                              0),
        "whole GPU path (decode + crop + flip)": (lambda i: views.crops(blobs[i], g), 0),
    }
    per_image = time_per_image(parts, index, args.rounds)
    decode = per_image["decode (torchvision decode_jpeg)"]
    print(f"\n[views] where the GPU path's time goes, per image, the same {len(blobs)} JPEGs of 500x375 (each part "
          f"alone, median of {args.rounds} interleaved rounds)")
    rows = {}
    for name in parts:
        rows[name] = {"ms_per_image": 1000 * per_image[name], "x_decode": per_image[name] / decode}
        print(f"  {name:45s} {1000 * per_image[name]:8.3f} ms   {per_image[name] / decode:5.2f}x the decode")
    crop_parts = sum(per_image[k] for k in list(parts)[1:5])
    print(f"  the crop parts together: {1000 * crop_parts:.3f} ms, {crop_parts / decode:.2f}x the decode "
          f"(the resize kernel alone {per_image['resize kernel, two crops'] / decode:.2f}x)")
    return {"per_image": rows, "crop_parts_over_decode": crop_parts / decode}


def views_photos(args, size):
    """The views rows on large photo-like JPEGs (make_photo), with and without the scaled decode."""
    t = time.perf_counter()
    blobs = [make_photo(size, seed=i) for i in range(args.photo_images)]
    made = time.perf_counter() - t
    standard, full, scaled = torchvision_pipeline(224), SimCLRViews(224), SimCLRViews(224, scaled_decode=True)
    pipelines = {
        "decode, PIL (open + RGB)": (pil_decode, 0),
        "decode, torchvision decode_jpeg": (augment.decode, 0),
        "GPU path: decode + crop + flip": (full.crops, 2),
        "GPU path, scaled decode": (scaled.crops, 2),
        "CPU path: whole views": (full, 2),
        "CPU path: whole views, scaled decode": (scaled, 2),
        "torchvision pipeline": (lambda blob: _two(standard, pil_decode(blob)), 2),
    }
    per_image = time_per_image(pipelines, blobs, args.rounds)
    decode = per_image["decode, torchvision decode_jpeg"]
    mb = sum(len(b) for b in blobs) / len(blobs) / 1e6
    print(f"\n[views] large photos: {len(blobs)} photo-like JPEGs of {size[0]}x{size[1]} ({mb:.2f} MB each, quality 90; "
          f"made in {made:.0f} s), per image, one thread, median of {args.rounds} interleaved rounds")
    rows = view_rows(pipelines, per_image, decode)
    gpu, gpu_scaled = per_image["GPU path: decode + crop + flip"], per_image["GPU path, scaled decode"]
    cpu, cpu_scaled = per_image["CPU path: whole views"], per_image["CPU path: whole views, scaled decode"]
    tv = per_image["torchvision pipeline"]
    result = {"per_image": rows, "mb_per_image": mb, "gpu_path_over_decode": gpu / decode,
              "gpu_path_scaled_over_decode": gpu_scaled / decode, "scaled_decode_speedup_gpu_path": gpu / gpu_scaled,
              "scaled_decode_speedup_whole_views": cpu / cpu_scaled, "ratio_crop_flip_scaled_over_torchvision": tv / gpu_scaled}
    print(f"  GPU path / decode: {gpu / decode:.2f}x, with the scaled decode {gpu_scaled / decode:.2f}x: "
          f"{gpu / gpu_scaled:.2f}x cheaper (whole views {cpu / cpu_scaled:.2f}x); torchvision's pipeline costs "
          f"{tv / gpu_scaled:.1f}x the scaled GPU path")
    return result


def _two(view, img):
    return view(img), view(img)


def simclr_model(arch, device, width=1, cifar_stem=False, activation_checkpointing=False):
    """SimCLR (encoder and the default head) on `device`, seeded, channels_last on CUDA as in pretrain.py."""
    torch.manual_seed(0)
    encoder = build_encoder(arch, width, cifar_stem, activation_checkpointing=activation_checkpointing)
    model = SimCLR(encoder, ProjectionHead(encoder.feature_dim)).to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


def step_setup(arch, image_size, device, activation_checkpointing=False, lr=0.1):
    """What pretrain.py's step needs on one device, as pretrain.py sets it up (channels_last and
    cuDNN autotuning on CUDA) -> (model, optimizer, settings, ctx, nonfinite record)."""
    cuda = device.type == "cuda"
    model = simclr_model(arch, device, cifar_stem=image_size <= 32,
                         activation_checkpointing=activation_checkpointing)
    if cuda:
        torch.backends.cudnn.benchmark = True
    optimizer = LARS([p for p in model.parameters() if p.requires_grad], lr=lr)
    settings = argparse.Namespace(distort_on="device", strength=1.0, blur=True, channels_last=cuda)
    ctx = Context(ddp=False, rank=0, world=1, local_rank=0, device=device)  # one process: the step's code reads device
    return model, optimizer, settings, ctx, torch.tensor([-1.0, 0.0], device=device)


def sync(device):
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def empty_cache(device):
    """Return the allocator's cached blocks of a CUDA device to the driver (no-op on the CPU)."""
    if device.type == "cuda":
        with torch.cuda.device(device):  # empty_cache takes no device: the current one, made this one
            torch.cuda.empty_cache()


def bench_step(args):
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    model, optimizer, settings, ctx, nonfinite = step_setup(args.arch, args.image_size, device)
    amp, scaler = AMP_DTYPES[args.amp], grad_scaler(args.amp, device)  # a loss scaler for fp16, as pretrain.py
    generator = torch.Generator()  # distortion parameters are drawn on the CPU

    def run(batches, distort_on):
        settings.distort_on = distort_on
        n = 0
        for i, ((x1, x2), *_) in enumerate(batches):
            if i == 3:  # warm-up: cudnn autotuning, worker start-up
                sync(device)
                t, n = time.perf_counter(), 0
            x = to_device_views(x1, x2, settings, device, generator, seed=i)
            train_step(model, optimizer, x, 0.1, amp, ctx, nonfinite, step=i, scaler=scaler)  # pretrain.py's step
            n += x1.shape[0]
            if i == args.steps + 2:
                break
        sync(device)
        return n / (time.perf_counter() - t)

    b, s = args.batch_size, args.image_size
    ceiling_batch = (torch.rand(b, 3, s, s, device=device), torch.rand(b, 3, s, s, device=device))
    results = {"(a) data on device (ceiling)": run(iter(lambda: (ceiling_batch, None), None), "workers")}
    blobs = make_jpegs(max(64, 2 * b), seed=1)
    views = SimCLRViews(s)
    for label, distort_on in (("(b) workers make whole views", "workers"), ("(c) workers crop, device distorts", "device")):
        dataset = data.SeededTransform(Jpegs(blobs * ((b * (args.steps + 4)) // len(blobs) + 1)),
                                       views if distort_on == "workers" else views.crops)
        loader = data.make_loader(dataset, b, train=True, workers=args.workers, pin_memory=cuda)
        results[label] = run(loader, distort_on)
        del loader
    print(f"\n[step] {args.arch}, {s} px, {b} images (x2 views) per step, {args.device}"
          f", amp {args.amp}{' + loss scaling' if scaler else ''}{', channels_last' if cuda else ''}, "
          f"{args.workers} workers, "
          f"{args.steps} timed steps after 3 warm-up")
    ceiling = results["(a) data on device (ceiling)"]
    for label, r in results.items():
        print(f"  {label:36s} {r:8.1f} images/s   {100 * r / ceiling:5.1f}% of (a)")
    c_over_b = results["(c) workers crop, device distorts"] / results["(b) workers make whole views"]
    print(f"  (c) / (b): {c_over_b:.2f}x")
    return {"images_per_s": results, "c_over_a": results["(c) workers crop, device distorts"] / ceiling,
            "c_over_b": c_over_b}


def broadcast_nt_xent(z1, z2, temperature):
    """The O(N^2 d) form of several ports: a (2N, 2N, d) broadcast inside cosine_similarity."""
    z = torch.cat([z1, z2])
    two_n = z.shape[0]
    sim = F.cosine_similarity(z.unsqueeze(1), z.unsqueeze(0), dim=2) / temperature
    sim = sim.masked_fill(torch.eye(two_n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = (torch.arange(two_n, device=z.device) + two_n // 2) % two_n
    return F.cross_entropy(sim, targets)


def _status_bytes(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def start_peak_rss():
    """Begin measuring this process's peak RSS from now -> baseline bytes. Linux resets the
    high-water mark (VmHWM) when 5 is written to clear_refs; elsewhere the lifetime peak
    (ru_maxrss) serves, which can hide a small step behind an earlier transient peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_bytes("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss():
    try:
        return _status_bytes("VmHWM")
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def in_fresh_process(code):
    """Run `code`, which prints numbers, in a new Python process in the repository -> the numbers;
    RuntimeError with its last line of stderr if it failed (one the kernel killed for memory leaves none)."""
    # Every allocation over 64 KiB gets its own mapping, returned when freed, so peak
    # RSS counts the live tensors (glibc otherwise reuses freed heap and hides them).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    if out.returncode:
        lines = out.stderr.strip().splitlines()
        raise RuntimeError(lines[-1][:200] if lines else f"the measuring process exited with status {out.returncode}")
    return [float(v) for v in out.stdout.split()]


def out_of_memory_row(fn, device):
    """fn() -> (its result, None), or (None, the error's first line) if it ran out of memory: on CUDA
    an out-of-memory error, on the CPU a fresh process that failed. Other errors propagate. The
    CUDA cache is emptied after either, so the next row starts from the same free memory."""
    result, error = None, None
    try:
        result = fn()
    except RuntimeError as e:  # torch.cuda.OutOfMemoryError is one
        if device.type == "cuda" and not is_out_of_memory(e):
            raise
        error = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    if device.type == "cuda":  # out here, where the exception no longer holds the failed row's tensors
        gc.collect()
        empty_cache(device)
    return result, error


def _loss_once(form, two_n, d, device):
    """Forward + backward of one loss form -> (seconds, peak bytes above the inputs). On CPU
    run it in a fresh process (in_fresh_process) so that peak RSS counts live tensors."""
    g = torch.Generator(device=device).manual_seed(0)
    z1 = torch.randn(two_n // 2, d, device=device, generator=g, requires_grad=True)
    z2 = torch.randn(two_n // 2, d, device=device, generator=g, requires_grad=True)
    fn = nt_xent if form == "ours" else broadcast_nt_xent
    fn(z1[:256], z2[:256], 0.1).backward()  # warm-up (threads, workspaces); the peak is measured from after it
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = start_peak_rss()
    t = time.perf_counter()
    fn(z1, z2, 0.1).backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = peak_rss() - base
    return time.perf_counter() - t, peak


# Peak memory of one forward + backward, in multiples of the form's largest tensor ((2N)^2 floats for
# ours, (2N)^2 d for the broadcast form, d = 128), as this section measures it on the CPU (peak RSS above
# the inputs in a fresh process, from the high-water mark reset after the warm-up):
# `python bench.py --only loss --loss-sizes 1024,1536,2048,4096,8192,16384`, torch 2.14, AMD EPYC
# (2 cores, CPU capability AVX512): ours 3.03x-3.32x for 2N = 2048..16384 (3.45x at 1536 and 3.71x at
# 1024, where fixed costs count); broadcast 6.03x at 2N = 1024, 1536 and 2048 (larger sizes do not
# fit that machine). The budget (80% of the free memory) takes them with about a sixth more; a row that
# runs out anyway is recorded as failed and the section goes on.
PEAK_OVER_LARGEST = {"ours": 4, "broadcast": 7}


def available_memory():
    """Bytes of memory a new process can take without swapping (Linux MemAvailable; else all of it)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def bench_loss(args):
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    d = 128
    if cuda:
        empty_cache(device)  # what earlier sections left cached counts as free
        budget = 0.8 * torch.cuda.mem_get_info(device)[0]
    else:
        budget = 0.8 * available_memory()
    print(f"\n[loss] nt_xent forward + backward, float32, d = {d}, {args.device}, one process; memory: peak above the"
          f" inputs ({'CUDA allocator' if cuda else 'peak RSS of a fresh process'}); budget {budget / 2**30:.0f} GiB")
    rows = []
    for two_n in args.loss_sizes:
        for form in ("ours", "broadcast"):
            shape = f"({two_n}, {two_n}{', ' + str(d) if form == 'broadcast' else ''})"
            largest = 4 * two_n * two_n * (d if form == "broadcast" else 1)
            need = PEAK_OVER_LARGEST[form] * largest
            if need > budget:
                rows.append({"2N": two_n, "form": form, "skipped": f"needs about {need / 2**30:.0f} GiB"})
                print(f"  2N = {two_n:6d} {form:9s}  skipped: its {shape} tensor alone is {largest / 2**30:.1f} GiB, "
                      f"about {need / 2**30:.0f} GiB with the rest of forward + backward")
                continue
            code = f"import bench, torch; print(*bench._loss_once({form!r}, {two_n}, {d}, torch.device('cpu')))"
            # on CPU in a fresh process, so that its peak RSS belongs to this measurement
            result, error = out_of_memory_row(lambda: _loss_once(form, two_n, d, device) if cuda
                                              else in_fresh_process(code), device)
            if error:
                rows.append({"2N": two_n, "form": form, "error": error})
                print(f"  2N = {two_n:6d} {form:9s}  failed: {error}")
                continue
            seconds, peak = result
            rows.append({"2N": two_n, "form": form, "seconds": seconds, "peak_bytes": peak,
                         "peak_over_largest": peak / largest})
            print(f"  2N = {two_n:6d} {form:9s}  {seconds * 1000:10.1f} ms   peak {peak / 2**30:8.3f} GiB"
                  f" = {peak / largest:4.2f}x its {shape} tensor")
    return {"loss": rows}


def activation_memory(arch, width, views, size, checkpointing, device="cpu", amp="off"):
    """Forward + backward of SimCLR on `views` random images, the encoder under autocast `amp`
    ("bf16", "fp16", "off") -> (seconds, peak bytes above the model, its gradients and the
    input). On CPU run it in a fresh process (activation_memory_in_fresh_process) so that
    peak RSS counts live tensors.

    fp16 runs without its loss scaler here: the scaler only multiplies the float32 loss (one
    number) before the backward pass, which changes neither the tensors kept nor the kernels
    run, and one that never takes an optimizer step would keep its first scale (2^16) and
    overflow where training's, having adapted, would not."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    model = simclr_model(arch, device, width, activation_checkpointing=checkpointing)
    x = torch.rand(views, 3, size, size, device=device)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)

    def step(batch):
        return forward_backward(model, batch, 0.1, amp=AMP_DTYPES[amp])

    step(x[:4])  # warm-up: one-time allocations (threads, workspaces) stay out of the peak
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = start_peak_rss()
    t = time.perf_counter()
    step(x)
    if cuda:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = peak_rss() - base
    return time.perf_counter() - t, peak


def activation_memory_in_fresh_process(arch, width, views, size, checkpointing, amp="off"):
    code = (f"import bench; s, p = bench.activation_memory({arch!r}, {width}, {views}, {size}, {checkpointing}, "
            f"amp={amp!r}); print(s, p)")
    seconds, peak = in_fresh_process(code)
    return seconds, peak


def checkpointing_step_times(arch, width, views, size, rounds, device, amp="off"):
    """Seconds of one forward + backward without and with activation checkpointing: one
    model, the two variants interleaved for `rounds` rounds -> medians {False: s, True: s}."""
    device = torch.device(device)
    model = simclr_model(arch, device, width)
    x = torch.rand(views, 3, size, size, device=device)
    times = {False: [], True: []}
    for r in range(rounds + 1):  # the first round warms up
        for checkpointing in (False, True):
            model.encoder.activation_checkpointing = checkpointing
            sync(device)
            t = time.perf_counter()
            forward_backward(model, x, 0.1, amp=AMP_DTYPES[amp])  # without fp16's scaler: see activation_memory
            sync(device)
            if r:
                times[checkpointing].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_memory(args):
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    print(f"\n[memory] {args.memory_arch} x{args.memory_width:g}, one forward + backward, {args.device}, amp {args.amp}"
          f"{', channels_last; CUDA allocator peak above the model' if cuda else '; peak RSS growth of a fresh process'}"
          f"; time: median of {args.memory_rounds} interleaved rounds in one process")
    rows = []
    for case in args.memory_cases.split(","):
        images, size = (int(v) for v in case.split("x"))
        row = {"images": images, "views": 2 * images, "size": size}
        for checkpointing in (False, True):
            key = "checkpointing" if checkpointing else "plain"
            measure = activation_memory if cuda else activation_memory_in_fresh_process
            extra = (args.device,) if cuda else ()
            result, error = out_of_memory_row(lambda: measure(args.memory_arch, args.memory_width, 2 * images, size,
                                                              checkpointing, *extra, amp=args.amp), device)
            if error:  # out of memory: a result too
                row[key] = {"error": error}
                print(f"  {images} images x 2 views, {size} px, checkpointing {checkpointing}: failed ({error})")
                continue
            row[key] = {"peak_bytes": result[1]}
            print(f"  {images} images x 2 views, {size} px, checkpointing {str(checkpointing):5s}: "
                  f"peak {result[1] / 2**30:7.2f} GiB")
        if "peak_bytes" in row["plain"] and "peak_bytes" in row["checkpointing"]:
            seconds, error = out_of_memory_row(
                lambda: checkpointing_step_times(args.memory_arch, args.memory_width, 2 * images, size,
                                                 args.memory_rounds, device, args.amp), device)
            if error:
                row["timing_error"] = error
                print(f"  -> timing both in one process failed ({error})")
            else:
                row["plain"]["seconds"], row["checkpointing"]["seconds"] = seconds[False], seconds[True]
                less = (row["plain"]["peak_bytes"] / row["checkpointing"]["peak_bytes"]
                        if row["checkpointing"]["peak_bytes"] else 0)
                print(f"  -> checkpointing: {f'{less:.2f}x less' if less else 'too small to compare'} "
                      f"activation memory, {seconds[True] / seconds[False]:.2f}x the time "
                      f"({seconds[False] * 1000:.0f} -> {seconds[True] * 1000:.0f} ms)")
        rows.append(row)
    return {"memory": rows}


def bench_epoch(args):
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    b = 512 if cuda else 64
    model, optimizer, settings, ctx, nonfinite = step_setup("resnet18", 32, device, lr=1.0)  # CIFAR stem at 32 px
    settings.distort_on, settings.strength, settings.blur = ("device" if cuda else "workers"), 0.5, False
    amp, scaler = AMP_DTYPES[args.amp], grad_scaler(args.amp, device)
    views = SimCLRViews(32, strength=0.5, blur=False)
    t_gen = time.perf_counter()
    raw = data.SyntheticImages(args.epoch_images, 32)
    t_gen = time.perf_counter() - t_gen
    dataset = data.SeededTransform(raw, views if settings.distort_on == "workers" else views.crops)
    loader = data.make_loader(dataset, b, train=True, workers=args.workers, pin_memory=cuda)
    generator = torch.Generator()  # distortion parameters are drawn on the CPU
    t = time.perf_counter()
    for i, ((x1, x2), *_) in enumerate(loader):
        x = to_device_views(x1, x2, settings, device, generator, seed=i)
        train_step(model, optimizer, x, 0.5, amp, ctx, nonfinite, step=i, scaler=scaler)  # pretrain.py's step
    sync(device)
    seconds = time.perf_counter() - t
    print(f"\n[epoch] ResNet-18 CIFAR stem, {args.epoch_images} generated 32 px images, batch {b}, "
          f"{args.device}, amp {args.amp}, distort on {settings.distort_on}, {args.workers} workers: {seconds:.1f} s "
          f"({len(loader) * b / seconds:.0f} images/s; generating the images took {t_gen:.1f} s)")
    return {"epoch_seconds": seconds, "epoch_images": args.epoch_images}


def cpu_model():
    """The CPU's model name (Linux /proc/cpuinfo, else what platform reports)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def write_json(path, results):
    """All numbers so far to `path`, through a temporary file: a run that stops leaves the last whole
    file; one that cannot write stops with one line (the numbers so far are printed above it)."""
    try:
        output.write_json(path, results, "--json")
    except output.WriteError as e:
        sys.exit(f"bench.py: error: {e}")


def main():
    args = get_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # anything that still uses the current GPU (pinned memory) uses this one
    args.amp, amp_text = resolve_amp(args.amp, device)  # "bf16", "fp16" (loss scaling in training) or "off"
    print(f"torch {torch.__version__}, device {args.device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, {amp_text}, "
          f"{os.cpu_count()} CPUs: {cpu_model()}, torch CPU capability {torch.backends.cpu.get_cpu_capability()}")
    results = {"args": vars(args)}
    sections = {"views": bench_views, "step": bench_step, "loss": bench_loss, "memory": bench_memory,
                "epoch": bench_epoch}
    names = args.only.split(",")
    for name in names:
        if name not in sections:
            sys.exit(f"bench.py: error: unknown section {name!r}; choose from {', '.join(sections)}")
    if args.json:  # before the long measurements: the folder made, a probe written there
        try:
            output.check_file(args.json, "--json")
        except output.WriteError as e:
            sys.exit(f"bench.py: error: {e}")
    failed = []
    for name in names:
        try:
            results[name] = sections[name](args)
        except Exception as e:  # the other sections' numbers still count: report this one and go on
            if not isinstance(e, data.DataError):  # bad input (too little /dev/shm): its one line says it all
                traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"}
            print(f"\n[{name}] failed: {results[name]['error']}")
            failed.append(name)
            gc.collect()
            empty_cache(device)
        if args.json:
            write_json(args.json, results)
    if failed:
        sys.exit(f"bench.py: section(s) {', '.join(failed)} failed; the others' numbers are above"
                 f"{' and in ' + args.json if args.json else ''}")


if __name__ == "__main__":
    main()
