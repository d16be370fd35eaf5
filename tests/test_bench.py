"""bench.py runs every section on CPU at tiny sizes and reports its ratios; every CUDA call in it names
the chosen GPU; a row or a section that fails leaves the rest of the output and the JSON."""
import argparse
import ast
import importlib.util
import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, run_script

import bench


def test_bench_runs_on_cpu(tmp_path):
    result = run_script(["bench.py", "--device", "cpu", "--view-images", "2", "--rounds", "1", "--image-size", "32",
                         "--batch-size", "8", "--steps", "2", "--workers", "1", "--loss-sizes", "64,256",
                         "--epoch-images", "64", "--memory-cases", "2x32", "--memory-width", "0.25",
                         "--memory-rounds", "1", "--json", tmp_path / "bench.json",
                         "--views-baseline", ROOT + "/augment.py", "--photo-sizes", "160x120,96x64",
                         "--photo-images", "1"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    first = result.stdout.splitlines()[0]
    assert "torch CPU capability " in first and "amp: off" in first  # the machine and precision behind the numbers
    for text in ("ours / torchvision:", "crop + flip only / torchvision:", "ours / baseline (",
                 "the crop parts together:", "large photos: 1 photo-like JPEGs of 160x120",
                 "GPU path / decode: ", "with the scaled decode", "(a) data on device (ceiling)", "(c) / (b):",
                 "2N =    256 broadcast",
                 "[epoch] ResNet-18 CIFAR stem, 64 generated", "-> checkpointing:"):
        assert text in result.stdout, result.stdout
    results = json.loads((tmp_path / "bench.json").read_text())
    assert results["views"]["ratio_ours_over_torchvision"] > 0 and results["views"]["ratio_ours_over_baseline"] > 0
    assert set(results["views"]["photos"]) == {"160x120", "96x64"}
    assert results["views"]["photos"]["96x64"]["scaled_decode_speedup_gpu_path"] > 0
    assert results["views"]["breakdown"]["crop_parts_over_decode"] > 0
    assert {r["form"] for r in results["loss"]["loss"]} == {"ours", "broadcast"}
    assert all(r["peak_bytes"] >= 0 for r in results["loss"]["loss"])


@pytest.mark.skipif(not hasattr(torch.amp, "GradScaler"), reason="torch < 2.3 has no CPU GradScaler")
@pytest.mark.parametrize("section", ["step", "epoch"])
@pytest.mark.parametrize("amp,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16), ("off", None)])
def test_training_sections_pass_the_autocast_dtype_and_fp16s_loss_scaler(monkeypatch, section, amp, dtype):
    """What the step and epoch sections hand pretrain.py's train_step under each --amp: the dtype,
    and for fp16 one GradScaler for the whole run (its scale adapts from step to step). Recorded,
    not run: float16 and bfloat16 convolutions are slow on CPUs without native half-precision units
    (a 2-step fp16 step section takes minutes here); pretrain.py's tests cover the step itself."""
    seen = []

    def record(model, optimizer, x, temperature, amp, ctx, nonfinite, step, scaler=None):
        seen.append((amp, scaler))
        return torch.zeros(3), nonfinite

    monkeypatch.setattr(bench, "train_step", record)
    args = argparse.Namespace(device="cpu", arch="resnet18", image_size=32, batch_size=2, steps=1, workers=0,
                              epoch_images=64, amp=amp)
    (bench.bench_step if section == "step" else bench.bench_epoch)(args)
    assert seen and all(a is dtype for a, _ in seen)
    scalers = {id(s) for _, s in seen}
    if amp == "fp16":
        assert len(scalers) == 1 and isinstance(seen[0][1], torch.amp.GradScaler)
    else:
        assert all(s is None for _, s in seen)


def test_memory_section_measures_under_the_chosen_autocast(monkeypatch):
    codes, rounds = [], []
    monkeypatch.setattr(bench, "in_fresh_process", lambda code: codes.append(code) or [0.1, 1000.0])
    monkeypatch.setattr(bench, "checkpointing_step_times", lambda *a: rounds.append(a) or {False: 1.0, True: 1.3})
    args = argparse.Namespace(device="cpu", amp="bf16", memory_cases="2x32", memory_arch="resnet18",
                              memory_width=0.25, memory_rounds=1)
    rows = bench.bench_memory(args)["memory"]
    assert len(codes) == 2 and all("amp='bf16'" in c for c in codes)
    assert rounds and rounds[0][-1] == "bf16"
    assert rows[0]["plain"] == {"peak_bytes": 1000.0, "seconds": 1.0}


# The CUDA functions that act on one GPU: each must be told which (the current GPU is cuda:0 unless set).
PER_DEVICE = {"synchronize", "reset_peak_memory_stats", "memory_allocated", "max_memory_allocated",
              "memory_reserved", "max_memory_reserved", "mem_get_info", "get_device_name",
              "get_device_properties", "get_device_capability", "memory_stats", "set_device", "device"}
DEVICE_FREE = {"is_available", "current_device", "OutOfMemoryError"}  # current_device: to name "cuda" as cuda:N


def cuda_calls(path):
    """(function name, call node, the `with torch.cuda.device(...)` blocks around it) for every
    torch.cuda.NAME(...) call in the file."""
    found = []

    def visit(node, inside):
        if isinstance(node, ast.With) and any(ast.unparse(item.context_expr).startswith("torch.cuda.device(")
                                              for item in node.items):
            inside = inside + [node]
        if isinstance(node, ast.Call) and ast.unparse(node.func).startswith("torch.cuda."):
            found.append((ast.unparse(node.func)[len("torch.cuda."):], node, inside))
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    with open(path) as f:
        visit(ast.parse(f.read()), [])
    return found


@pytest.mark.parametrize("path", ["bench.py", "tools/profile_step.py"])
def test_every_cuda_call_names_the_device(path):
    """`--device cuda:1` must measure GPU 1: a torch.cuda call without a device (synchronize(),
    max_memory_allocated(), ...) acts on the current GPU instead. Read from the source, since
    this machine has no GPU to run them on."""
    calls = cuda_calls(f"{ROOT}/{path}")
    assert any(name == "synchronize" for name, _, _ in calls)  # the check sees the calls
    for name, node, inside in calls:
        where = f"{path}:{node.lineno}: torch.cuda.{name}"
        if name in DEVICE_FREE:
            continue
        if name == "empty_cache":  # takes no device: it must run with the chosen one made current
            assert inside, f"{where}() outside `with torch.cuda.device(device)`"
            continue
        assert name in PER_DEVICE, f"{where}: a CUDA call this test does not know; add it to one of the sets"
        args = node.args + [k.value for k in node.keywords if k.arg == "device"]
        assert args, f"{where}() without a device acts on the current GPU"
        assert not isinstance(args[0], ast.Constant), f"{where}({ast.unparse(args[0])}): a fixed GPU"


def test_bench_makes_the_chosen_gpu_current():
    main = next(n for n in ast.parse(open(f"{ROOT}/bench.py").read()).body
                if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert "torch.cuda.set_device(device)" in ast.unparse(main)


def loss_args(device, sizes):
    return argparse.Namespace(device=device, loss_sizes=sizes)


def test_loss_section_on_a_full_gpu_skips_what_cannot_fit_and_records_what_ran_out(monkeypatch):
    """The loss section as on a 139 GiB GPU (cuda:1), its CUDA calls stood in for: the broadcast
    form at 2N = 8192 ((8192, 8192, 128) float32 = 32 GiB, some 6x that at its peak) is skipped,
    one that runs out of memory anyway becomes a failed row, and the other rows still run."""
    calls = []
    current = []

    class Device:  # torch.cuda.device(d) as a context manager: which device is current
        def __init__(self, d):
            self.d = d

        def __enter__(self):
            current.append(self.d)

        def __exit__(self, *exc):
            current.pop()

    def fake_loss(form, two_n, d, device):
        calls.append(("measure", form, two_n, device))
        if (form, two_n) == ("broadcast", 4096):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return 0.01, 3.0 * 4 * two_n * two_n * (d if form == "broadcast" else 1)

    monkeypatch.setattr(bench, "_loss_once", fake_loss)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: calls.append(("mem_get_info", device))
                        or (139 * 2**30, 140 * 2**30))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(("empty_cache", list(current))))
    monkeypatch.setattr(torch.cuda, "device", Device)
    rows = bench.bench_loss(loss_args("cuda:1", [2048, 4096, 8192]))["loss"]
    gpu = torch.device("cuda:1")
    assert ("mem_get_info", gpu) in calls
    assert all(c[1] == [gpu] for c in calls if c[0] == "empty_cache")
    assert [(r["2N"], r["form"]) for r in rows] == [(n, f) for n in (2048, 4096, 8192) for f in ("ours", "broadcast")]
    by = {(r["2N"], r["form"]): r for r in rows}
    assert "out of memory" in by[4096, "broadcast"]["error"]
    assert "skipped" in by[8192, "broadcast"]
    assert all("peak_bytes" in by[k] for k in [(2048, "ours"), (2048, "broadcast"), (4096, "ours"), (8192, "ours")])
    assert all(c[3] == gpu for c in calls if c[0] == "measure")
    # each measured row is followed by emptying the cache, so a failed row leaves the next one its memory
    measured = [i for i, c in enumerate(calls) if c[0] == "measure"]
    assert all(calls[i + 1][0] == "empty_cache" for i in measured)


def test_loss_section_records_a_failed_fresh_process_and_goes_on(monkeypatch):
    def fresh(code):
        if "'broadcast', 256" in code:
            raise RuntimeError("the measuring process exited with status -9")
        return [0.01, 1000.0]

    monkeypatch.setattr(bench, "in_fresh_process", fresh)
    rows = bench.bench_loss(loss_args("cpu", [128, 256]))["loss"]
    assert [r.get("error") for r in rows] == [None, None, None, "the measuring process exited with status -9"]
    assert [r["peak_bytes"] for r in rows[:3]] == [1000.0] * 3


def test_a_failed_section_leaves_the_others_numbers_and_the_json(monkeypatch, tmp_path, capsys):
    def broken(args):
        raise ValueError("a bug in this section")

    monkeypatch.setattr(bench, "bench_views", broken)
    monkeypatch.setattr(bench, "bench_loss", lambda args: {"loss": [{"2N": 64, "form": "ours", "peak_bytes": 1}]})
    path = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv", ["bench.py", "--device", "cpu", "--only", "views,loss", "--json", str(path)])
    with pytest.raises(SystemExit) as stop:
        bench.main()
    assert "views" in str(stop.value)  # non-zero exit, naming the section
    results = json.loads(path.read_text())
    assert results["views"] == {"error": "ValueError: a bug in this section"}
    assert results["loss"]["loss"][0]["peak_bytes"] == 1
    assert "[views] failed: ValueError: a bug in this section" in capsys.readouterr().out


def test_profile_step_labels_every_part_and_compares_the_blur_forms(tmp_path):
    result = run_script(["tools/profile_step.py", "--device", "cpu", "--image-size", "48", "--batch-size", "8",
                         "--steps", "1", "--workers", "1", "--top", "5", "--blur-forms",
                         "--trace", tmp_path / "trace.json"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    parts = result.stdout.split("[parts]")[1].split("[operators]")[0]
    for name in ("loader wait", "copy + distortion", "jitter: hue", "grayscale", "blur", "forward", "loss",
                 "backward", "lars"):
        assert f"  {name} " in parts, parts
    assert "aten::" in result.stdout.split("[operators]")[1]
    gap = float(result.stdout.split("largest difference between the two: ")[1].split()[0])
    assert gap < 1e-6  # the two forms compute the same blur
    assert (tmp_path / "trace.json").stat().st_size > 1000


def test_profile_step_parts_take_the_cpu_ranges_and_every_thread_kernels():
    """A CUDA profile's structure, faked (no GPU here): each label has its CPU range (with a GPU annotation
    maybe linked to it as a "kernel") and a GPU annotation of its own (device CUDA, CPU time 0), and
    backward's kernels are launched by autograd's device thread. [parts] takes the CPU ranges and the
    kernels of every operator inside them, whichever thread; [operators] leaves the annotations out."""
    from torch.autograd import DeviceType
    path = os.path.join(ROOT, "tools", "profile_step.py")
    spec = importlib.util.spec_from_file_location("profile_step", path)
    profile_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile_step)

    def event(name, start, end, thread=1, device=DeviceType.CPU, kernels=(), annotation=False):
        return SimpleNamespace(name=name, key=name, time_range=SimpleNamespace(start=start, end=end), thread=thread,
                               device_type=device, is_async=False, is_user_annotation=annotation,
                               kernels=[SimpleNamespace(duration=d) for d in kernels])
    events = [event("forward", 0, 10, annotation=True, kernels=[9]), event("aten::conv", 1, 5, kernels=[3]),
              event("aten::relu", 6, 8, kernels=[1]), event("forward", 2, 30, device=DeviceType.CUDA, annotation=True),
              event("backward", 10, 40, annotation=True), event("aten::conv_backward", 12, 20, thread=2, kernels=[5, 2]),
              event("aten::mul", 21, 25, thread=2, kernels=[1]), event("aten::late", 39, 45, thread=2, kernels=[100]),
              event("forward", 50, 60, annotation=True), event("aten::conv", 51, 55, kernels=[4])]
    assert profile_step.part_times(events, ("forward", "backward", "lars")) == {"forward": (2, 20, 8),
                                                                              "backward": (1, 30, 8)}
    averages = [event("forward", 0, 1, annotation=True), event("forward", 0, 1, device=DeviceType.CUDA, annotation=True),
                event("aten::conv", 0, 1), event("void cudnn_kernel", 0, 1, device=DeviceType.CUDA)]
    assert profile_step.operators_only(averages) is averages
    assert [(e.name, e.device_type) for e in averages] == [("forward", DeviceType.CPU), ("aten::conv", DeviceType.CPU),
                                                          ("void cudnn_kernel", DeviceType.CUDA)]
