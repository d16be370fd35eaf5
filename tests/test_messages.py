"""Messages that are true: numeric flags refused when not finite or out of range, image sizes below
what the stem takes, 'no checkpoint was written yet' when none was, torch's own text whole, no flag
recommended that the script lacks; what a run says about its data (the images it found, why the
count of unreadable ones changes); a finished run's encoder.pt written again; the CPU threads of a
resume. Most run the scripts' own functions in this process."""
import io
import json
import os
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import export
import finetune
import flags
import linear_eval
import pretrain
from conftest import TINY
from inprocess import error_lines, run_main
from model import CheckpointError, build_encoder, min_image_size, read_checkpoint, save_encoder


def test_intervals():
    assert flags.problem("lr", float("nan"), "[0, inf)") == "--lr must be a finite number, not nan"
    assert flags.problem("lr", float("inf"), "[0, inf)") == "--lr must be a finite number, not inf"
    assert flags.problem("lr", -0.1, "[0, inf)") == "--lr must be at least 0, not -0.1"
    assert flags.problem("lr", 0.0, "[0, inf)") is None
    assert flags.problem("temperature", 0.0, "(0, inf)") == "--temperature must be positive, not 0"
    assert flags.problem("momentum", 1.0, "[0, 1)") == "--momentum must lie in [0, 1), not 1"
    assert flags.problem("label_fraction", 1.0, "(0, 1]") is None
    assert flags.problem("label_fraction", 0.0, "(0, 1]") == "--label-fraction must lie in (0, 1], not 0"
    assert flags.problem("max_images", None, "[1, inf)") is None


@pytest.mark.parametrize("args,text", [
    (["--lr", "nan"], "--lr must be a finite number, not nan"),
    (["--lr", "inf"], "--lr must be a finite number, not inf"),
    (["--weight-decay=-1e-4"], "--weight-decay must be at least 0, not -0.0001"),
    (["--temperature", "0"], "--temperature must be positive, not 0"),
    (["--momentum", "1"], "--momentum must lie in [0, 1), not 1"),
    (["--eta", "nan"], "--eta must be a finite number, not nan"),
    (["--strength", "inf"], "--strength must be a finite number, not inf"),
    (["--warmup-epochs", "nan"], "--warmup-epochs must be a finite number, not nan"),
    (["--knn-temperature", "-1"], "--knn-temperature must be positive, not -1"),
    (["--dist-timeout", "0"], "--dist-timeout must be positive, not 0"),
    (["--image-size", "4"], "--image-size 4 is below the 5 px the encoder's CIFAR stem needs"),
    (["--image-size", "16", "--no-cifar-stem"], "--image-size 16 is below the 17 px the encoder's ImageNet stem"),
    (["--image-size", "1"], "--image-size 1 is below the 5 px"),
])
def test_pretrain_refuses_numbers_at_start(args, text, capsys):
    with pytest.raises(SystemExit) as e:
        pretrain.get_args([*TINY, *args])
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert e.value.code == 2 and len(lines) == 1 and text in lines[0], lines


def test_the_smallest_image_sizes_are_accepted(capsys):
    assert pretrain.get_args([*TINY, "--image-size", "5"]).cifar_stem
    assert not pretrain.get_args([*TINY, "--image-size", "17", "--no-cifar-stem"]).cifar_stem


@pytest.mark.parametrize("arch,cifar_stem,extra", [("resnet18", True, {}), ("resnet18", False, {}),
                                                   ("resnet50", False, {"sk_ratio": 0.0625})])
def test_min_image_size_is_where_a_stride_2_layer_would_get_one_pixel(arch, cifar_stem, extra):
    """The bound measured on the network itself: at min_image_size every stride-2 convolution and
    max-pool gets a map of at least 2 px; one pixel less and one of them gets 1x1."""
    encoder = build_encoder(arch, width=0.0625, cifar_stem=cifar_stem, **extra).eval()
    strided = [m for m in encoder.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.MaxPool2d))
               and m.stride in (2, (2, 2))]

    def smallest_input(size):
        seen = []
        hooks = [m.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[-1])) for m in strided]
        with torch.no_grad():
            encoder(torch.zeros(2, 3, size, size))
        for h in hooks:
            h.remove()
        return min(seen)
    least = min_image_size(cifar_stem)
    assert smallest_input(least) == 2 and smallest_input(least - 1) == 1


def test_eval_scripts_refuse_numbers_at_start(tmp_path, capsys, monkeypatch):
    enc = tmp_path / "enc.pt"
    save_encoder(enc, build_encoder("resnet18", width=0.25, cifar_stem=True), dataset="synthetic", image_size=16)
    for script, args, text in [
        (linear_eval, ["--lr", "nan"], "--lr must be a finite number, not nan"),
        (linear_eval, ["--momentum", "-0.5"], "--momentum must lie in [0, 1), not -0.5"),
        (linear_eval, ["--knn-temperature", "0"], "--knn-temperature must be positive"),
        (linear_eval, ["--image-size", "3"], "--image-size 3 is below the 5 px"),
        (finetune, ["--lr", "inf"], "--lr must be a finite number, not inf"),
        (finetune, ["--weight-decay", "nan"], "--weight-decay must be a finite number, not nan"),
        (finetune, ["--label-fraction", "nan"], "--label-fraction must be a finite number, not nan"),
        (finetune, ["--label-fraction", "1.5"], "--label-fraction must lie in (0, 1], not 1.5"),
        (finetune, ["--image-size", "4"], "--image-size 4 is below the 5 px"),
        (export, ["--to", "features", "--data-dir", tmp_path, "--image-size", "2", "x.npz"], "--image-size 2 is below"),
    ]:
        out_flag = [] if script is export else ["--out", tmp_path / "r.json"]
        code, out, err = run_main(script, [enc, *args, *out_flag], capsys, monkeypatch)
        lines = [line for line in err.splitlines() if "error:" in line]
        assert code == 2 and len(lines) == 1 and text in lines[0], (script.__name__, args, err)
    assert sorted(os.listdir(tmp_path)) == ["enc.pt"]  # refused before anything was made


@pytest.mark.parametrize("flag", ["--steps", "--batch-size", "--image-size", "--epoch-images"])
def test_bench_refuses_zero_instead_of_taking_the_default(flag, capsys, monkeypatch):
    import bench
    monkeypatch.setattr(sys, "argv", ["bench.py", flag, "0"])
    with pytest.raises(SystemExit) as e:
        bench.get_args()
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{flag} must be" in err.splitlines()[-1], err


def test_no_checkpoint_written_yet_and_no_out_folder_before_validation(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(pretrain, [*TINY, "--epochs", "1", "--lr", "1e30", "--warmup-epochs", "0",
                                         "--log-every", "1", "--knn-every", "0", "--out", "nan"], capsys, monkeypatch)
    lines = error_lines(err, "pretrain")
    assert code == 3 and len(lines) == 1 and "; no checkpoint was written yet." in lines[0], err
    assert "keeps the last good epoch" not in err and not os.path.exists("nan/ckpt.pt")
    for args, text in ([["--dataset", "imagefolder", "--data-dir", "nowhere"], "nowhere/train is not a directory"],
                       [["--batch-size", "1000"], "fewer than one global batch of 1000"]):
        code, out, err = run_main(pretrain, [*TINY, *args, "--out", "refused"], capsys, monkeypatch)
        assert code == 2 and text in error_lines(err, "pretrain")[0], err
        assert not os.path.exists("refused")  # the run was refused before --out was made


def test_truncated_checkpoint_keeps_torchs_text_whole(tmp_path):
    save_encoder(tmp_path / "enc.pt", build_encoder("resnet18", width=0.25))
    blob = (tmp_path / "enc.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(blob[: len(blob) // 3])
    try:
        torch.load(tmp_path / "cut.pt", weights_only=True)
    except Exception as e:
        torch_text = " ".join(str(e).split())
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(tmp_path / "cut.pt")
    assert torch_text in str(e.value) and "\n" not in str(e.value)


def test_reading_a_checkpoint_warns_nothing(tmp_path):
    """torch 2.1's weights_only load warns 'TypedStorage is deprecated' from inside torch; users see no warning."""
    save_encoder(tmp_path / "enc.pt", build_encoder("resnet18", width=0.25))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_checkpoint(tmp_path / "enc.pt")


def test_export_recommends_only_its_own_flags(tmp_path, capsys, monkeypatch):
    (tmp_path / "photos").mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "photos" / "good.png")
    (tmp_path / "photos" / "bad.png").write_bytes(b"not a png")
    save_encoder(tmp_path / "enc.pt", build_encoder("resnet18", width=0.25), image_size=32)
    code, out, err = run_main(export, [tmp_path / "enc.pt", "--to", "features", "--data-dir", tmp_path / "photos",
                                       "--workers", "0", "--strict-data", tmp_path / "f.npz"], capsys, monkeypatch)
    lines = error_lines(err, "export")
    assert code == 2 and len(lines) == 1 and "cannot read" in lines[0] and "bad.png" in lines[0], err
    with pytest.raises(SystemExit):
        export.get_args(["--help"])
    help_text = capsys.readouterr().out
    said = {w.strip(",.;()") for w in lines[0].split() if w.startswith("--")}
    assert all(flag in help_text for flag in said), said  # only flags export.py has


def test_skipped_images_are_explained_and_a_finished_runs_encoder_is_written_again(tmp_path, capsys, monkeypatch):
    """14 files (2 unreadable), batch 8: each epoch reads 8 of them, so the count changes and the line says why.
    The finished run, its encoder.pt deleted, writes it again on --resume; with another CPU thread
    count the resume says that it will not be bitwise the same."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        os.makedirs(f"data/train/{c}")
        for i in range(6):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
            open(f"data/train/{c}/{c}{i}.JPEG", "wb").write(buf.getvalue())
    open("data/train/a/garbage.JPEG", "wb").write(b"this is not an image")
    open("data/train/b/empty.JPEG", "wb").write(b"")
    args = ["--dataset", "imagefolder", "--data-dir", "data", "--image-size", "16", "--arch", "resnet18", "--width",
            "0.25", "--batch-size", "8", "--warmup-epochs", "1", "--workers", "0", "--epochs", "3", "--out", "run"]
    threads = torch.get_num_threads()
    try:
        code, out, err = run_main(pretrain, args, capsys, monkeypatch)
        assert code == 0, err[-2000:]
        assert "imagefolder: 14 images under data/train in 2 classes" in out
        records = [json.loads(line) for line in open("run/log.jsonl")]
        counts = [r["unreadable_images"] for r in records]
        assert sum(counts) > 0 and all(c <= 2 for c in counts), counts
        for r in records:
            if r["unreadable_images"]:
                assert (f"epoch {r['epoch']} done in" in out and f"; skipped {r['unreadable_images']} unreadable images "
                        "(among the 8 images read this epoch; the 6 of its shuffled order that do not fill a last "
                        "batch are not read, so the count can differ between epochs)" in out), out
        os.remove("run/encoder.pt")
        torch.set_num_threads(threads + 1)
        code, out, err = run_main(pretrain, [*args, "--resume"], capsys, monkeypatch)
        assert code == 0 and "nothing to do" in out and "wrote run/encoder.pt again from run/ckpt.pt" in out, err
        assert (f"was written by a process with {threads} CPU thread" in out
                and f"this one has {threads + 1}" in out and "OMP_NUM_THREADS" in out)
        assert read_checkpoint("run/encoder.pt")["meta"]["epoch"] == 3
    finally:
        torch.set_num_threads(threads)
