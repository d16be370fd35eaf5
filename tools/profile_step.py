"""Where the time of a pretraining step goes: torch.profiler over pretrain.py's step (c), data
workers decoding, cropping and flipping JPEGs, the batch copied and distorted on the device.

    python tools/profile_step.py --device cuda --workers 16                  # ResNet-50, 224 px, 256 images
    python tools/profile_step.py --device cuda --batch-size 512 --trace t.json   # + a Chrome trace
    python tools/profile_step.py --device cuda --blur-forms                  # + the blur's two forms timed

Prints, per step: (1) the step's parts, labelled without changing the code they time (the
functions are wrapped here): waiting for the loader, the copy and distortion (inside it the
four jitter operations, grayscale and blur), the forward pass, the loss, the backward pass,
LARS; CPU time, and on CUDA the GPU time of the kernels each part launched; (2) the top
operators by their own device time (CPU time on the CPU). --blur-forms times the separable
blur as augment.py runs it (a grouped 1-D convolution with one group per image row) against
a depthwise 2-D convolution with one channel per image channel, on the same batch, and
checks that they agree.
"""
import argparse
import bisect
import functools
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import augment  # noqa: E402
import data  # noqa: E402
import pretrain  # noqa: E402
from augment import SimCLRViews  # noqa: E402
from bench import Jpegs, make_jpegs, step_setup  # noqa: E402
from distributed import AMP_DTYPES, grad_scaler, resolve_amp  # noqa: E402

PARTS = ("loader wait", "copy + distortion", "jitter", "jitter: brightness", "jitter: contrast",
         "jitter: saturation", "jitter: hue", "grayscale", "blur", "forward", "loss", "backward", "lars")


def get_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", default=None, help="default resnet50 on CUDA, resnet18 on CPU")
    p.add_argument("--image-size", type=int, default=None, help="default 224 on CUDA, 64 on CPU")
    p.add_argument("--batch-size", type=int, default=None, help="images per step; default 256 on CUDA, 16 on CPU")
    p.add_argument("--steps", type=int, default=5, help="profiled steps, after 3 warm-up steps")
    p.add_argument("--workers", type=int, default=None, help="data workers; default: all CPUs, at most 16")
    p.add_argument("--top", type=int, default=20, help="operators listed")
    p.add_argument("--trace", default=None, help="also write a Chrome trace (chrome://tracing, Perfetto) here")
    p.add_argument("--blur-forms", action="store_true", help="also time the blur's two forms")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    args.arch = args.arch or ("resnet50" if cuda else "resnet18")
    args.image_size = args.image_size or (224 if cuda else 64)
    args.batch_size = args.batch_size or (256 if cuda else 16)
    args.workers = min(os.cpu_count() or 1, 16) if args.workers is None else args.workers
    return args


def labelled(fn, name):
    """fn, its calls marked as `name` in the profile."""
    @functools.wraps(fn)
    def wrapper(*a, **k):
        with record_function(name):
            return fn(*a, **k)
    return wrapper


def label_the_parts(model, optimizer):
    """Wrap the functions the step calls, so that each part shows in the profile by name."""
    augment.JITTER_OPS = tuple(labelled(op, f"jitter: {name}") for op, name in
                               zip(augment.JITTER_OPS, ("brightness", "contrast", "saturation", "hue")))
    augment.color_jitter = labelled(augment.color_jitter, "jitter")
    augment.to_grayscale = labelled(augment.to_grayscale, "grayscale")
    augment.gaussian_blur = labelled(augment.gaussian_blur, "blur")
    pretrain.contrastive_logits = labelled(pretrain.contrastive_logits, "loss")
    torch.autograd.backward = labelled(torch.autograd.backward, "backward")
    model.forward = labelled(model.forward, "forward")
    optimizer.step = labelled(optimizer.step, "lars")
    return labelled(pretrain.to_device_views, "copy + distortion")


def part_times(events, names):
    """{name: (calls, CPU microseconds, GPU microseconds)} of the labelled parts, from the profile's
    events: each part's CPU ranges, and the kernels launched inside them from any thread. (Not the
    averages by name: with CUDA activities each label has a second entry there, its GPU annotation,
    pytorch/pytorch#144613, with no CPU time and its device time the span from its first kernel to
    its last, idle gaps included; and the backward pass's kernels are launched by autograd's own
    thread for the device, outside the calling thread's "backward" range but inside its time.)
    Each kernel is recorded on the one operator that launched it; a range (record_function, ours or
    torch's) launches none, and what may be recorded on it is its GPU annotation, not counted."""
    ops = sorted((e for e in events if e.device_type == DeviceType.CPU and not e.is_async),
                 key=lambda e: e.time_range.start)
    starts = [e.time_range.start for e in ops]
    out = {}
    for e in ops:
        if e.name in names:
            start, end = e.time_range.start, e.time_range.end
            inside = ops[bisect.bisect_left(starts, start):bisect.bisect_right(starts, end)]
            gpu = sum(k.duration for op in inside
                      if op.time_range.end <= end and not getattr(op, "is_user_annotation", False) for k in op.kernels)
            calls, cpu, device = out.get(e.name, (0, 0.0, 0.0))
            out[e.name] = (calls + 1, cpu + (end - start), device + gpu)
    return out


def operators_only(averages):
    """The averages without the labels' GPU annotations, whose "self" device time is their whole
    span: they would head a table sorted by it. Filtered in place, so that the list keeps what
    EventList.table reads from it."""
    averages[:] = [e for e in averages
                   if not (getattr(e, "is_user_annotation", False) and e.device_type != DeviceType.CPU)]
    return averages


def blur_depthwise(x, sigma, kernel_size):
    """augment.gaussian_blur as two depthwise 2-D convolutions (one channel per image channel,
    kernels (1, K) then (K, 1)): the candidate for the GPU, where the row-grouped form's hundreds
    of thousands of groups may suit the convolution kernels badly."""
    kernel = augment.blur_kernels(sigma, kernel_size, x.device, x.dtype)
    if kernel is None:
        return x
    radius = kernel.shape[1] // 2
    b, c, h, w = x.shape
    kernel = kernel.repeat_interleave(c, dim=0)  # (B C, K)
    planes = F.pad(x.reshape(1, b * c, h, w), (radius, radius, 0, 0), mode="reflect")
    planes = F.conv2d(planes, kernel.view(b * c, 1, 1, -1), groups=b * c)
    planes = F.pad(planes, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(planes, kernel.view(b * c, 1, -1, 1), groups=b * c).view(b, c, h, w)


def time_blur_forms(args, device, sync):
    """Median time of each blur form on one batch of the profiled size (both views), and their gap."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2 * args.batch_size, 3, args.image_size, args.image_size, generator=g).to(device)
    sigma = 0.1 + 1.9 * torch.rand(x.shape[0], generator=g)
    k = augment.blur_kernel_size(args.image_size)
    forms = {"row-grouped conv1d (augment.py)": augment.gaussian_blur, "depthwise conv2d": blur_depthwise}
    out, times = {}, {name: [] for name in forms}
    for _ in range(5):  # interleaved rounds; the first is warm-up (cuDNN autotuning)
        for name, fn in forms.items():
            sync()
            t = time.perf_counter()
            out[name] = fn(x, sigma, k)
            sync()
            times[name].append(time.perf_counter() - t)
    gap = float((out["depthwise conv2d"] - out["row-grouped conv1d (augment.py)"]).abs().max())
    print(f"\n[blur] {x.shape[0]} images of {args.image_size} px, {k} taps at most, {device}; medians of 4 rounds")
    for name, ts in times.items():
        print(f"  {name:34s} {1e3 * sorted(ts[1:])[len(ts[1:]) // 2]:8.2f} ms")
    print(f"  largest difference between the two: {gap:.2e}")


def main():
    args = get_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and device.index is not None:
        # --device cuda:1: pinned buffers, the caching allocator and index-less calls follow the current device
        torch.cuda.set_device(device)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    # pretrain.py's default --amp: bf16 on GPUs of compute capability >= 8.0, fp16 with loss scaling below, off on CPU
    precision, amp_text = resolve_amp("auto", device)
    amp, scaler = AMP_DTYPES[precision], grad_scaler(precision, device)
    model, optimizer, settings, ctx, nonfinite = step_setup(args.arch, args.image_size, device)
    generator = torch.Generator()
    views = SimCLRViews(args.image_size)
    blobs = make_jpegs(max(64, 2 * args.batch_size), seed=1)
    steps = 3 + args.steps
    dataset = data.SeededTransform(Jpegs(blobs * (args.batch_size * steps // len(blobs) + 1)), views.crops)
    try:  # make_loader checks that /dev/shm holds what the workers hand over
        batches = iter(data.make_loader(dataset, args.batch_size, train=True, workers=args.workers, pin_memory=cuda))
    except data.DataError as e:
        sys.exit(f"profile_step.py: error: {e}")
    to_device_views = label_the_parts(model, optimizer)

    def step(i):
        with record_function("loader wait"):
            (x1, x2), *_ = next(batches)
        x = to_device_views(x1, x2, settings, device, generator, seed=i)
        return pretrain.train_step(model, optimizer, x, 0.1, amp, ctx, nonfinite, step=i, scaler=scaler)

    for i in range(3):  # warm-up: cuDNN autotuning, worker start-up
        step(i)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t = time.perf_counter()
    with profile(activities=activities) as prof:
        for i in range(3, steps):
            step(i)
        sync()
    seconds = (time.perf_counter() - t) / args.steps
    if args.trace:
        prof.export_chrome_trace(args.trace)

    parts = part_times(prof.events(), PARTS)
    print(f"torch {torch.__version__}, {device}{' (' + torch.cuda.get_device_name(device) + ')' if cuda else ''}, "
          f"{amp_text}, "
          f"{args.arch}, {args.image_size} px, {args.batch_size} images (x2 views) per step, {args.workers} workers, "
          f"{args.steps} profiled steps: {1e3 * seconds:.1f} ms per step under the profiler, "
          f"{args.batch_size / seconds:.0f} images/s")
    print(f"\n[parts] per step{', GPU time of the kernels each launched' if cuda else ''} (nested parts "
          "are inside the one above them)")
    for name in PARTS:
        if name in parts:
            calls, cpu_us, gpu_us = parts[name]
            gpu = f"   GPU {gpu_us / 1e3 / args.steps:8.2f} ms" if cuda else ""
            print(f"  {name:22s} CPU {cpu_us / 1e3 / args.steps:8.2f} ms{gpu}   {calls // args.steps:4d} calls")
    averages = operators_only(prof.key_averages())  # (grouping every event by name: done once)
    sort = ("self_device_time_total" if hasattr(averages[0], "self_device_time_total")
            else "self_cuda_time_total") if cuda else "self_cpu_time_total"
    print(f"\n[operators] top {args.top} by {sort}, over {args.steps} steps")
    print(averages.table(sort_by=sort, row_limit=args.top, max_name_column_width=48))
    if args.blur_forms:
        time_blur_forms(args, device, sync)


if __name__ == "__main__":
    main()
