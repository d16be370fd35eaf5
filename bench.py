"""Throughput benchmarks: the view pipeline, the pretraining step, the loss at large batch.

  python bench.py                          # CPU-sized defaults (this is what README reports)
  python bench.py --device cuda            # GPU: ResNet-50, 224 px, 256 images per step
  python bench.py --only views,loss        # some sections

Sections (every number of a section comes from one run, so ratios are fair on
a noisy machine):
  views  views/s per CPU core (one process, one thread) of the standard torchvision
         SimCLR pipeline (RandomResizedCrop, flip, ColorJitter p=0.8, grayscale p=0.2,
         23x23 GaussianBlur p=0.5, ToTensor) and of ours (augment.SimCLRViews: crop +
         flip in PIL, colour and separable blur as tensor ops), on the same in-memory
         JPEG images with decoding; repeats interleaved, medians, and the ratio. Time is
         the thread's CPU time, so other processes on a shared machine do not count.
         --views-baseline FILE adds the SimCLRViews of another augment.py (before/after).
  step   images/s of pretraining steps (pretrain.py's own step functions, LARS):
         (a) on batches already on the device: the ceiling; (b) with data workers
         making whole views (--distort-on workers); (c) with workers only decoding,
         cropping and flipping into uint8 and the batch distorted on the device
         (--distort-on device, the CUDA default).
  loss   time and peak memory of forward + backward of nt_xent (ours, O(N^2) memory)
         and of the broadcast form several ports use (cosine similarity of
         (2N, 1, d) against (1, 2N, d): O(N^2 d)), at several 2N with d = 128.
  memory activation memory of one forward + backward of SimCLR (ResNet-50, 128 views
         of 96 px on CPU; 224 px and 128 / 256 / 512 images per GPU on CUDA, bf16), without
         and with activation checkpointing (on CPU the peak RSS growth of a fresh process,
         on CUDA the allocator's peak above the model), and the time of each (medians of
         interleaved rounds in one process).
  epoch  seconds for one epoch of ResNet-18 (CIFAR stem) on generated 32 px images
         (50,000 on CUDA), the full pretrain.py data path.
"""
import argparse
import importlib.util
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

import data
from augment import SimCLRViews
from lars import LARS
from loss import nt_xent
from model import ProjectionHead, SimCLR, build_encoder
from distributed import Context
from pretrain import forward_backward, to_device_views, train_step


def get_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", default="views,step,loss,memory,epoch", help="comma-separated sections")
    p.add_argument("--arch", default=None, help="step section; default resnet50 on CUDA, resnet18 on CPU")
    p.add_argument("--image-size", type=int, default=None, help="step section; default 224 on CUDA, 64 on CPU")
    p.add_argument("--batch-size", type=int, default=None, help="images per step; default 256 on CUDA, 32 on CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant; default 30 on CUDA, 8 on CPU")
    p.add_argument("--workers", type=int, default=None, help="data workers for (b), (c); default: all CPUs, at most 16")
    p.add_argument("--view-images", type=int, default=48, help="JPEG images per round of the views section")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds of the views section")
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
    args.arch = args.arch or ("resnet50" if cuda else "resnet18")
    args.image_size = args.image_size or (224 if cuda else 64)
    args.batch_size = args.batch_size or (256 if cuda else 32)
    args.steps = args.steps or (30 if cuda else 8)
    args.workers = args.workers if args.workers is not None else min(16, os.cpu_count() or 1)
    args.loss_sizes = [int(v) for v in (args.loss_sizes or ("2048,8192,32768" if cuda else "2048,4096,8192,32768")).split(",")]
    args.epoch_images = args.epoch_images or (50_000 if cuda else 1024)
    args.memory_cases = args.memory_cases or ("128x224,256x224,512x224" if cuda else "64x96")
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


class Jpegs(Dataset):
    """Encoded JPEGs in memory, decoded on access: (PIL image, 0)."""

    def __init__(self, blobs):
        self.blobs = blobs

    def __len__(self):
        return len(self.blobs)

    def __getitem__(self, i):
        return Image.open(io.BytesIO(self.blobs[i])).convert("RGB"), 0


def torchvision_pipeline(size=224):
    """The standard pipeline of the popular ports, per view."""
    from torchvision import transforms as T
    return T.Compose([
        T.RandomResizedCrop(size), T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8), T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(23, sigma=(0.1, 2.0))], p=0.5), T.ToTensor()])


# ----------------------------------------------------------------------------

def bench_views(args):
    torch.set_num_threads(1)
    blobs = make_jpegs(args.view_images)
    standard, ours = torchvision_pipeline(224), SimCLRViews(224)
    pipelines = {"torchvision": lambda img: (standard(img), standard(img)), "ours": ours,
                 "ours, crop + flip only": ours.crops}
    if args.views_baseline:  # another augment.py (e.g. an earlier commit's), timed in the same rounds
        spec = importlib.util.spec_from_file_location("augment_baseline", args.views_baseline)
        baseline = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(baseline)
        pipelines["baseline"] = baseline.SimCLRViews(224)
        pipelines["baseline, crop + flip only"] = pipelines["baseline"].crops
    rates = {name: [] for name in pipelines}
    for name, fn in pipelines.items():  # warm-up
        fn(Image.open(io.BytesIO(blobs[0])).convert("RGB"))
    for _ in range(args.rounds):
        for name, fn in pipelines.items():
            # CPU time of this thread, not wall time: on a shared machine other processes would
            # otherwise count against whichever pipeline runs while they do
            t = time.thread_time()
            for blob in blobs:
                fn(Image.open(io.BytesIO(blob)).convert("RGB"))
            rates[name].append(2 * len(blobs) / (time.thread_time() - t))
    torch.set_num_threads(os.cpu_count() or 1)
    med = {name: statistics.median(r) for name, r in rates.items()}
    print(f"\n[views] per CPU core (views per CPU-second of one thread), 224 px, {len(blobs)} JPEGs of 500x375 "
          f"decoded each time, median of {args.rounds} interleaved rounds")
    for name, r in med.items():
        print(f"  {name:28s} {r:8.1f} views/s   (rounds: {', '.join(f'{x:.0f}' for x in rates[name])})")
    ratio = med["ours"] / med["torchvision"]
    crop_ratio = med["ours, crop + flip only"] / med["torchvision"]
    print(f"  ours / torchvision: {ratio:.2f}x")
    print(f"  ours, crop + flip only / torchvision: {crop_ratio:.2f}x (the CPU work per view when the GPU distorts)")
    result = {"views_per_s": med, "ratio_ours_over_torchvision": ratio, "ratio_crop_flip_over_torchvision": crop_ratio}
    if args.views_baseline:
        result["ratio_ours_over_baseline"] = med["ours"] / med["baseline"]
        print(f"  ours / baseline ({args.views_baseline}): {result['ratio_ours_over_baseline']:.2f}x")
    return result


def simclr_model(arch, device, width=1, cifar_stem=False, activation_checkpointing=False):
    """SimCLR (encoder and the default head) on `device`, seeded, channels_last on CUDA as in pretrain.py."""
    torch.manual_seed(0)
    encoder = build_encoder(arch, width, cifar_stem, activation_checkpointing=activation_checkpointing)
    model = SimCLR(encoder, ProjectionHead(encoder.feature_dim)).to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


def step_setup(arch, image_size, device, activation_checkpointing=False):
    """What pretrain.py's step needs on one device, as pretrain.py sets it up (channels_last and
    cuDNN autotuning on CUDA) -> (model, optimizer, settings, ctx, nonfinite record)."""
    cuda = device.type == "cuda"
    model = simclr_model(arch, device, cifar_stem=image_size <= 32,
                         activation_checkpointing=activation_checkpointing)
    if cuda:
        torch.backends.cudnn.benchmark = True
    optimizer = LARS([p for p in model.parameters() if p.requires_grad], lr=0.1)
    settings = argparse.Namespace(distort_on="device", strength=1.0, blur=True, channels_last=cuda)
    ctx = Context(ddp=False, rank=0, world=1, local_rank=0, device=device)
    return model, optimizer, settings, ctx, torch.tensor([-1.0, 0.0], device=device)


def bench_step(args):
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    model, optimizer, settings, ctx, nonfinite = step_setup(args.arch, args.image_size, device)
    generator = torch.Generator()  # distortion parameters are drawn on the CPU

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def run(batches, distort_on):
        settings.distort_on = distort_on
        n = 0
        for i, ((x1, x2), *_) in enumerate(batches):
            if i == 3:  # warm-up: cudnn autotuning, worker start-up
                sync()
                t, n = time.perf_counter(), 0
            x = to_device_views(x1, x2, settings, device, generator, seed=i)
            train_step(model, optimizer, x, 0.1, cuda, ctx, nonfinite, step=i)  # pretrain.py's step
            n += x1.shape[0]
            if i == args.steps + 2:
                break
        sync()
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
          f"{' bf16 autocast, channels_last' if cuda else ''}, {args.workers} workers, "
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


def _loss_once(form, two_n, d, device):
    """Forward + backward of one loss form -> (seconds, peak bytes above the inputs)."""
    g = torch.Generator(device=device).manual_seed(0)
    z1 = torch.randn(two_n // 2, d, device=device, generator=g, requires_grad=True)
    z2 = torch.randn(two_n // 2, d, device=device, generator=g, requires_grad=True)
    fn = nt_xent if form == "ours" else broadcast_nt_xent
    warm = min(256, two_n // 2)  # warm-up below full size: a full-size one would set the peak
    fn(z1[:warm], z2[:warm], 0.1).backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    fn(z1, z2, 0.1).backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return time.perf_counter() - t, peak


def bench_loss(args):
    device = torch.device(args.device)
    d = 128
    if device.type == "cuda":
        budget = 0.8 * torch.cuda.get_device_properties(device).total_memory
    else:
        budget = 0.6 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(f"\n[loss] nt_xent forward + backward, d = {d}, {args.device}, one process; memory: peak above the inputs"
          f" ({'CUDA allocator' if device.type == 'cuda' else 'peak RSS of a fresh process'})")
    rows = []
    for two_n in args.loss_sizes:
        for form in ("ours", "broadcast"):
            # forward + backward hold about three of the largest intermediate: (2N)^2 floats
            # for ours, (2N)^2 d for the broadcast form
            largest = 4 * two_n * two_n * (d if form == "broadcast" else 1)
            if 3 * largest > budget:
                rows.append({"2N": two_n, "form": form, "skipped": f"needs about {3 * largest / 2**30:.0f} GiB"})
                print(f"  2N = {two_n:6d} {form:9s}  skipped: its ({two_n}, {two_n}{', ' + str(d) if form == 'broadcast' else ''})"
                      f" tensor alone is {largest / 2**30:.1f} GiB, about {3 * largest / 2**30:.0f} GiB with its backward")
                continue
            if device.type == "cuda":
                seconds, peak = _loss_once(form, two_n, d, device)
            else:  # a fresh process per measurement, so peak RSS belongs to this measurement
                code = (f"import bench, torch; s, p = bench._loss_once({form!r}, {two_n}, {d}, torch.device('cpu')); "
                        "print(s, p)")
                # Every allocation over 64 KiB gets its own mapping, returned when freed, so peak
                # RSS counts the live tensors (glibc otherwise reuses freed heap and hides them).
                env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
                out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                     cwd=os.path.dirname(os.path.abspath(__file__)))
                if out.returncode:
                    rows.append({"2N": two_n, "form": form, "skipped": out.stderr.strip().splitlines()[-1][:200]})
                    print(f"  2N = {two_n:6d} {form:9s}  failed: {rows[-1]['skipped']}")
                    continue
                seconds, peak = (float(v) for v in out.stdout.split())
            rows.append({"2N": two_n, "form": form, "seconds": seconds, "peak_bytes": peak})
            print(f"  2N = {two_n:6d} {form:9s}  {seconds * 1000:10.1f} ms   peak {peak / 2**30:8.3f} GiB")
    return {"loss": rows}


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


def activation_memory(arch, width, views, size, checkpointing, device="cpu"):
    """Forward + backward of SimCLR on `views` random images -> (seconds, peak bytes above
    the model, its gradients and the input). On CPU run it in a fresh process with
    MALLOC_MMAP_THRESHOLD_ set (see bench_loss) so that peak RSS counts live tensors."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    model = simclr_model(arch, device, width, activation_checkpointing=checkpointing)
    x = torch.rand(views, 3, size, size, device=device)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)

    def step(batch):
        return forward_backward(model, batch, 0.1, amp=cuda)

    step(x[:4])  # warm-up: one-time allocations (threads, workspaces) stay out of the peak
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = start_peak_rss()
    t = time.perf_counter()
    step(x)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = peak_rss() - base
    return time.perf_counter() - t, peak


def activation_memory_in_fresh_process(arch, width, views, size, checkpointing):
    code = (f"import bench; s, p = bench.activation_memory({arch!r}, {width}, {views}, {size}, {checkpointing}); "
            "print(s, p)")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    seconds, peak = (float(v) for v in out.stdout.split())
    return seconds, peak


def checkpointing_step_times(arch, width, views, size, rounds, device):
    """Seconds of one forward + backward without and with activation checkpointing: one
    model, the two variants interleaved for `rounds` rounds -> medians {False: s, True: s}."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    model = simclr_model(arch, device, width)
    x = torch.rand(views, 3, size, size, device=device)
    times = {False: [], True: []}
    for r in range(rounds + 1):  # the first round warms up
        for checkpointing in (False, True):
            model.encoder.activation_checkpointing = checkpointing
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            forward_backward(model, x, 0.1, amp=cuda)
            if cuda:
                torch.cuda.synchronize()
            if r:
                times[checkpointing].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_memory(args):
    cuda = args.device.startswith("cuda")
    print(f"\n[memory] {args.memory_arch} x{args.memory_width:g}, one forward + backward, {args.device}"
          f"{' bf16 autocast, channels_last; CUDA allocator peak above the model' if cuda else '; peak RSS growth of a fresh process'}"
          f"; time: median of {args.memory_rounds} interleaved rounds in one process")
    rows = []
    for case in args.memory_cases.split(","):
        images, size = (int(v) for v in case.split("x"))
        row = {"images": images, "views": 2 * images, "size": size}
        for checkpointing in (False, True):
            key = "checkpointing" if checkpointing else "plain"
            try:
                if cuda:
                    _, peak = activation_memory(args.memory_arch, args.memory_width, 2 * images, size, checkpointing,
                                                args.device)
                    torch.cuda.empty_cache()
                else:
                    _, peak = activation_memory_in_fresh_process(args.memory_arch, args.memory_width, 2 * images,
                                                                 size, checkpointing)
            except (RuntimeError, subprocess.CalledProcessError) as e:  # out of memory: a result too
                row[key] = {"error": str(e).splitlines()[0][:120]}
                print(f"  {images} images x 2 views, {size} px, checkpointing {checkpointing}: failed ({row[key]['error']})")
                continue
            row[key] = {"peak_bytes": peak}
            print(f"  {images} images x 2 views, {size} px, checkpointing {str(checkpointing):5s}: peak {peak / 2**30:7.2f} GiB")
        if "peak_bytes" in row.get("plain", {}) and "peak_bytes" in row.get("checkpointing", {}):
            seconds = checkpointing_step_times(args.memory_arch, args.memory_width, 2 * images, size,
                                               args.memory_rounds, args.device)
            row["plain"]["seconds"], row["checkpointing"]["seconds"] = seconds[False], seconds[True]
            if cuda:
                torch.cuda.empty_cache()
            less = row["plain"]["peak_bytes"] / row["checkpointing"]["peak_bytes"] if row["checkpointing"]["peak_bytes"] else 0
            print(f"  -> checkpointing: {f'{less:.2f}x less' if less else 'too small to compare'} "
                  f"activation memory, {seconds[True] / seconds[False]:.2f}x the time "
                  f"({seconds[False] * 1000:.0f} -> {seconds[True] * 1000:.0f} ms)")
        rows.append(row)
    return {"memory": rows}


def bench_epoch(args):
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    b = 512 if cuda else 64
    model = simclr_model("resnet18", device, cifar_stem=True)
    if cuda:
        torch.backends.cudnn.benchmark = True
    optimizer = LARS([p for p in model.parameters() if p.requires_grad], lr=1.0)
    settings = argparse.Namespace(distort_on="device" if cuda else "workers", strength=0.5, blur=False,
                                  channels_last=cuda)
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
        optimizer.zero_grad(set_to_none=True)
        forward_backward(model, x, 0.5, amp=cuda)
        optimizer.step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    print(f"\n[epoch] ResNet-18 CIFAR stem, {args.epoch_images} generated 32 px images, batch {b}, "
          f"{args.device}, distort on {settings.distort_on}, {args.workers} workers: {seconds:.1f} s "
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


def main():
    args = get_args()
    print(f"torch {torch.__version__}, device {args.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if args.device.startswith('cuda') else ''}, "
          f"{os.cpu_count()} CPUs: {cpu_model()}, torch CPU capability {torch.backends.cpu.get_cpu_capability()}")
    results = {"args": vars(args)}
    sections = {"views": bench_views, "step": bench_step, "loss": bench_loss, "memory": bench_memory,
                "epoch": bench_epoch}
    for name in args.only.split(","):
        if name not in sections:
            sys.exit(f"bench.py: error: unknown section {name!r}; choose from {', '.join(sections)}")
        results[name] = sections[name](args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
