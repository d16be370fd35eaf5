"""What only a CUDA machine can check (skipped elsewhere): the pretraining step never waits
for the GPU (torch.cuda.set_sync_debug_mode("error") turns every device-to-host
synchronisation into an exception); the device distortion gives the CPU's views; autocast
keeps the loss float32; SyncBatchNorm's kernels; two processes on one GPU against one process
on the global batch (SyncBatchNorm's statistics, the loss's cross-rank gather, DDP), and
activation checkpointing with SyncBatchNorm there;
pretrain.py under torchrun with NCCL, resumed on the GPU; the evaluation scripts and bench.py
on the GPU; DDP on the GPU a process sees when LOCAL_RANK counts further; finetune.py's v2 recipe
stopped and resumed, distill.py under torchrun (its teacher watched) and in two processes against
one, and pretraining on JPEG photos decoded at reduced scale by the data workers.

bf16 tests skip below compute capability 8.0 (V100, T4, RTX 20xx), with the reason: there
--amp auto picks fp16, and each has an fp16 variant that runs on every GPU."""
import argparse
import importlib
import json
import math
import os
import signal
import warnings

import pytest
import torch

from bench import step_setup
from conftest import ROOT, TINY, call_main, child_env, free_port, run_script, sigterm_after_steps
from distributed import AMP_DTYPES, grad_scaler
from loss import contrastive_logits
from model import ProjectionHead, SimCLR, build_encoder, load_classifier, load_encoder, save_classifier
from pretrain import forward_backward, to_device_views, train_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# How long one script run on the GPU may take before it is killed with all its processes (conftest.run_script)
# and its test fails. Each takes seconds to half a minute on an H200; the whole file has a few minutes of a
# lent GPU (tools/gpu_session.sh), which run_script's default of 600 s would give to one hung run.
GPU_RUN_SECONDS = 150


def skip_bf16_below_ampere(amp):
    """Skip a bf16 variant on a GPU of compute capability below 8.0, which has no bf16 units: torch
    2.1-2.3 refuse bf16 there and later versions emulate it slowly; --amp auto runs fp16 there,
    and the test's fp16 variant checks that path."""
    if amp in ("bf16", torch.bfloat16):
        major, minor = torch.cuda.get_device_capability()
        if major < 8:
            pytest.skip(f"bf16 needs compute capability 8.0; this {torch.cuda.get_device_name()} has "
                        f"{major}.{minor} (--amp auto runs fp16 here: the fp16 variant covers it)")


@pytest.mark.parametrize("checkpointing,amp", [(False, "bf16"), (True, "bf16"), (False, "fp16"), (True, "fp16")])
def test_the_training_step_never_waits_for_the_gpu(checkpointing, amp):
    """Also with fp16 and its loss scaler: unscaling, the overflow check and the scale's update
    stay on the device."""
    skip_bf16_below_ampere(amp)
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

def test_device_distortion_gives_the_cpu_views():
    """to_device_views on the GPU (uint8 -> float, the batched jitter, grayscale and blur,
    channels_last) against the same on the CPU with the same seed, hence the same draws, under
    the flags setup() sets (TF32 for cuDNN convolutions, none for matmuls): float32 rounding.
    The blur's row-grouped convolution is depthwise on float32, which PyTorch runs with its own
    kernel, never cuDNN (aten/src/ATen/native/Convolution.cpp, use_cudnn_depthwise: fp16 or
    channels-last only): cuDNN with TF32 and cuDNN off give the same bits."""
    torch.manual_seed(0)
    crops = [torch.randint(0, 256, (24, 3, 96, 96), dtype=torch.uint8) for _ in range(2)]
    out = {}
    for name, channels_last, cudnn in (("cpu", False, True), ("cuda", True, True), ("cuda, no cuDNN", True, False)):
        device = torch.device(name.split(",")[0])
        settings = argparse.Namespace(distort_on="device", strength=1.0, blur=True, channels_last=channels_last)
        with torch.backends.cudnn.flags(enabled=cudnn, allow_tf32=True):
            x = to_device_views(*[c.pin_memory() if device.type == "cuda" else c for c in crops], settings,
                                device, torch.Generator(), seed=7)
        assert x.dtype == torch.float32 and x.shape == (48, 3, 96, 96)
        out[name] = x.cpu()
    assert torch.equal(out["cuda"], out["cuda, no cuDNN"])
    diff = (out["cuda"] - out["cpu"]).abs()
    assert diff.max() <= 2e-5, float(diff.max())
    assert out["cuda"].min() >= 0 and out["cuda"].max() <= 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_keeps_the_loss_float32(dtype):
    skip_bf16_below_ampere(dtype)
    device = torch.device("cuda")
    torch.manual_seed(0)
    encoder = build_encoder("resnet18", width=0.5, cifar_stem=True)
    model = SimCLR(encoder, ProjectionHead(encoder.feature_dim)).to(device, memory_format=torch.channels_last)
    x = torch.rand(32, 3, 32, 32, device=device)
    with torch.autocast("cuda", dtype=dtype):
        h, z = model(x)
        assert z.dtype == dtype  # the network itself runs in bf16 / fp16
        logits, targets = contrastive_logits(*z.chunk(2), temperature=0.1)
    assert logits.dtype == torch.float32
    reference, _ = contrastive_logits(*z.float().chunk(2), temperature=0.1)  # outside autocast
    torch.testing.assert_close(logits, reference, rtol=0, atol=0)
    loss, accuracy = forward_backward(model, x, 0.1, amp=dtype)  # (fp16 without its scaler: one step)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_syncbatchnorm_kernels_match_batchnorm(dtype):
    """SyncBatchNorm's own CUDA kernels (statistics, all_gather, reduction), forced with a
    one-process NCCL group (a one-process SyncBatchNorm module falls back to BatchNorm), give
    BatchNorm's outputs, gradients and running statistics; also for bf16 and fp16 activations
    with float32 parameters, what autocast hands them."""
    skip_bf16_below_ampere(dtype)
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
# The scripts on the GPU: torchrun with NCCL, autocast, resume, evaluation.

@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    """pretrain.py under torchrun --nproc_per_node=1 on the GPU: 2 epochs straight."""
    folder = tmp_path_factory.mktemp("gpu")
    result = run_script(["pretrain.py", *TINY, "--epochs", "2", "--out", "straight"], folder, torchrun=1, cuda=True,
                        timeout=GPU_RUN_SECONDS)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return folder, result


def test_pretrain_under_torchrun_with_nccl(gpu_run):
    """One process under torchrun: NCCL, DDP on cuda:0, plain BatchNorm (distributed.wrap_ddp converts to
    SyncBatchNorm only for several processes: test_two_processes_on_one_gpu_... checks that)."""
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
        result = run_script(["pretrain.py", *TINY, *flags, "--out", "resumed"], folder, torchrun=1, cuda=True,
                            timeout=GPU_RUN_SECONDS)
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


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("script,flags", [
    ("linear_eval.py", ["--epochs", "2", "--knn", "--knn-k", "20"]),
    ("finetune.py", ["--epochs", "2", "--label-fraction", "0.5"]),
])
def test_evaluation_scripts_on_the_gpu_with_autocast(gpu_run, script, flags, amp):
    skip_bf16_below_ampere(amp)
    folder, _ = gpu_run
    result = run_script([script, folder / "straight" / "encoder.pt", "--workers", "2", "--batch-size", "16", *flags,
                         "--amp", amp, "--out", f"{script}.{amp}.json"], folder, cuda=True, timeout=GPU_RUN_SECONDS)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert f'"amp": "{amp}"' in result.stdout and '"channels_last": true' in result.stdout
    res = json.loads((folder / f"{script}.{amp}.json").read_text())
    assert res["test_images"] == 16 and 0 <= res["top1"] <= 100
    assert result.stdout.strip().splitlines()[-1] == f"top-1 accuracy: {res['top1']:.2f}%"


def test_bench_runs_on_the_gpu(tmp_path):
    result = run_script(["bench.py", "--device", "cuda", "--only", "step,loss,memory", "--arch", "resnet18",
                         "--image-size", "64", "--batch-size", "32", "--steps", "2", "--workers", "2",
                         "--loss-sizes", "512", "--memory-cases", "16x64", "--memory-arch", "resnet18",
                         "--memory-rounds", "1", "--view-images", "2"], tmp_path, cuda=True, timeout=GPU_RUN_SECONDS)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for text in ("(c) workers crop, device distorts", "(c) / (b)", "[loss]", "[memory]"):
        assert text in result.stdout, text


@pytest.mark.parametrize("script,amp", [("linear_eval", "bf16"), ("finetune", "bf16"), ("linear_eval", "fp16"),
                                        ("finetune", "fp16")])
def test_evaluation_steps_never_wait_for_the_gpu(gpu_run, script, amp, monkeypatch):
    """Under set_sync_debug_mode("warn") every device-to-host synchronisation warns. Half the
    batch (twice the training steps and feature batches) must add none: no step and no batch
    makes the host wait; what is left (loading, one read per epoch, the scores) is per run."""
    skip_bf16_below_ampere(amp)
    module = importlib.import_module(script)
    folder, _ = gpu_run
    counts = []
    for batch in (16, 8):
        argv = [folder / "straight" / "encoder.pt", "--workers", "0", "--batch-size", batch, "--epochs", "2",
                "--progress-every", "0", "--amp", amp, "--out", folder / f"sync_{script}_{amp}_{batch}.json"]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:  # (call_main: finetune.py's stop handlers must not outlive it in pytest's process)
                call_main(monkeypatch, module, *argv, *(["--label-fraction", "1.0"] if script == "finetune" else []))
            finally:
                torch.cuda.set_sync_debug_mode(0)
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    # the per-run reads (each epoch's sums, the scores) do warn: the mode is on and its warnings are seen
    assert counts[0] > 0 and counts[0] == counts[1], counts


# ----------------------------------------------------------------------------
# The first run on the GPUs people have: fp16 with loss scaling, TF32 scoping, the device choice.

def test_fp16_pretraining_on_the_gpu(tmp_path):
    """--amp fp16 (what auto picks on a V100 or T4) under torchrun with NCCL: loss scaling,
    finite losses, the scaler's state in ckpt.pt, and a resume that continues it."""
    for flags in (["--epochs", "1"], ["--epochs", "2", "--resume"]):
        result = run_script(["pretrain.py", *TINY, "--amp", "fp16", *flags, "--out", "fp16"], tmp_path, torchrun=1,
                            cuda=True, timeout=GPU_RUN_SECONDS)
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
    """As srun --gpus-per-task=1 starts rank 3 of a node: LOCAL_RANK 3, one visible GPU. The process
    group (NCCL, bound to the device where torch takes device_id) forms on cuda:0, and DDP as the
    scripts build it (distributed.wrap_ddp) runs a forward and backward pass there: given
    LOCAL_RANK as its device, DDP would move the inputs to cuda:3 at the first forward and fail
    (IndexError in torch/nn/parallel/_functions.py, _get_stream)."""
    import subprocess
    import sys
    code = "\n".join([
        "import distributed, torch, torch.distributed as dist",
        "ctx = distributed.setup()",
        "model = distributed.wrap_ddp(torch.nn.Linear(4, 2).to(ctx.device), ctx)",
        "model(torch.ones(3, 4, device=ctx.device)).sum().backward()",
        "x = torch.ones(1, device=ctx.device)",
        "dist.all_reduce(x)",
        "print(ctx.device, model.device_ids, model.module.weight.grad.sum().item(), x.item())",
        "dist.destroy_process_group()"])
    env = child_env(cuda=True, RANK="0", WORLD_SIZE="1", LOCAL_RANK="3", LOCAL_WORLD_SIZE="4",
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), PYTHONPATH=ROOT)
    env["CUDA_VISIBLE_DEVICES"] = "0"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "cuda:0 [0] 24.0 1.0"  # d(sum of 3 x 2 outputs)/dW: 3 per weight, 8 weights


# ----------------------------------------------------------------------------
# Several processes on one GPU against one process on the global batch

def one_process_reference(world, sync_bn=True):
    """One process on the GPU, the global batch of tests/ddp_worker.py: with sync_bn, every BN
    layer normalises over all processes' views at once (what SyncBatchNorm computes); without,
    over each process's own views (what BatchNorm does under DDP). The embeddings of each
    process's views, in rank order, feed one NT-Xent -> (loss, gradients, BN running statistics)."""
    import ddp_worker
    from loss import nt_xent
    device = torch.device("cuda", 0)
    model = ddp_worker.make_model().to(device)
    x1, x2 = (x.to(device) for x in ddp_worker.make_batch())
    n = ddp_worker.GLOBAL_BATCH // world
    chunks = [torch.cat([x1[r * n:(r + 1) * n], x2[r * n:(r + 1) * n]]) for r in range(world)]
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        z = model(torch.cat(chunks))[1].split(2 * n) if sync_bn else [model(c)[1] for c in chunks]
        z1, z2 = zip(*(zr.chunk(2) for zr in z))
        loss = nt_xent(torch.cat(z1), torch.cat(z2), ddp_worker.TEMPERATURE)
        loss.backward()
    grads = {k: p.grad.cpu() for k, p in model.named_parameters() if p.grad is not None}
    stats = {k: v.cpu() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}
    return loss.item(), grads, stats


def test_two_processes_on_one_gpu_match_one_process_on_the_global_batch(tmp_path):
    """torchrun --nproc_per_node=2 on one GPU, the model wrapped as the scripts wrap it
    (distributed.wrap_ddp: SyncBatchNorm, DDP on cuda:0) and one SimCLR step (tests/ddp_worker.py
    --cuda) against one process on the global batch: the loss, every parameter gradient after DDP's
    averaging (through SyncBatchNorm's backward and the loss's cross-rank gather), and every BN
    layer's running statistics. NCCL refuses two ranks on one GPU ("Duplicate GPU detected",
    ncclInvalidUsage), so the two processes use gloo, with CUDA tensors: SyncBatchNorm's gloo path
    (all_gather instead of all_gather_into_tensor, torch/nn/modules/_functions.py) and the same
    autograd functions. The control: BN per process (no SyncBatchNorm) gives other statistics and
    gradients, so the comparison can fail."""
    result = run_script(["tests/ddp_worker.py", tmp_path / "ddp.pt", "--cuda"], tmp_path, torchrun=2, cuda=True,
                        timeout=GPU_RUN_SECONDS)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    got = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert got["world"] == 2
    loss, grads, stats = one_process_reference(got["world"])
    assert got["loss"].item() == pytest.approx(loss, rel=1e-4)
    assert set(got["grads"]) == set(grads) and len(grads) > 50
    for name, g in grads.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-3, atol=1e-5, msg=name)
    assert set(got["bn_stats"]) == set(stats) and len(stats) > 30
    for name, v in stats.items():
        torch.testing.assert_close(got["bn_stats"][name], v, rtol=1e-4, atol=1e-6, msg=name)
    _, local_grads, local_stats = one_process_reference(got["world"], sync_bn=False)
    worst = max(((local_grads[k] - g).norm() / g.norm()).item() for k, g in grads.items())
    assert worst > 1e-2, worst
    assert max((local_stats[k] - v).abs().max().item() for k, v in stats.items() if "running_" in k) > 1e-3


def test_checkpointing_with_syncbatchnorm_in_two_processes_is_exact(tmp_path):
    """pretrain.py --activation-checkpointing with several GPUs: the recomputation inside the backward
    pass runs SyncBatchNorm's autograd function again, with its all-gather of the statistics, while
    the running statistics stay frozen (model.frozen_running_stats). Two processes on one GPU (gloo on
    CUDA tensors, tests/checkpointing_worker.py --cuda), two LARS steps with and without checkpointing:
    the same losses, gradients, running statistics (moved once per step) and weights, as
    tests/test_checkpointing.py checks on the CPU, where there is no SyncBatchNorm."""
    from test_checkpointing import assert_same_steps
    out = tmp_path / "ckpt.pt"
    result = run_script(["tests/checkpointing_worker.py", out, "--cuda"], tmp_path, torchrun=2, cuda=True,
                        timeout=GPU_RUN_SECONDS)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    assert got[False][0][1]["buffers"]["encoder.bn1.num_batches_tracked"] == 2  # not 4: one update per step
    assert_same_steps(got[False], got[True])


# ----------------------------------------------------------------------------
# SimCLRv2's fine-tuning and distillation, and photos decoded at reduced scale, on the GPU.
# Each test's body is a function of `cuda`: with cuda=False it runs the very same commands on the CPU
# with the GPU hidden (how they were checked on a machine without one); the device the output names
# is the only other difference. Expected times are estimates for an H200 (nothing here has run on one).

def device_name(cuda):
    return "cuda:0" if cuda else "cpu"


def one_image(results):
    """A top-1 in percent may move by one test image between two processes on the GPU: cuDNN picks its
    algorithms per process (benchmark mode) and their bf16/fp16 rounding can turn a near tie."""
    return 100 / results["test_images"] + 1e-9


@pytest.fixture(scope="module")
def v2_checkpoint(tmp_path_factory):
    """An encoder.pt with a three-layer projection head (pretrain.py --proj-layers 3), random weights, 16 px
    synthetic images: finetune.py picks the v2 recipe for it."""
    from test_finetune import checkpoint
    return checkpoint(tmp_path_factory.mktemp("v2") / "encoder.pt", head_layers=3)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_finetune_v2_recipe_stops_and_resumes_on_the_gpu(v2_checkpoint, tmp_path, monkeypatch, capsys, amp):
    skip_bf16_below_ampere(amp)
    finetune_v2_resumed(v2_checkpoint, tmp_path, monkeypatch, capsys, amp, cuda=True)


def finetune_v2_resumed(checkpoint, tmp_path, monkeypatch, capsys, amp, cuda):
    """finetune.py with the v2 recipe it picks for a three-layer head (LARS with the official exclusions,
    sqrt scaling, from head layer 1) under autocast: 2 epochs of 4 steps straight, and stopped by SIGTERM
    after step 2, then --resume. The resumed NAME.pt holds the straight run's network, and its training loss,
    as closely as test_resume_on_the_gpu asks of pretraining (cuDNN is not bitwise reproducible); NAME.pt and
    NAME.ckpt.pt are read on the CPU; linear_eval.py --checkpoint-classifier scores each NAME.pt to its
    run's top-1 (within one test image). fp16: the loss scaler's state is in NAME.ckpt.pt. ~10 s on an H200."""
    import finetune
    import linear_eval
    flags = [checkpoint, "--workers", "0", "--batch-size", "16", "--epochs", "2", "--label-fraction", "1",
             "--progress-every", "0", "--amp", amp]
    call_main(monkeypatch, finetune, *flags, "--out", tmp_path / "straight.json")
    out = capsys.readouterr().out
    assert "recipe v2 (the official SimCLRv2 fine-tuning" in out and "projection head has 3 layers" in out
    assert f"device {device_name(cuda)}" in out and f'"amp": "{amp}"' in out and "4 steps/epoch" in out
    real_update = finetune.Progress.update
    steps = sigterm_after_steps(monkeypatch, finetune.Progress, 2)  # after step 2 of epoch 1
    with pytest.raises(SystemExit) as stopped:
        call_main(monkeypatch, finetune, *flags, "--out", tmp_path / "stopped.json")
    monkeypatch.setattr(finetune.Progress, "update", real_update)
    assert stopped.value.code == 128 + signal.SIGTERM and len(steps) == 2
    state = torch.load(tmp_path / "stopped.ckpt.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"]) == (0, 2) and not os.path.exists(tmp_path / "stopped.json")
    assert all(t.device.type == "cpu" for t in state["model"].values())
    assert (state["scaler"] is not None) == (amp == "fp16")
    call_main(monkeypatch, finetune, *flags, "--out", tmp_path / "stopped.json", "--resume")
    assert "resumed from" in capsys.readouterr().out
    a, b = (torch.load(tmp_path / f"{run}.pt", weights_only=True) for run in ("straight", "stopped"))
    assert a["classifier"]["head_layer"] == b["classifier"]["head_layer"] == 1 and a["meta"]["recipe"] == "v2"
    pairs = [(f"{part}.{k}", v, b[part][k]) for part in ("encoder", "head") for k, v in a[part].items()]
    pairs += [(f"classifier.{k}", a["classifier"][k], b["classifier"][k]) for k in ("weight", "bias")]
    assert len(pairs) > 100
    for name, x, y in pairs:
        assert x.device.type == y.device.type == "cpu", name
        if x.is_floating_point():
            torch.testing.assert_close(y, x, rtol=1e-3, atol=1e-3, msg=name)
        else:
            assert torch.equal(y, x), name
    ra, rb = (json.loads((tmp_path / f"{run}.json").read_text()) for run in ("straight", "stopped"))
    for res in (ra, rb):
        assert (res["recipe"], res["optimizer"], res["lr_scaling"], res["from_head_layer"]) == ("v2", "lars", "sqrt", 1)
        assert res["amp"] == amp and res["test_images"] == 16 and math.isfinite(res["final_train_loss"])
    assert rb["final_train_loss"] == pytest.approx(ra["final_train_loss"], rel=1e-3)
    assert abs(rb["top1"] - ra["top1"]) <= one_image(ra)
    for run, res in (("straight", ra), ("stopped", rb)):
        call_main(monkeypatch, linear_eval, tmp_path / f"{run}.pt", "--checkpoint-classifier", "--workers", "0",
                  "--batch-size", "16", "--amp", amp, "--out", tmp_path / f"{run}.scored.json")
        scored = json.loads((tmp_path / f"{run}.scored.json").read_text())
        assert scored["test_images"] == 16, run
        assert abs(scored["top1"] - res["top1"]) <= one_image(res), (run, scored["top1"], res["top1"])


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A fine-tuned network saved as finetune.py saves it, its classifier on projection-head layer 1 (the v2
    recipe's): tests/test_distill.py's nearest-class-mean teacher, whose predictions vary over the images."""
    from test_distill import make_teacher
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_classifier(path, make_teacher(n=128, head_layer=1), dataset="synthetic", data_dir="data", image_size=16,
                    synthetic_size=128)
    return path


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_distill_under_torchrun_with_nccl(teacher_file, tmp_path, monkeypatch, amp):
    skip_bf16_below_ampere(amp)
    distill_under_torchrun(teacher_file, tmp_path, monkeypatch, amp, cuda=True)


def distill_under_torchrun(teacher_file, tmp_path, monkeypatch, amp, cuda):
    """distill.py under torchrun (one process: NCCL, DDP around the student on cuda:0) with autocast,
    through tests/distill_teacher_worker.py, which watches the teacher: one epoch of 8 steps of
    self-distillation from a teacher whose classifier reads projection-head layer 1. Every teacher forward
    (8 training steps, 2 test batches) runs in eval mode, without gradients, under autocast, and the
    teacher ends with the file's weights and BN statistics. log.jsonl, results.json and student.pt (read on
    the CPU) are written, and linear_eval.py --checkpoint-classifier scores student.pt to the student's
    printed top-1 (within one test image). ~15 s on an H200."""
    import linear_eval
    result = run_script(["tests/distill_teacher_worker.py", tmp_path / "teacher.json", teacher_file, "--workers", "0",
                         "--batch-size", "16", "--lr", "0.2", "--epochs", "1", "--progress-every", "0", "--amp", amp,
                         "--out", "run"], tmp_path, torchrun=1, cuda=cuda, timeout=GPU_RUN_SECONDS if cuda else 600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    out = result.stdout
    assert f"device {device_name(cuda)}" in out and "processes 1" in out and f'"amp": "{amp}"' in out
    assert "self-distillation" in out and "classifier on head layer 1" in out
    watched = json.loads((tmp_path / "teacher.json").read_text())
    assert watched["forwards"] == 128 // 16 + 32 // 16, watched
    assert watched["training"] == watched["grad_enabled"] == 0 and watched["requires_grad"] == [], watched
    assert watched["dtypes"] == [str(AMP_DTYPES[amp]).split(".")[-1]], watched
    assert watched["devices"] == [device_name(cuda)] and watched["keys"] and watched["changed"] == [], watched
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1] and math.isfinite(log[0]["loss"]) and 0 <= log[0]["agreement"] <= 100
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["processes"] == 1 and res["amp"] == amp and res["test_images"] == 32 and res["images"] == 128
    assert out.strip().splitlines()[-1] == f"top-1 accuracy: {res['top1']:.2f}%"
    saved = torch.load(tmp_path / "run" / "student.pt", weights_only=True)
    assert all(t.device.type == "cpu" for t in saved["encoder"].values())
    student = load_classifier(tmp_path / "run" / "student.pt")
    assert student.head_layer == 0 and not any(isinstance(m, torch.nn.SyncBatchNorm) for m in student.modules())
    call_main(monkeypatch, linear_eval, tmp_path / "run" / "student.pt", "--checkpoint-classifier", "--workers", "0",
              "--batch-size", "16", "--amp", amp, "--out", tmp_path / "scored.json")
    scored = json.loads((tmp_path / "scored.json").read_text())
    assert scored["test_images"] == 32 and abs(scored["top1"] - res["top1"]) <= one_image(res), scored["top1"]


def test_distill_two_processes_on_one_gpu_match_one_process_on_the_global_batch(tmp_path):
    distill_two_processes(tmp_path, cuda=True)


def distill_two_processes(tmp_path, cuda):
    """Two steps of distill.py's train_step in two processes on one GPU (tests/distill_worker.py --cuda:
    the student wrapped as distill.py wraps it, SyncBatchNorm and DDP on cuda:0; gloo on CUDA tensors, since
    NCCL refuses two ranks on one GPU) against one process on the global batch, float32: the losses, the
    student's weights after LARS and its BN running statistics. The control, BN over each process's half,
    moves the weights and the statistics otherwise, so the comparison can fail. On the CPU, without
    SyncBatchNorm, the reference and the control trade places (and the statistics are not compared).
    ~15 s on an H200."""
    import distill_worker
    result = run_script(["tests/distill_worker.py", tmp_path / "ddp.pt", *(["--cuda"] if cuda else [])], tmp_path,
                        torchrun=2, cuda=cuda, timeout=GPU_RUN_SECONDS if cuda else 300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    got = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert got["world"] == 2
    device = "cuda" if cuda else "cpu"
    ref = distill_worker.reference(got["world"], device, sync_bn=cuda)
    control = distill_worker.reference(got["world"], device, sync_bn=not cuda)
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-4)
    assert got["weights"].keys() == ref["weights"].keys()
    for k, w in ref["weights"].items():
        torch.testing.assert_close(got["weights"][k], w, rtol=1e-3, atol=1e-5, msg=k)
    moved = {k: w - ref["start"][k] for k, w in ref["weights"].items() if not torch.equal(w, ref["start"][k])}
    assert len(moved) > 30
    worst = max(((control["weights"][k] - ref["start"][k] - m).norm() / m.norm()).item() for k, m in moved.items())
    assert worst > 1e-2, worst
    assert got["bn_stats"].keys() == ref["bn_stats"].keys() and len(ref["bn_stats"]) > 30
    if cuda:  # (on the CPU rank 0's statistics are of its own half alone, which no one-process run gives)
        for k, v in ref["bn_stats"].items():
            torch.testing.assert_close(got["bn_stats"][k], v, rtol=1e-4, atol=1e-6, msg=k)
        assert max((control["bn_stats"][k] - v).abs().max().item() for k, v in ref["bn_stats"].items()
                   if "running_" in k) > 1e-3


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """32 photo-like JPEGs of 1200x900 (bench.make_photo), in two subfolders."""
    from bench import make_photo
    folder = tmp_path_factory.mktemp("photos")
    for i in range(32):
        (folder / f"d{i % 2}").mkdir(exist_ok=True)
        (folder / f"d{i % 2}" / f"{i:02d}.jpg").write_bytes(make_photo((1200, 900), seed=i))
    return folder


def test_pretraining_on_photos_feeds_the_gpu_path(photos, tmp_path):
    pretrain_on_photos(photos, tmp_path, cuda=True)


def pretrain_on_photos(photos, tmp_path, cuda):
    """pretrain.py --dataset folder under torchrun on 1200x900 JPEGs at 64 px, 2 data workers: by default
    the workers decode every photo at 1/4 or 1/8 of its size (each crop the official sampler draws covers
    10% of the photo or more, so its shorter side is about 285 px or more, >= 4 x 64) and hand the uint8
    crops over in pinned memory to the device's distortion; --no-scaled-decode decodes them in full. Both
    run an epoch with finite losses and no unreadable image, and, since the scaled decode keeps the draws
    and the pixels within about a level, their losses agree within 2% (measured on the CPU: 0.1-0.2%, float32
    and bf16; other views of the same photos from the same start, --crop-sampler inception or --strength
    0.5, move it by 5-27%). ~25 s on an H200."""
    flags = ["--dataset", "folder", "--data-dir", photos, "--image-size", "64", "--arch", "resnet18", "--width",
             "0.25", "--batch-size", "16", "--warmup-epochs", "1", "--log-every", "1", "--epochs", "1",
             "--workers", "2", "--distort-on", "device"]
    losses = {}
    for name, extra in (("scaled", []), ("full", ["--no-scaled-decode"])):
        result = run_script(["pretrain.py", *flags, *extra, "--out", name], tmp_path, torchrun=1, cuda=cuda,
                            timeout=GPU_RUN_SECONDS if cuda else 600)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        out = result.stdout
        assert f"device {device_name(cuda)}" in out and "processes 1" in out and "32 images" in out, out[-3000:]
        assert '"distort_on": "device"' in out and '"workers": 2' in out
        assert f'"scaled_decode": {"true" if name == "scaled" else "false"}' in out
        assert ("scaled_decode=True" in out) == (name == "scaled")  # the views the workers run
        log = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in log] == [1] and math.isfinite(log[0]["loss"]), log
        assert log[0]["unreadable_images"] == 0
        if cuda:
            assert 0 < log[0]["peak_gpu_memory_gib"] < 10
        losses[name] = log[0]["loss"]
    assert losses["scaled"] == pytest.approx(losses["full"], rel=2e-2), losses
