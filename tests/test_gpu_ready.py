"""What a first GPU run meets, checked on the CPU: the precision --amp picks for each GPU
generation (patched capabilities), fp16 with dynamic loss scaling (an overflow step
skipped on the device, the scaler's state resumed exactly), the GPU a process takes when
each sees one (SLURM --gpus-per-task=1), TF32 only where it is only speed, the GPU memory
features may use, cuDNN/cuBLAS allocation failures as out of memory, /dev/shm too small for
the data workers, the CPUs a process may use, and rank 0's slow preparation outliving the
collective timeout."""
import contextlib
import json
import os
import types

import pytest
import torch

import data
import distributed
import features
import pretrain
from conftest import TINY, run_script
from lars import LARS
from model import ProjectionHead, SimCLR, build_encoder

# ----------------------------------------------------------------------------
# --amp


def fake_gpu(monkeypatch, name, capability, bf16_emulated=True):
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())  # (one GPU: always current)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: capability[0] >= 8 or bf16_emulated)


@pytest.mark.parametrize("name,capability,precision,text", [
    ("Tesla V100-SXM2-32GB", (7, 0), "fp16", "amp: fp16 + loss scaling (Tesla V100-SXM2-32GB, compute capability 7.0, no bf16)"),
    ("Tesla T4", (7, 5), "fp16", "amp: fp16 + loss scaling (Tesla T4, compute capability 7.5, no bf16)"),
    ("NVIDIA A100-SXM4-40GB", (8, 0), "bf16", "amp: bf16 (NVIDIA A100-SXM4-40GB, compute capability 8.0)"),
    ("NVIDIA H100 80GB HBM3", (9, 0), "bf16", "amp: bf16 (NVIDIA H100 80GB HBM3, compute capability 9.0)"),
])
def test_auto_picks_the_precision_the_gpu_has(monkeypatch, name, capability, precision, text):
    fake_gpu(monkeypatch, name, capability)
    assert distributed.resolve_amp("auto", torch.device("cuda", 0)) == (precision, text)
    assert distributed.resolve_amp("off", torch.device("cuda", 0))[0] == "off"
    assert distributed.resolve_amp("fp16", torch.device("cuda", 0))[0] == "fp16"
    # evaluation runs the network forward only: no loss scaling to speak of
    assert "loss scaling" not in distributed.resolve_amp("auto", torch.device("cuda", 0), train=False)[1]


def test_bf16_asked_on_a_gpu_without_it(monkeypatch, capsys):
    fake_gpu(monkeypatch, "Tesla T4", (7, 5), bf16_emulated=True)  # torch >= 2.4 emulates it
    precision, text = distributed.resolve_amp("bf16", torch.device("cuda", 0))
    assert precision == "bf16" and "emulated, slow" in text and "--amp fp16" in text
    fake_gpu(monkeypatch, "Tesla T4", (7, 5), bf16_emulated=False)  # torch 2.1-2.3 stop at the first step
    with pytest.raises(SystemExit) as e:
        distributed.resolve_amp("bf16", torch.device("cuda", 0))
    assert e.value.code == 2
    assert "has no bf16" in capsys.readouterr().err


def test_the_cpu_runs_float32_unless_asked(monkeypatch, capsys):
    cpu = torch.device("cpu")
    assert distributed.resolve_amp("auto", cpu)[0] == "off"
    assert distributed.resolve_amp("bf16", cpu) == ("bf16", "amp: bf16 on the CPU (CPU autocast)")
    monkeypatch.setattr(distributed, "cpu_fp16_available", lambda: False)  # torch without CPU fp16
    with pytest.raises(SystemExit):
        distributed.resolve_amp("fp16", cpu)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "torch 2.4" in err and "--amp bf16" in err


def test_amp_flags():
    args = pretrain.get_args(["--dataset", "synthetic"])
    assert args.amp == "auto"
    assert pretrain.get_args(["--dataset", "synthetic", "--no-amp"]).amp == "off"
    assert pretrain.get_args(["--dataset", "synthetic", "--amp"]).amp == "auto"  # the old on/off flag still parses
    assert pretrain.get_args(["--dataset", "synthetic", "--amp", "fp16"]).amp == "fp16"
    with pytest.raises(SystemExit):
        pretrain.get_args(["--dataset", "synthetic", "--amp", "fp8"])


needs_cpu_fp16 = pytest.mark.skipif(not distributed.cpu_fp16_available(), reason="this torch has no CPU fp16 autocast")


@needs_cpu_fp16
def test_an_overflow_step_changes_nothing_and_lowers_the_scale():
    device = torch.device("cpu")
    torch.manual_seed(0)
    encoder = build_encoder("resnet18", 0.25, cifar_stem=True)
    model = SimCLR(encoder, ProjectionHead(encoder.feature_dim))
    optimizer = LARS(model.parameters(), lr=0.1)
    ctx, nonfinite = distributed.Context(False, 0, 1, 0, device), torch.tensor([-1.0, 0.0])
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)  # what distributed.grad_scaler makes, at a safe start
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    stats, nonfinite = pretrain.train_step(model, optimizer, x, 0.5, torch.float16, ctx, nonfinite, 0, scaler)
    assert stats[2] == 0 and scaler.get_scale() == 256.0  # a clean step: momentum buffers now hold something
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = {p: optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters() if p in optimizer.state}
    assert len(buffers) > 50
    scaler.update(new_scale=2.0 ** 100)  # fp16 gradients of a loss scaled by 2^100 overflow
    stats, nonfinite = pretrain.train_step(model, optimizer, x, 0.5, torch.float16, ctx, nonfinite, 1, scaler)
    assert stats[2] == 1 and torch.isfinite(stats[0])  # an overflow, but the float32 loss is fine
    assert nonfinite[0] == -1  # not counted as a non-finite loss
    assert scaler.get_scale() == 2.0 ** 99
    # The weights, BN running statistics aside (the forward pass ran), and the momentum are untouched
    for k, v in model.state_dict().items():
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(v, weights[k]), k
    assert all(torch.equal(optimizer.state[p]["momentum_buffer"], b) for p, b in buffers.items())


def test_gradients_finite_sees_one_bad_element():
    p = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    optimizer = LARS(p, lr=0.1)
    p[0].grad, p[1].grad = torch.full((3,), 3e38), torch.ones(2, 2)  # huge but finite: a 2-norm would overflow
    assert pretrain.gradients_finite(optimizer)
    for bad in (float("inf"), float("-inf"), float("nan")):
        p[1].grad = torch.ones(2, 2)
        p[1].grad[1, 0] = bad
        assert not pretrain.gradients_finite(optimizer)


def read(path):
    return torch.load(path, weights_only=True)


@needs_cpu_fp16
def test_fp16_pretraining_resumes_exactly_with_its_scaler(run, tmp_path):
    """fp16 on the CPU as a T4 user runs it (loss scaling, the same code path): two epochs
    straight, and one epoch then --resume, give the same weights and scaler state bit for bit."""
    small = [*TINY, "--synthetic-size", "32", "--image-size", "16", "--knn-every", "0"]  # CPU fp16 is slow
    flags = [*small, "--amp", "fp16"]
    straight = run("pretrain.py", *flags, "--epochs", "2", "--out", "straight")
    assert "amp: fp16 + loss scaling on the CPU" in straight.stdout and " scale 65536 " in straight.stdout
    run("pretrain.py", *flags, "--epochs", "1", "--out", "resumed")
    assert read(tmp_path / "resumed" / "ckpt.pt")["scaler"]["scale"] in (2.0 ** 16, 2.0 ** 15, 2.0 ** 14)
    run("pretrain.py", *flags, "--epochs", "2", "--out", "resumed", "--resume")
    a, b = read(tmp_path / "straight" / "ckpt.pt"), read(tmp_path / "resumed" / "ckpt.pt")
    assert a["scaler"] == b["scaler"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    logs = [[json.loads(line) for line in open(tmp_path / out / "log.jsonl")] for out in ("straight", "resumed")]
    assert logs[0] == [{**r, "epoch_time_s": logs[0][i]["epoch_time_s"], "images_per_s": logs[0][i]["images_per_s"]}
                       for i, r in enumerate(logs[1])]
    # Each overflow halved the scale (four steps are too few to double it), and nothing else did
    overflows = sum(r["overflow_steps"] for r in logs[0])
    assert a["scaler"]["scale"] == 2.0 ** (16 - overflows) == logs[0][-1]["loss_scale"]
    # A float32 checkpoint continued in fp16: a fresh scaler, said once
    run("pretrain.py", *small, "--epochs", "1", "--out", "plain")
    result = run("pretrain.py", *flags, "--epochs", "2", "--out", "plain", "--resume")
    assert "holds no fp16 loss-scaler state; the scaler starts afresh" in result.stdout
    assert read(tmp_path / "plain" / "ckpt.pt")["scaler"]["growth_interval"] == 2000


@needs_cpu_fp16
def test_fp16_finetune_and_bf16_linear_eval_run(run, tmp_path):
    run("pretrain.py", *TINY, "--synthetic-size", "32", "--image-size", "16", "--knn-every", "0", "--epochs", "1",
        "--out", "out")
    result = run("finetune.py", "out/encoder.pt", "--amp", "fp16", "--epochs", "1", "--label-fraction", "0.5",
                 "--workers", "0")
    assert "amp: fp16 + loss scaling on the CPU" in result.stdout
    result = run("linear_eval.py", "out/encoder.pt", "--amp", "bf16", "--epochs", "1", "--workers", "0")
    assert "amp: bf16 on the CPU" in result.stdout and "top-1 accuracy" in result.stdout


# ----------------------------------------------------------------------------
# Launch and set-up


def test_the_gpu_a_process_takes(capsys):
    assert distributed.gpu_index(3, 8) == 3  # torchrun: every process sees the node's GPUs
    assert distributed.gpu_index(0, 1) == 0
    assert distributed.gpu_index(5, 1) == 0  # srun --gpus-per-task=1: one GPU each, LOCAL_RANK up to 7
    with pytest.raises(SystemExit):
        distributed.gpu_index(5, 2)  # ambiguous: say so
    assert "LOCAL_RANK is 5 but this process sees 2 GPUs" in capsys.readouterr().err


def test_setup_on_a_gpu_keeps_matmuls_float32(monkeypatch):
    """setup() on a (patched) one-GPU process with LOCAL_RANK 6: device cuda:0; TF32 for
    convolutions only."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "6")  # read only under torchrun (RANK set); not here
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = True  # as a copied snippet may leave it
    try:
        ctx = distributed.setup()
        assert ctx.device == torch.device("cuda", 0)
        assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is True
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = flags


def test_compile_is_refused_for_several_gpu_processes(capsys):
    args = types.SimpleNamespace(compile=True)
    pretrain.check_compile(args, types.SimpleNamespace(ddp=False, world=1, cuda=True))  # one GPU process: fine
    pretrain.check_compile(args, types.SimpleNamespace(ddp=True, world=1, cuda=True))  # torchrun --nproc_per_node=1
    pretrain.check_compile(args, types.SimpleNamespace(ddp=True, world=2, cuda=False))  # CPU processes: fine
    with pytest.raises(SystemExit):
        pretrain.check_compile(args, types.SimpleNamespace(ddp=True, world=2, cuda=True))
    assert "drop --compile, or use --compile with one process" in capsys.readouterr().err


@pytest.mark.parametrize("text", [
    "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported",
    "CUDA out of memory. Tried to allocate 2.00 GiB",
])
def test_library_allocation_failures_are_out_of_memory(text):
    assert pretrain.is_out_of_memory(RuntimeError(text))
    assert not pretrain.is_out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_BAD_PARAM"))
    assert not pretrain.is_out_of_memory(ValueError(text))


def test_too_little_shared_memory_is_one_line(monkeypatch, tmp_path):
    free = {"bytes": 64 * 2**20}  # a default Docker container
    monkeypatch.setattr(os, "statvfs", lambda path: types.SimpleNamespace(f_bavail=free["bytes"] // 4096, f_frsize=4096))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    batch = 2 * 512 * 3 * 224 * 224  # ImageNet defaults on 8 GPUs: 512 images x 2 uint8 crops per rank
    with pytest.raises(data.DataError) as e:
        data.check_shared_memory(8, batch, path=str(tmp_path))
    text = str(e.value)
    assert "64 MiB free" in text and "--shm-size=" in text and "--workers 0" in text and "\n" not in text
    data.check_shared_memory(0, batch, path=str(tmp_path))  # no workers: no shared memory
    # 8 processes x (8 workers x 2 prefetched + the 2 the training loop may hold, unless pinned away)
    free["bytes"] = 8 * (8 * 2 + 2) * batch
    data.check_shared_memory(8, batch, path=str(tmp_path))
    free["bytes"] -= 1
    with pytest.raises(data.DataError):
        data.check_shared_memory(8, batch, path=str(tmp_path))
    free["bytes"] = 8 * 8 * 2 * batch
    data.check_shared_memory(8, batch, path=str(tmp_path), pinned=True)
    data.check_shared_memory(8, batch, path=str(tmp_path / "absent"))  # no /dev/shm: nothing to check


def test_workers_count_the_cpus_this_process_may_use(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 128)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert data.default_workers() == 6
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert data.default_workers() == 3


def test_features_count_the_allocators_cached_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 60 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 * 2**30)
    assert features.free_gpu_memory(torch.device("cuda", 0)) == 59 * 2**30


@pytest.mark.parametrize("slow", ["rank0", "rank1"])
def test_a_preparation_longer_than_the_collective_timeout(tmp_path, slow):
    """rank0_first under torchrun with a 3 s collective timeout: rank 0's build (or, after it,
    rank 1's) takes 8 s; nobody fails, and the default group still works afterwards."""
    result = run_script(["tests/rank0_worker.py", slow], tmp_path, torchrun=2, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("prepared, all_reduce 3.0") == 2, result.stdout


def test_rank0_dying_during_its_preparation_ends_the_others(tmp_path):
    result = run_script(["tests/rank0_worker.py", "die"], tmp_path, torchrun=2, timeout=120)
    assert result.returncode != 0 and "prepared" not in result.stdout


def test_eval_scripts_take_a_collective_timeout():
    import finetune
    import linear_eval
    assert linear_eval.get_args(["x.pt", "--dist-timeout", "30"]).dist_timeout == 30
    assert finetune.get_args(["x.pt", "--dist-timeout", "30"]).dist_timeout == 30
