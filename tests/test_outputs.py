"""Write failures: an --out on a read-only file system, below a file, or on a disk that fills up is
one line that says what to do, at start where it can be told there, and later without losing what
was saved or shown, and without leaving a temporary file. Where this machine allows mounting (root),
a read-only bind mount and a small tmpfs are the real thing; elsewhere the writes are refused by
patched functions (open, os.open, os.makedirs, os.replace) with the same error numbers."""
import builtins
import errno
import json
import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

import export
import finetune
import linear_eval
import model
import output
import pretrain
from conftest import TINY
from inprocess import error_lines, run_main
from model import build_encoder, read_checkpoint, save_atomic, save_encoder


def _mount(*args):
    """mount ARGS -> whether it worked (root on a machine that allows it; TEST_WITHOUT_MOUNTS=1 tries the fallback)."""
    if os.environ.get("TEST_WITHOUT_MOUNTS") or os.geteuid() != 0:
        return False
    return subprocess.run(["mount", *map(str, args)], capture_output=True).returncode == 0


def _umount(path):
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def refuse_writes(monkeypatch, prefix, code):
    """Every file or folder made or written under prefix fails with OSError(code), as a read-only
    or full file system would (the fallback where mounting is not allowed)."""
    prefix = os.path.abspath(prefix)
    real_open, real_os_open, real_makedirs = builtins.open, os.open, os.makedirs

    def guard(path):
        if os.path.abspath(os.fsdecode(path)).startswith(prefix):
            raise OSError(code, os.strerror(code), os.fsdecode(path))

    def fake_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
            guard(file)
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            guard(path)
        return real_os_open(path, flags, *args, **kwargs)

    def fake_makedirs(name, *args, **kwargs):
        if not os.path.isdir(name):
            guard(name)
        return real_makedirs(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "makedirs", fake_makedirs)


class FullDisk:
    """A file whose writes succeed `room` times, then fail as on a full disk."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, b):
        self.room -= 1
        if self.room < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(b)

    def flush(self):
        self.f.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def full_disk_for_torch_save(monkeypatch, room=2):
    """model.save_atomic's files (opened through `open` in model.py) fill up after `room` writes."""
    monkeypatch.setattr(model, "open", lambda path, mode: FullDisk(builtins.open(path, mode), room), raising=False)


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A folder on a read-only file system: a read-only bind mount, or refused writes."""
    src, ro = tmp_path / "ro_src", tmp_path / "ro"
    src.mkdir()
    ro.mkdir()
    if _mount("--bind", src, ro):
        if _mount("-o", "remount,bind,ro", ro):
            yield ro
            _umount(ro)
            return
        _umount(ro)
    refuse_writes(monkeypatch, ro, errno.EROFS)
    yield ro


@pytest.fixture
def encoder_file(tmp_path):
    path = tmp_path / "enc.pt"
    save_encoder(path, build_encoder("resnet18", width=0.25, cifar_stem=True), dataset="synthetic", image_size=16,
                 synthetic_size=20)
    return path


EVAL = ["--workers", "0", "--epochs", "1", "--synthetic-size", "20"]


def test_unwritable_out_is_one_line_before_any_work(read_only, tmp_path, encoder_file, capsys, monkeypatch):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    cases = [  # (script, args, the line's text)
        (pretrain, [*TINY, "--epochs", "1", "--out", read_only / "run"], "read-only file system"),
        (pretrain, [*TINY, "--epochs", "1", "--out", read_only], "read-only file system"),  # the folder exists
        (pretrain, [*TINY, "--epochs", "1", "--out", blocker / "run"], f"{blocker} is a file, not a folder"),
        (pretrain, [*TINY, "--epochs", "1", "--out", blocker], f"--out {blocker} is a file, not a folder"),
        (linear_eval, [encoder_file, *EVAL, "--out", read_only / "r.json"], "read-only file system"),
        (linear_eval, [encoder_file, *EVAL, "--out", blocker / "r.json"], f"{blocker} is a file, not a folder"),
        (linear_eval, [encoder_file, *EVAL, "--out", tmp_path], f"--out {tmp_path} is a folder"),
        (finetune, [encoder_file, *EVAL, "--out", read_only / "f.json"], "read-only file system"),
        (finetune, [encoder_file, *EVAL, "--out", blocker / "sub" / "f.json"], f"{blocker} is a file, not a folder"),
        (export, [encoder_file, "--to", "detectron2", read_only / "d.pkl"], "read-only file system"),
        (export, [encoder_file, "--to", "detectron2", blocker / "d.pkl"], f"{blocker} is a file, not a folder"),
    ]
    for script, args, text in cases:
        code, out, err = run_main(script, args, capsys, monkeypatch)
        lines = error_lines(err, script.__name__)
        assert code == 2 and len(lines) == 1 and text in lines[0], (script.__name__, args, err)
        assert "choose another" in lines[0] or "must name a file" in lines[0]
        assert "Traceback" not in err and "epoch 1" not in out and "top-1" not in out  # nothing was computed
    assert os.listdir(read_only) == [] and blocker.read_text() == "a file where a folder should be"


def test_a_disk_that_fills_up_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    """A tmpfs with room for the first epoch's checkpoints but not for a second ckpt.pt beside them
    (or, where mounting is not allowed, the third save refused with ENOSPC)."""
    # encoder.pt takes about the model's bytes M, ckpt.pt 2M (momentum); the second ckpt.pt is written
    # beside the first, so 3.5M lets epoch 1 save and makes epoch 2's fail
    m = model.tensor_bytes(model.SimCLR(build_encoder("resnet18", width=0.25, cifar_stem=True),
                                        model.ProjectionHead(128)).state_dict())
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = _mount("-t", "tmpfs", "-o", f"size={(7 * m // 2) // 4096 * 4096 + 65536}", "tmpfs", disk)
    if not mounted:
        saves, real = [], model.save_atomic

        def third_save_fails(obj, path):
            saves.append(path)
            if len(saves) == 3:  # epoch 2's ckpt.pt
                full_disk_for_torch_save(monkeypatch)
            return real(obj, path)
        monkeypatch.setattr(model, "save_atomic", third_save_fails)
        monkeypatch.setattr(pretrain, "save_atomic", third_save_fails)
    try:
        code, out, err = run_main(pretrain, [*TINY, "--synthetic-size", "32", "--epochs", "2", "--knn-every", "0",
                                             "--out", disk / "run"], capsys, monkeypatch)
        lines = error_lines(err, "pretrain")
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
        assert f"no space left on device writing {disk / 'run' / 'ckpt.pt'} (about " in lines[0]
        assert "needed" in lines[0] and "free there); free some space or choose another --out" in lines[0], lines[0]
        assert f"{disk / 'run' / 'ckpt.pt'} holds the run after epoch 1 (--resume continues from there)" in lines[0]
        assert "epoch 1 done" in out and "epoch 2 done" not in out
        assert read_checkpoint(disk / "run" / "ckpt.pt")["epoch"] == 1  # the last checkpoint, whole
        assert read_checkpoint(disk / "run" / "encoder.pt")["meta"]["epoch"] == 1
        assert sorted(os.listdir(disk / "run")) == ["ckpt.pt", "encoder.pt", "log.jsonl"]  # no temporary file
    finally:
        if mounted:
            _umount(disk)


def test_a_full_disk_at_start_is_one_line_with_the_bytes(tmp_path, capsys, monkeypatch):
    disk = tmp_path / "small"
    disk.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=256k", "tmpfs", disk):
        pytest.skip("needs a tmpfs mount (root)")  # the refused-write fallback is covered above
    try:
        code, out, err = run_main(pretrain, [*TINY, "--epochs", "1", "--out", disk / "run"], capsys, monkeypatch)
        lines = error_lines(err, "pretrain")
        assert code == 2 and len(lines) == 1 and "no space left on device for" in lines[0], err
        m = model.tensor_bytes(model.SimCLR(build_encoder("resnet18", width=0.25, cifar_stem=True),
                                            model.ProjectionHead(128)).state_dict())
        assert f"the checkpoints need about {output.size_text(3 * m)}, 262.1 kB free there" in lines[0], lines[0]
        assert "epoch 1" not in out
    finally:
        _umount(disk)


@pytest.mark.parametrize("script", [linear_eval, finetune])
def test_results_are_printed_before_a_write_that_fails(script, tmp_path, encoder_file, capsys, monkeypatch):
    real_replace = os.replace

    def full(src, dst):
        if str(dst).endswith(".json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", full)
    args = [encoder_file, *EVAL, "--out", tmp_path / "res.json"] + (
        ["--cached-features"] if script is linear_eval else ["--label-fraction", "1"])
    code, out, err = run_main(script, args, capsys, monkeypatch)
    lines = error_lines(err, script.__name__)
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert f"no space left on device writing {tmp_path / 'res.json'} (about " in lines[0]
    assert "top-1 " in out and "%" in out.split("top-1 ")[1]  # the result was shown before the write
    kept = ["res.ckpt.pt", "res.pt"] if script is finetune else []  # finetune's network, saved every epoch, is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc.pt", *kept]  # no results file, no temporary one


def test_export_features_write_failure_leaves_nothing(tmp_path, encoder_file, capsys, monkeypatch):
    (tmp_path / "photos").mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(tmp_path / "photos" / f"{i}.png")
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only"))
                        if str(dst).endswith(".npz") else real_replace(src, dst))
    code, out, err = run_main(export, [encoder_file, "--to", "features", "--data-dir", tmp_path / "photos",
                                       "--workers", "0", tmp_path / "out" / "f.npz"], capsys, monkeypatch)
    lines = error_lines(err, "export")
    assert code == 2 and len(lines) == 1 and "read-only file system; choose another OUT" in lines[0], err
    assert os.listdir(tmp_path / "out") == []  # the folder was made at start; no temporary file is left


def test_save_atomic_names_the_cause_and_keeps_the_file(tmp_path, monkeypatch):
    """torch's zip writer reports a full disk as 'unexpected pos N vs M'; save_atomic raises the
    OSError itself, and neither the previous file nor a temporary one is touched or left."""
    path = tmp_path / "state.pt"
    save_atomic({"w": torch.ones(3)}, path)
    before = path.read_bytes()
    full_disk_for_torch_save(monkeypatch)
    with pytest.raises(OSError) as e:
        save_atomic({"w": torch.ones(1000)}, path)
    assert e.value.errno == errno.ENOSPC and path.read_bytes() == before and os.listdir(tmp_path) == ["state.pt"]
    text = output.failure_text(e.value, str(path), needed=4000)
    assert text.startswith(f"no space left on device writing {path} (about 4.0 kB needed, ")


def test_append_line_leaves_no_partial_line(tmp_path, monkeypatch):
    path = tmp_path / "log.jsonl"
    output.append_line(str(path), json.dumps({"epoch": 1}))
    real_write = os.write

    def half_then_full(fd, data):
        if len(data) > 4:
            return real_write(fd, data[:4])
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(output.WriteError, match="no space left on device writing .*log.jsonl"):
        output.append_line(str(path), json.dumps({"epoch": 2, "loss": 1.0}))
    monkeypatch.undo()
    assert path.read_text() == '{"epoch": 1}\n'
