"""What only a CUDA machine can check (skipped elsewhere): the pretraining step never waits
for the GPU (torch.cuda.set_sync_debug_mode("error") turns every device-to-host
synchronisation into an exception); the device distortion gives the CPU's views; bf16
autocast keeps the loss float32; SyncBatchNorm's kernels; pretrain.py under torchrun with
NCCL, resumed on the GPU; the evaluation scripts and bench.py on the GPU."""
import argparse
import importlib
import json
import math
import sys
import warnings

import pytest
import torch

from bench import step_setup
from conftest import ROOT, TINY, child_env, free_port, run_script
from distributed import AMP_DTYPES, grad_scaler
from loss import contrastive_logits
from model import ProjectionHead, SimCLR, build_encoder, load_encoder
from pretrain import forward_backward, to_device_views, train_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("checkpointing,amp", [(False, "bf16"), (True, "bf16"), (False, "fp16")])
def test_the_training_step_never_waits_for_the_gpu(checkpointing, amp):
    """Also with fp16 and its loss scaler: unscaling, the overflow check and the scale's update
    stay on the device."""
    device = torch.device("cuda")
    model, optimizer, settings, ctx, nonfinite = step_setup("resnet18", 64, device,
                                                            activation_checkpointing=checkpointing)
    dtype, scaler = AMP_DTYPES[amp], grad_scaler(amp, device)
    generator = torch.Generator()
    # uint8 crops in pinned memory, as the data workers hand them over on the device path
    crops = [torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8).pin_memory() for _ in range(2)]
    for step in range(2):  # warm-up: cuDNN autotuning, lazy initialisation
        stats, nonfinite = train_step(model, optimizer, to_device_views(*crops, settings, device, generator, step),
                                      0.1, dtype, ctx, nonfinite, step, scaler)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(2, 6):
            x = to_device_views(*crops, settings, device, generator, seed=step)
            stats, nonfinite = train_step(model, optimizer, x, 0.1, dtype, ctx, nonfinite, step, scaler)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(stats).all() and nonfinite[0].item() == -1


# ----------------------------------------------------------------------------
# The device path gives the CPU path's views.

@pytest.mark.parametrize("tf32", [False, True])
def test_device_distortion_gives_the_cpu_views(tf32):
    """to_device_views on the GPU (uint8 -> float, the batched jitter, grayscale and blur,
    channels_last) against the same on the CPU with the same seed, hence the same draws.
    With TF32 convolutions (pretrain.py turns them on) the blur rounds its inputs to
    10-bit mantissas: within half a uint8 step; without, float32 rounding."""
    torch.manual_seed(0)
    crops = [torch.randint(0, 256, (24, 3, 96, 96), dtype=torch.uint8) for _ in range(2)]
    out = {}
    for name, channels_last in (("cpu", False), ("cuda", True)):
        settings = argparse.Namespace(distort_on="device", strength=1.0, blur=True, channels_last=channels_last)
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=tf32):
            x = to_device_views(*[c.pin_memory() if name == "cuda" else c for c in crops], settings,
                                torch.device(name), torch.Generator(), seed=7)
        assert x.dtype == torch.float32 and x.shape == (48, 3, 96, 96)
        out[name] = x.cpu()
    diff = (out["cuda"] - out["cpu"]).abs()
    assert diff.max() <= (0.5 / 255 if tf32 else 2e-5), float(diff.max())
    assert out["cuda"].min() >= 0 and out["cuda"].max() <= 1


def test_bf16_autocast_keeps_the_loss_float32():
    device = torch.device("cuda")
    torch.manual_seed(0)
    encoder = build_encoder("resnet18", width=0.5, cifar_stem=True)
    model = SimCLR(encoder, ProjectionHead(encoder.feature_dim)).to(device, memory_format=torch.channels_last)
    x = torch.rand(32, 3, 32, 32, device=device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        h, z = model(x)
        assert z.dtype == torch.bfloat16  # the network itself runs in bf16
        logits, targets = contrastive_logits(*z.chunk(2), temperature=0.1)
    assert logits.dtype == torch.float32
    reference, _ = contrastive_logits(*z.float().chunk(2), temperature=0.1)  # outside autocast
    torch.testing.assert_close(logits, reference, rtol=0, atol=0)
    loss, accuracy = forward_backward(model, x, 0.1, amp=torch.bfloat16)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_syncbatchnorm_kernels_match_batchnorm(dtype):
    """SyncBatchNorm's own CUDA kernels (statistics, all_gather, reduction), forced with a
    one-process NCCL group (a one-process SyncBatchNorm module falls back to BatchNorm), give
    BatchNorm's outputs, gradients and running statistics; also for bf16 activations with
    float32 parameters, what bf16 autocast hands them."""
    import torch.distributed as dist
    from torch.nn.modules._functions import SyncBatchNorm as SyncBatchNormFunction

    from conftest import free_port

    device = torch.device("cuda")
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        bn = torch.nn.BatchNorm2d(8).to(device)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        x = (torch.randn(16, 8, 12, 12, device=device) * 3 + 1).to(dtype)
        mean, var = bn.running_mean.clone(), bn.running_var.clone()
        weight, bias = bn.weight.detach().clone().requires_grad_(), bn.bias.detach().clone().requires_grad_()
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1 = bn(x1)
        y2 = SyncBatchNormFunction.apply(x2, weight, bias, mean, var, bn.eps, bn.momentum, dist.group.WORLD, 1)
        grad = torch.randn_like(y1)
        y1.backward(grad)
        y2.backward(grad)
    finally:
        dist.destroy_process_group()
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    assert y2.dtype == y1.dtype == dtype
    torch.testing.assert_close(y2, y1, **tol)
    torch.testing.assert_close(x2.grad, x1.grad, **tol)
    for a, b in ((weight.grad, bn.weight.grad), (bias.grad, bn.bias.grad), (mean, bn.running_mean),
                 (var, bn.running_var)):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-4 if dtype == torch.float32 else 1e-2, atol=1e-4)


# ----------------------------------------------------------------------------
# The scripts on the GPU: torchrun with NCCL, SyncBatchNorm, bf16, resume, evaluation.

@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    """pretrain.py under torchrun --nproc_per_node=1 on the GPU: 2 epochs straight."""
    folder = tmp_path_factory.mktemp("gpu")
    result = run_script(["pretrain.py", *TINY, "--epochs", "2", "--out", "straight"], folder, torchrun=1, cuda=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return folder, result


def test_pretrain_under_torchrun_with_nccl_and_syncbatchnorm(gpu_run):
    folder, result = gpu_run
    out = result.stdout
    assert "device cuda:0 (" in out and "processes 1" in out and "SyncBatchNorm needs CUDA" not in out
    major = torch.cuda.get_device_capability()[0]
    assert f'"amp": "{"bf16" if major >= 8 else "fp16"}"' in out and "compute capability" in out
    assert '"channels_last": true' in out and '"distort_on": "device"' in out
    assert " mem " in out  # peak GPU memory on the log lines
    log = [json.loads(line) for line in (folder / "straight" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and all(0 < r["peak_gpu_memory_gib"] < 10 for r in log)
    assert all(math.isfinite(r["loss"]) for r in log)
    # saved on the CPU: a plain torch.load works without a GPU
    for name in ("ckpt.pt", "encoder.pt"):
        ckpt = torch.load(folder / "straight" / name, weights_only=True)
        tensors = list((ckpt.get("model") or ckpt["encoder"]).values())
        if "optimizer" in ckpt:
            tensors += [s["momentum_buffer"] for s in ckpt["optimizer"]["state"].values()]
        assert tensors and all(t.device.type == "cpu" for t in tensors), name
    encoder, _ = load_encoder(folder / "straight" / "encoder.pt")
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in encoder.modules())


def test_resume_on_the_gpu(gpu_run):
    """1 epoch, then --resume to 2: the straight run's losses and weights (cuDNN's algorithms
    are not bitwise reproducible, so close rather than equal). The optimizer state is read on
    the CPU and follows the model to the GPU."""
    folder, _ = gpu_run
    for flags in (["--epochs", "1"], ["--epochs", "2", "--resume"]):
        result = run_script(["pretrain.py", *TINY, *flags, "--out", "resumed"], folder, torchrun=1, cuda=True)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "resumed from" in result.stdout
    logs = [[json.loads(line)["loss"] for line in (folder / run / "log.jsonl").read_text().splitlines()]
            for run in ("straight", "resumed")]
    assert logs[0] == pytest.approx(logs[1], rel=1e-3)
    a, b = (torch.load(folder / run / "ckpt.pt", weights_only=True) for run in ("straight", "resumed"))
    assert a["step"] == b["step"] == 8
    for k in a["model"]:
        if a["model"][k].is_floating_point():
            torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-3, atol=1e-3, msg=k)


@pytest.mark.parametrize("script,flags", [
    ("linear_eval.py", ["--epochs", "2", "--knn", "--knn-k", "20"]),
    ("finetune.py", ["--epochs", "2", "--label-fraction", "0.5"]),
])
def test_evaluation_scripts_on_the_gpu_with_bf16(gpu_run, script, flags):
    folder, _ = gpu_run
    result = run_script([script, folder / "straight" / "encoder.pt", "--workers", "2", "--batch-size", "16", *flags,
                         "--amp", "bf16",
                         "--out", f"{script}.json"], folder, cuda=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert '"amp": "bf16"' in result.stdout and '"channels_last": true' in result.stdout
    res = json.loads((folder / f"{script}.json").read_text())
    assert res["test_images"] == 16 and 0 <= res["top1"] <= 100
    assert result.stdout.strip().splitlines()[-1] == f"top-1 accuracy: {res['top1']:.2f}%"


def test_bench_runs_on_the_gpu(tmp_path):
    result = run_script(["bench.py", "--device", "cuda", "--only", "step,loss,memory", "--arch", "resnet18",
                         "--image-size", "64", "--batch-size", "32", "--steps", "2", "--workers", "2",
                         "--loss-sizes", "512", "--memory-cases", "16x64", "--memory-arch", "resnet18",
                         "--memory-rounds", "1", "--view-images", "2"], tmp_path, cuda=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for text in ("(c) workers crop, device distorts", "(c) / (b)", "[loss]", "[memory]"):
        assert text in result.stdout, text


@pytest.mark.parametrize("script,amp", [("linear_eval", "bf16"), ("finetune", "bf16"), ("finetune", "fp16")])
def test_evaluation_steps_never_wait_for_the_gpu(gpu_run, script, amp, monkeypatch):
    """Under set_sync_debug_mode("warn") every device-to-host synchronisation warns. Half the
    batch (twice the training steps and feature batches) must add none: no step and no batch
    makes the host wait; what is left (loading, one read per epoch, the scores) is per run."""
    module = importlib.import_module(script)
    folder, _ = gpu_run
    counts = []
    for batch in (16, 8):
        argv = [f"{script}.py", str(folder / "straight" / "encoder.pt"), "--workers", "0", "--batch-size", str(batch),
                "--epochs", "2", "--progress-every", "0", "--amp", amp,
                "--out", str(folder / f"sync_{script}_{amp}_{batch}.json")]
        monkeypatch.setattr(sys, "argv", argv + (["--label-fraction", "1.0"] if script == "finetune" else []))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                module.main()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    assert counts[0] == counts[1], counts


# ----------------------------------------------------------------------------
# The first run on the GPUs people have: fp16 with loss scaling, TF32 scoping, the device choice.

def test_fp16_pretraining_on_the_gpu(tmp_path):
    """--amp fp16 (what auto picks on a V100 or T4) under torchrun with NCCL: loss scaling,
    finite losses, the scaler's state in ckpt.pt, and a resume that continues it."""
    for flags in (["--epochs", "1"], ["--epochs", "2", "--resume"]):
        result = run_script(["pretrain.py", *TINY, "--amp", "fp16", *flags, "--out", "fp16"], tmp_path, torchrun=1,
                            cuda=True)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "amp: fp16 + loss scaling (" in result.stdout and " scale " in result.stdout
    log = [json.loads(line) for line in (tmp_path / "fp16" / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) and r["overflow_steps"] < 4 and r["loss_scale"] >= 1 for r in log)
    ckpt = torch.load(tmp_path / "fp16" / "ckpt.pt", weights_only=True)
    assert ckpt["scaler"]["scale"] == log[-1]["loss_scale"]


def test_float32_matmuls_are_true_float32():
    """After setup(), the loss logits (a float32 matmul) agree with float64 to float32 rounding;
    with TF32 matmuls (what setup used to turn on) they would not on Ampere and newer."""
    import distributed
    distributed.setup()
    assert torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    g = torch.Generator(device="cuda").manual_seed(0)
    z1, z2 = (torch.randn(512, 128, device="cuda", generator=g) for _ in range(2))
    reference, _ = contrastive_logits(z1.double(), z2.double(), temperature=0.1)
    logits, _ = contrastive_logits(z1, z2, temperature=0.1)
    finite = torch.isfinite(reference)
    error = (logits.double() - reference)[finite].abs().max().item()
    assert error < 1e-4, error  # |logit| <= 10: float32 rounding is ~1e-6
    if torch.cuda.get_device_capability()[0] >= 8:
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            tf32, _ = contrastive_logits(z1, z2, temperature=0.1)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = False
        assert (tf32.double() - reference)[finite].abs().max().item() > 10 * error  # the test can fail


def test_one_gpu_per_task_takes_the_visible_gpu(tmp_path):
    """As srun --gpus-per-task=1 starts rank 3 of a node: LOCAL_RANK 3, one visible GPU; the
    process group (NCCL, bound to the device where torch takes device_id) forms on cuda:0."""
    import subprocess
    import sys
    code = ("import distributed, torch, torch.distributed as dist; ctx = distributed.setup(); "
            "x = torch.ones(1, device=ctx.device); dist.all_reduce(x); print(ctx.device, x.item()); "
            "dist.destroy_process_group()")
    env = child_env(cuda=True, RANK="0", WORLD_SIZE="1", LOCAL_RANK="3", LOCAL_WORLD_SIZE="4",
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), PYTHONPATH=ROOT)
    env["CUDA_VISIBLE_DEVICES"] = "0"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "cuda:0 1.0"
