"""pretrain.py end to end on generated data: one process, torchrun with two, --resume, bad input."""
import json

import pytest
import torch

import pretrain
from conftest import TINY, run_script
from model import load_encoder


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_process_end_to_end(run, tmp_path):
    result = run("pretrain.py", *TINY, "--epochs", "2", "--out", "out")
    out = tmp_path / "out"
    log = read_log(out / "log.jsonl")
    assert [r["epoch"] for r in log] == [1, 2] and all(r["loss"] > 0 for r in log)
    assert "epoch 2/2 step 4/4 loss" in result.stdout and " img/s " in result.stdout and " eta " in result.stdout
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)  # plain dicts
    assert ckpt["epoch"] == 2 and ckpt["step"] == 8 and ckpt["args"]["arch"] == "resnet18"
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    encoder, meta = load_encoder(out / "encoder.pt")
    assert meta["meta"]["dataset"] == "synthetic" and meta["meta"]["image_size"] == 32
    for k, v in encoder.state_dict().items():  # the export is the checkpoint's encoder
        assert torch.equal(v, ckpt["model"]["encoder." + k])
    assert encoder(torch.rand(2, 3, 32, 32)).shape == (2, 128)


def test_cifar_recipe_defaults_and_printed_settings(run):
    result = run("pretrain.py", *TINY, "--epochs", "1", "--out", "out", "--crop-sampler", "inception")
    settings = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    assert settings["cifar_stem"] is True and settings["strength"] == 0.5
    assert settings["blur"] is False and settings["temperature"] == 0.5
    assert settings["lr"] == 1.0 and settings["weight_decay"] == 1e-4  # the official README's CIFAR recipe
    assert "peak lr 0.0625 = 1.0 x batch/256" in result.stdout
    assert "crop_sampler='inception'" in result.stdout  # the flag reaches the views
    assert "warning" not in result.stderr  # warmup (1 epoch) = the run: no warning


def test_crop_sampler_flag_and_warmup_longer_than_the_run(capsys, monkeypatch):
    args = pretrain.get_args(["--dataset", "synthetic", "--epochs", "1"])  # warmup stays at 10 epochs
    assert args.crop_sampler == "official"
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "--warmup-epochs 10 is longer than the run (--epochs 1)" in err
    assert "stays below 10% of its peak" in err
    pretrain.get_args(["--dataset", "synthetic", "--epochs", "10"])
    monkeypatch.setenv("RANK", "1")  # under torchrun only rank 0 says it
    pretrain.get_args(["--dataset", "synthetic", "--epochs", "1"])
    assert "warning" not in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pretrain.get_args(["--crop-sampler", "torchvision"])
    assert "invalid choice: 'torchvision'" in capsys.readouterr().err


def test_sgd_optimizer_decays_and_steps_every_parameter_alike(run, tmp_path):
    run("pretrain.py", *TINY, "--epochs", "1", "--out", "out", "--optimizer", "sgd", "--weight-decay", "5e-4")
    groups = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["optimizer"]["param_groups"]
    assert all(g["trust_ratio"] is False and g["exclude_1d"] is False and g["weight_decay"] == 5e-4 for g in groups)


def test_flags_beyond_the_official_recipe_reach_the_saved_model(run, tmp_path):
    run("pretrain.py", *TINY, "--epochs", "1", "--out", "out", "--input-norm", "imagenet", "--conv-init", "pytorch",
        "--bn-per-view", "--no-proj-out-bn")
    encoder, ckpt = load_encoder(tmp_path / "out" / "encoder.pt")
    assert encoder.config["input_norm"] == "imagenet" and encoder.normalise_input
    assert ckpt["head_config"]["out_bn"] is False and "net.3.bias" in ckpt["head"]
    args = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["args"]
    assert args["bn_per_view"] is True and args["conv_init"] == "pytorch" and args["proj_out_bn"] is False


def test_resume_continues_exactly(run, tmp_path):
    run("pretrain.py", *TINY, "--epochs", "3", "--out", "straight")
    # Epoch 1 of a 1-epoch run has the same learning rates as epoch 1 of a 3-epoch
    # run (TINY warms up over exactly one epoch), so 1 epoch + resume to 3 must
    # give the straight run's weights. 2 workers here, 0 there: views depend on
    # (seed, epoch, index) only.
    run("pretrain.py", *TINY, "--epochs", "1", "--out", "resumed", "--workers", "2")
    result = run("pretrain.py", *TINY, "--epochs", "3", "--out", "resumed", "--resume")
    assert "resumed from" in result.stdout and "warning: resuming with changed settings" in result.stdout
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k  # bitwise
    for k, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    assert [r["epoch"] for r in read_log(tmp_path / "resumed" / "log.jsonl")] == [1, 2, 3]


def test_device_side_distortion_resumes_exactly(run, tmp_path):
    """--distort-on device (the CUDA default; here the CPU is the device): the workers only
    crop, the batch is distorted in the training process with a generator seeded per step."""
    flags = [*TINY, "--distort-on", "device", "--workers", "1"]
    result = run("pretrain.py", *flags, "--epochs", "2", "--out", "straight")
    assert '"distort_on": "device"' in result.stdout
    run("pretrain.py", *flags, "--epochs", "1", "--out", "resumed")
    run("pretrain.py", *flags, "--epochs", "2", "--out", "resumed", "--resume")
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    workers = run("pretrain.py", *TINY, "--epochs", "1", "--out", "workers")
    assert '"distort_on": "workers"' in workers.stdout  # the CPU default
    c = torch.load(tmp_path / "workers" / "ckpt.pt", weights_only=True)["model"]
    d = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["model"]
    assert not torch.equal(c["encoder.conv1.weight"], d["encoder.conv1.weight"])


def test_torchrun_two_processes(run, tmp_path):
    result = run("pretrain.py", *TINY, "--epochs", "1", "--out", "out", torchrun=2)
    assert "processes 2" in result.stdout and "8 images x 2 views per rank" in result.stdout
    assert result.stdout.count("epoch 1 done") == 1  # rank 0 logs alone
    assert read_log(tmp_path / "out" / "log.jsonl")[0]["epoch"] == 1
    load_encoder(tmp_path / "out" / "encoder.pt")


def one_line_error(result, text):
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "pretrain.py: error:" in line]
    assert len(errors) == 1 and text in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr.split("pretrain.py: error:")[0]


@pytest.mark.parametrize("flags,text", [
    (["--batch-size", "256"], "fewer than one global batch of 256"),
    (["--resume"], "nothing to resume"),
    (["--dataset", "imagefolder", "--data-dir", "nowhere"], "ImageNet layout"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--compile", "--activation-checkpointing"], "cannot be combined"),
    (["--max-images", "0"], "--max-images must be at least 1"),
    (["--max-images", "8"], "the dataset has 8 images, fewer than one global batch of 16"),
])
def test_bad_input_is_one_clear_line(run, flags, text):
    one_line_error(run("pretrain.py", *TINY, "--out", "out", *flags, check=False), text)


def test_unknown_dataset_and_arch_are_rejected(run):
    for flag, value in (("--dataset", "svhn"), ("--arch", "vgg16")):
        result = run("pretrain.py", *TINY, flag, value, check=False)
        assert result.returncode == 2 and "invalid choice" in result.stderr and "Traceback" not in result.stderr


def test_batch_that_does_not_divide_by_processes(run):
    result = run("pretrain.py", *TINY, "--batch-size", "15", "--out", "out", torchrun=2, check=False)
    one_line_error(result, "does not divide by the 2 processes")


def test_existing_run_is_not_overwritten(run, tmp_path):
    run("pretrain.py", *TINY, "--epochs", "1", "--out", "out")
    before = (tmp_path / "out" / "ckpt.pt").read_bytes()
    one_line_error(run("pretrain.py", *TINY, "--epochs", "1", "--out", "out", check=False), "already exists")
    assert (tmp_path / "out" / "ckpt.pt").read_bytes() == before


def test_resume_with_another_architecture_is_refused(run):
    run("pretrain.py", *TINY, "--epochs", "1", "--out", "out")
    result = run("pretrain.py", *TINY, "--epochs", "2", "--out", "out", "--resume", "--arch", "resnet34",
                 check=False)
    one_line_error(result, "resume with the original flags")


def test_non_finite_loss_stops_with_the_step(run, tmp_path):
    run("pretrain.py", *TINY, "--epochs", "1", "--out", "out")
    saved = (tmp_path / "out" / "ckpt.pt").read_bytes()
    result = run("pretrain.py", *TINY, "--epochs", "3", "--out", "out", "--resume", "--lr", "1e30",
                 "--warmup-epochs", "0", check=False)
    assert result.returncode == 3
    # epoch 2 step 1 (global step 5) applies the huge lr; step 6 sees the result
    one_line_error(result, "loss is nan at step 6 (epoch 2, step 2/4)")
    assert (tmp_path / "out" / "ckpt.pt").read_bytes() == saved  # the last good epoch is kept


def test_download_failure_says_how_to_supply_the_data(monkeypatch, tmp_path):
    import data
    from torchvision import datasets
    monkeypatch.setattr(datasets.CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")  # refused at once
    with pytest.raises(data.DataError) as info:
        data.build_dataset("cifar10", str(tmp_path), "pretrain")
    message = str(info.value)
    assert "\n" not in message and "download failed" in message
    assert "cifar-10-batches-py" in message and f"--data-dir {tmp_path}" in message


def test_non_finite_loss_between_log_lines_is_reported_with_its_step(run, tmp_path):
    """The NaN check waits for the next log line (no per-step host sync), but names the step,
    and no later step has touched the weights or the saved checkpoint."""
    run("pretrain.py", *TINY, "--epochs", "1", "--out", "out")
    saved = (tmp_path / "out" / "ckpt.pt").read_bytes()
    result = run("pretrain.py", *TINY, "--epochs", "3", "--out", "out", "--resume", "--lr", "1e30",
                 "--warmup-epochs", "0", "--log-every", "4", check=False)
    assert result.returncode == 3
    one_line_error(result, "loss is nan at step 6 (epoch 2, step 2/4); weights were not updated from that step on")
    assert "epoch 2/3 step" not in result.stdout  # stopped at the first log line after it
    assert (tmp_path / "out" / "ckpt.pt").read_bytes() == saved


@pytest.mark.parametrize("torchrun,kind", [(0, "torch"), (0, "old"), (0, "cudnn"), (0, "cublas"), (2, "torch")])
def test_out_of_memory_is_one_line_with_the_ways_out(tmp_path, monkeypatch, torchrun, kind):
    first = run_script(["pretrain.py", *TINY, "--epochs", "1", "--out", "out"], tmp_path, torchrun=torchrun)
    assert first.returncode == 0, first.stderr[-2000:]
    saved = {name: (tmp_path / "out" / name).read_bytes() for name in ("ckpt.pt", "encoder.pt")}
    monkeypatch.setenv("OOM_AT", "3")  # the third step of this process: epoch 2, step 3
    monkeypatch.setenv("OOM_KIND", kind)
    result = run_script(["tests/oom_worker.py", *TINY, "--epochs", "2", "--out", "out", "--resume"], tmp_path,
                        torchrun=torchrun)
    assert result.returncode == (1 if torchrun else 5)  # torchrun reports a failed process as 1
    # Every rank that ran out says so once; under torchrun a peer may be stopped by torchrun (as soon as
    # the first rank exits) before or while it writes its line, so at least one complete line is required.
    lines = [line for line in result.stderr.splitlines() if "out of memory at step 7" in line]
    assert 1 <= len(lines) <= max(1, torchrun), result.stderr[-3000:]
    lines = [line for line in lines
             if line.endswith("On disk: out/ckpt.pt holds the run after epoch 1 (--resume continues from there)")]
    assert lines, result.stderr[-3000:]
    per_rank = 16 // max(1, torchrun)
    for line in lines:
        assert f"{per_rank} images ({2 * per_rank} views) of 32 px per process" in line
        assert "--activation-checkpointing" in line and "--lr-scaling sqrt" in line and "more GPUs" in line
    if not torchrun:  # one line of ours (torch's own warnings, e.g. 2.1's on TypedStorage, aside)
        assert "Traceback" not in result.stderr
        assert [line for line in result.stderr.splitlines() if "error" in line] == lines
    for name, data in saved.items():  # nothing saved is lost
        assert (tmp_path / "out" / name).read_bytes() == data


def test_max_images_limits_every_split(run, tmp_path):
    result = run("pretrain.py", *TINY, "--epochs", "1", "--max-images", "8", "--batch-size", "8", "--knn-every", "1",
                 "--out", "out")
    log = read_log(tmp_path / "out" / "log.jsonl")
    assert log[0]["step"] == 1  # 8 of the 64 images, at batch 8
    assert "8 train / 8 test images" in result.stdout  # the kNN monitor's splits too (64 and 16 without)
