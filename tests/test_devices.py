"""The device every process really uses, checked on the CPU: each script's own main() on a patched
CUDA runtime (1 or 8 visible GPUs) under torchrun's variables, up to the DDP wrapper; what DDP,
SyncBatchNorm, the process group and the data loaders are given; no `local_rank` used as a device
anywhere; --compile under torchrun with one process; every command of tools/gpu_session.sh against
the scripts' own flags; and the /dev/shm check counting what the loaders really hand over."""
import ast
import functools
import importlib.util
import inspect
import os
import re
import shlex
import subprocess
import sys
import types

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

import data
import distill
import distributed
import finetune
import linear_eval
import pretrain
from conftest import ROOT
from model import ProjectionHead, build_encoder, save_encoder


class Built(Exception):
    """Raised by the patched DDP constructor (or a later stand-in): the run stops there."""


def _cuda(d):
    d = torch.device("cuda", d) if isinstance(d, int) else torch.device(d)
    assert d.type == "cuda", d
    return d


def _index(d):
    """A DDP device_ids entry (int or device) -> its GPU index."""
    return d if isinstance(d, int) else _cuda(d).index


@pytest.fixture
def fake_gpus(monkeypatch):
    """launch(visible, local_rank, rank, world): this process becomes rank `rank` of a torchrun job
    of `world` processes on a machine whose CUDA runtime shows it `visible` GPUs (capability 8.0).
    The process group, the moves to the GPU, SyncBatchNorm's conversion, the data loaders and
    DDP's constructor are recorded; DDP's constructor raises Built."""
    def launch(visible, local_rank, rank, world):
        rec = types.SimpleNamespace(set_device=[], init=[], to=[], sync_bn=[], ddp=[], loaders=[])
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: rec.set_device.append(_cuda(d)))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
        for key, value in dict(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=local_rank, LOCAL_WORLD_SIZE=world).items():
            monkeypatch.setenv(key, str(value))

        @functools.wraps(dist.init_process_group)  # keeps its signature: setup() looks for device_id there
        def init_process_group(*args, **kwargs):
            rec.init.append(inspect.signature(init_process_group).bind(*args, **kwargs).arguments)

        monkeypatch.setattr(dist, "init_process_group", init_process_group)
        monkeypatch.setattr(dist, "new_group", lambda *a, **k: object())
        monkeypatch.setattr(dist, "get_rank", lambda group=None: rank)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)
        monkeypatch.setattr(dist, "broadcast_object_list", lambda *a, **k: None)
        monkeypatch.setattr(dist, "barrier", lambda *a, **k: None)
        monkeypatch.setattr(distributed, "_PREPARE_GROUP", None)
        monkeypatch.setattr(distributed, "RANK0_GRACE_SECONDS", 0)

        module_to = nn.Module.to

        def to(self, *args, **kwargs):  # a move to a GPU is recorded; the module stays on the CPU
            device, dtype, _, memory_format = torch._C._nn._parse_to(*args, **kwargs)
            if device is None or device.type != "cuda":
                return module_to(self, *args, **kwargs)
            rec.to.append(device)
            rest = {k: v for k, v in (("dtype", dtype), ("memory_format", memory_format)) if v is not None}
            return module_to(self, **rest) if rest else self

        monkeypatch.setattr(nn.Module, "to", to)
        convert = nn.SyncBatchNorm.convert_sync_batchnorm  # bound to the class
        depth = [0]

        def convert_sync_batchnorm(module, process_group=None):
            if depth[0] == 0:  # the call itself, not its recursion into the children
                rec.sync_bn.append({"module": module, "process_group": process_group})
            depth[0] += 1
            try:
                return convert(module, process_group)
            finally:
                depth[0] -= 1

        monkeypatch.setattr(nn.SyncBatchNorm, "convert_sync_batchnorm", staticmethod(convert_sync_batchnorm))

        def ddp_init(self, module, device_ids=None, output_device=None, *args, **kwargs):
            rec.ddp.append({"module": module, "device_ids": device_ids, "output_device": output_device})
            raise Built

        monkeypatch.setattr(DistributedDataParallel, "__init__", ddp_init)
        make_loader = data.make_loader

        def recording_make_loader(*args, **kwargs):
            call = inspect.signature(make_loader).bind(*args, **kwargs)
            call.apply_defaults()
            rec.loaders.append({**call.arguments, "current_device": rec.set_device[-1] if rec.set_device else None})
            return make_loader(*args, **kwargs)

        monkeypatch.setattr(data, "make_loader", recording_make_loader)
        return rec

    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    yield launch
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
     torch.backends.cudnn.benchmark) = flags  # setup() sets them


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    """An encoder.pt as pretrain.py writes it, pretrained on the synthetic set at 16 px."""
    path = tmp_path_factory.mktemp("encoder") / "encoder.pt"
    torch.manual_seed(0)
    encoder = build_encoder("resnet18", width=0.25, cifar_stem=True)
    save_encoder(path, encoder, head=ProjectionHead(encoder.feature_dim), dataset="synthetic", data_dir="data",
                 image_size=16, synthetic_size=64, epoch=1)
    return path


def run_main(module, monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *map(str, argv)])
    return module.main()


SCRIPTS = ("pretrain", "linear_eval", "finetune")


def start(script, monkeypatch, tmp_path, encoder_file, extra=()):
    """main() of a script on 16 px synthetic images (batch 16, no data workers) until it raises Built
    -> what its finetune.make_loaders made afterwards (finetune makes its loaders after DDP)."""
    if script == "pretrain":
        argv = ["--dataset", "synthetic", "--arch", "resnet18", "--width", "0.25", "--image-size", "16",
                "--synthetic-size", "64", "--batch-size", "16", "--workers", "0", "--epochs", "1",
                "--knn-every", "0", "--out", tmp_path / "run", *extra]
        with pytest.raises(Built):
            run_main(pretrain, monkeypatch, argv)
        return
    common = [encoder_file, "--batch-size", "16", "--workers", "0", "--epochs", "1", "--out", tmp_path / "r.json"]
    if script == "linear_eval":
        # the test features pass runs the frozen encoder on the GPU before the classifier is built
        def stand_in(model, loader, device, *args, **kwargs):
            stand_in.devices.append(device)
            n = len(loader.dataset)
            return torch.zeros(n, model.feature_dim), torch.zeros(n, dtype=torch.long)
        stand_in.devices = []
        monkeypatch.setattr(linear_eval, "extract_features", stand_in)
        with pytest.raises(Built):
            run_main(linear_eval, monkeypatch, common)
        return stand_in.devices
    jobs = []
    build_data = finetune.build_data
    monkeypatch.setattr(finetune, "build_data", lambda *a: jobs.append(build_data(*a)) or jobs[-1])
    with pytest.raises(Built):
        run_main(finetune, monkeypatch, [*common, "--label-fraction", "1.0"])
    finetune.make_loaders(jobs[0])  # the script's own loaders, made as main() makes them after the model


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("visible,gpu", [(1, 0), (8, 3)])
def test_each_script_hands_ddp_the_gpu_it_uses(fake_gpus, monkeypatch, tmp_path, encoder_file, script, visible, gpu):
    """Rank 3 of 4 with LOCAL_RANK 3: with one visible GPU (srun --gpus-per-task=1, the project's
    tools/pretrain.sbatch) the process uses cuda:0, with 8 (torchrun on the node) cuda:3. DDP, the
    moves to the device, NCCL's binding and the loaders' pinned-memory device all name that GPU."""
    rec = fake_gpus(visible, local_rank=3, rank=3, world=4)
    devices = start(script, monkeypatch, tmp_path, encoder_file)
    want = torch.device("cuda", gpu)
    assert rec.set_device == [want]  # the current device: where the loaders' pin thread pins
    (init,) = rec.init
    assert init["backend"] == "nccl"
    if "device_id" in inspect.signature(dist.init_process_group).parameters:  # torch >= 2.3
        assert init["device_id"] == want
    assert rec.to and set(rec.to) == {want}, rec.to
    (ddp,) = rec.ddp
    assert [_index(d) for d in ddp["device_ids"]] == [gpu], ddp["device_ids"]
    assert ddp["output_device"] is None or _index(ddp["output_device"]) == gpu
    sync_bn = [m for m in ddp["module"].modules() if isinstance(m, nn.SyncBatchNorm)]
    plain_bn = [m for m in ddp["module"].modules() if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d)]
    if script == "linear_eval":  # DDP trains the linear classifier alone; the frozen encoder is not wrapped
        assert isinstance(ddp["module"], nn.Linear) and not rec.sync_bn
        assert devices == [want]
    else:  # global BN over the 4 processes: every BN layer converted, in the default (whole) group
        assert [c["process_group"] for c in rec.sync_bn] == [None]
        assert sync_bn and not plain_bn
    assert rec.loaders and all(c["pin_memory"] is True and c["rank"] == 3 and c["world"] == 4
                               and c["current_device"] == want for c in rec.loaders), rec.loaders


@pytest.mark.parametrize("script", ["pretrain", "finetune"])
def test_one_process_under_torchrun_gets_no_syncbatchnorm(fake_gpus, monkeypatch, tmp_path, encoder_file, script):
    """torchrun --nproc_per_node=1: DDP on cuda:0, plain BatchNorm (SyncBatchNorm would fall back to
    it in one process anyway), which torch.compile compiles."""
    rec = fake_gpus(1, local_rank=0, rank=0, world=1)
    start(script, monkeypatch, tmp_path, encoder_file)
    (ddp,) = rec.ddp
    assert [_index(d) for d in ddp["device_ids"]] == [0] and not rec.sync_bn
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in ddp["module"].modules())


def test_compile_is_accepted_for_one_process_under_torchrun(fake_gpus, monkeypatch, tmp_path, capsys):
    """torchrun --nproc_per_node=1 pretrain.py --compile (tools/gpu_session.sh compile) reaches the
    model; with two CUDA processes it is refused in one line."""
    fake_gpus(1, local_rank=0, rank=0, world=1)
    start("pretrain", monkeypatch, tmp_path, None, extra=["--compile"])
    fake_gpus(2, local_rank=0, rank=0, world=2)
    with pytest.raises(SystemExit) as e:
        run_main(pretrain, monkeypatch, ["--dataset", "synthetic", "--batch-size", "16", "--compile",
                                         "--out", tmp_path / "two"])
    assert e.value.code == 2
    assert "--compile with several CUDA processes" in capsys.readouterr().err


def test_resolve_amp_asks_about_the_gpu_it_is_given(monkeypatch, capsys):
    """torch.cuda.is_bf16_supported() answers for the current GPU (torch/cuda/__init__.py):
    --amp bf16 on a T4 at index 1, while an A100 at index 0 is current, is refused (torch 2.1-2.3,
    which do not emulate bf16) as on the T4 alone."""
    current, capability = [0], {0: (8, 0), 1: (7, 5)}

    class Device:  # torch.cuda.device: its GPU is the current one inside the block
        def __init__(self, device):
            self.index = _cuda(device).index

        def __enter__(self):
            self.before, current[0] = current[0], self.index

        def __exit__(self, *exc):
            current[0] = self.before

    monkeypatch.setattr(torch.cuda, "device", Device)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[_cuda(device).index])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: capability[current[0]][0] >= 8)
    assert distributed.resolve_amp("bf16", torch.device("cuda", 0))[0] == "bf16"
    with pytest.raises(SystemExit):
        distributed.resolve_amp("bf16", torch.device("cuda", 1))
    assert "has no bf16" in capsys.readouterr().err and current == [0]


# ----------------------------------------------------------------------------
# No LOCAL_RANK as a device, anywhere

# Calls whose arguments name a device: DDP, torch.device, .to() / .cuda(), torch.cuda.* (set_device,
# synchronize, memory_allocated, ...), and any keyword that takes a device.
DEVICE_CALLS = {"DistributedDataParallel", "DDP", "device", "to", "cuda", "set_device", "device_index"}
DEVICE_KEYWORDS = {"device", "device_ids", "output_device", "device_id", "map_location", "pin_memory_device"}
# Where the device is decided from LOCAL_RANK: setup(), through gpu_index().
DECIDES = {("distributed.py", "setup"), ("distributed.py", "gpu_index")}


def project_files():
    skip = {"tests/test_devices.py"}  # this file spells the patterns out
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("fixtures", "reference", "__pycache__")]
        for name in files:
            path = os.path.relpath(os.path.join(folder, name), ROOT)
            if name.endswith(".py") and path not in skip:
                yield path


def local_rank_as_device(source, path):
    """(line, code) of every place in `source` where local_rank feeds a device."""
    if "local_rank" not in source:
        return []
    found = []

    def mentions(node):
        return node is not None and any(getattr(n, "id", None) == "local_rank" or getattr(n, "attr", None) == "local_rank"
                                        for n in ast.walk(node))

    def visit(node, function):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        if (path, function) not in DECIDES:
            if isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if ((name in DEVICE_CALLS or ast.unparse(node.func).startswith("torch.cuda."))
                        and any(map(mentions, node.args))) \
                        or any(k.arg in DEVICE_KEYWORDS and mentions(k.value) for k in node.keywords):
                    found.append((node.lineno, ast.get_source_segment(source, node)))
            elif isinstance(node, ast.JoinedStr) and mentions(node) and any(
                    isinstance(v, ast.Constant) and "cuda:" in str(v.value) for v in node.values):
                found.append((node.lineno, ast.get_source_segment(source, node)))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(ast.parse(source), None)
    return found


def test_no_local_rank_is_used_as_a_device():
    """distributed.setup() decides the device (ctx.device) from LOCAL_RANK and the visible GPUs;
    nothing else turns LOCAL_RANK into a device: it is no GPU index where each process sees one."""
    found = {path: hits for path in project_files()
             if (hits := local_rank_as_device(open(os.path.join(ROOT, path)).read(), path))}
    assert not found, f"LOCAL_RANK used as a device (use ctx.device, which setup() chose): {found}"


@pytest.mark.parametrize("code", [
    "DDP(model, device_ids=[ctx.local_rank])",
    "DDP(model,\n    device_ids=[ctx.local_rank] if ctx.cuda else None)",
    "torch.nn.parallel.DistributedDataParallel(m, output_device=local_rank)",
    "torch.cuda.set_device(local_rank)",
    "x = x.to(f'cuda:{local_rank}')",
    "torch.device('cuda', args.local_rank)",
    "torch.cuda.synchronize(ctx.local_rank)",
    "torch.zeros(3, device=local_rank)",
    "torch.load(path, map_location=f'cuda:{local_rank}')",
])
def test_the_local_rank_scan_finds_each_form(code):
    assert local_rank_as_device(code, "script.py")
    assert not local_rank_as_device(code.replace("local_rank", "device.index"), "script.py")


# ----------------------------------------------------------------------------
# tools/gpu_session.sh runs what it says

SESSION = os.path.join(ROOT, "tools", "gpu_session.sh")
# The values the session's shell variables and loops take (every loop value is a valid flag value too).
SHELL_VALUES = {"workers": "16", "bench_workers": "16", "limit": "220", "out": "gpu_out", "runs": "/tmp/simclr_gpu_session", "size": "224",
                "arch": "resnet50", "mode": "compile"}


def session_commands():
    """Every `step NAME LIMIT COMMAND...` of gpu_session.sh -> COMMAND as argv, the shell's
    expansions done (the compile loop's ${extra[@]} as --compile)."""
    text = open(SESSION).read().replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("step "):
            continue
        line = line.replace('${extra[@]+"${extra[@]}"}', "--compile")
        line = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: SHELL_VALUES[m.group(1) or m.group(2)], line)
        commands.append(shlex.split(line)[3:])
    return commands


def load_tool(path):
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_gpu_session_command_takes_its_scripts_flags(monkeypatch):
    """Each python command of tools/gpu_session.sh parses with its script's own argparse parser, and
    each pretrain.py run under torchrun passes pretrain.py's checks for that many processes on CUDA
    (--compile with one process is accepted)."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # bench.py names the GPU it measures
    commands = session_commands()
    assert len(commands) >= 10, commands
    scripts = set()
    for argv in commands:
        assert argv[0] == "python", argv
        rest, processes = argv[1:], 1
        if rest[:2] == ["-m", "pytest"]:
            paths = [a for a in rest[2:] if not a.startswith("-")]
            assert paths and all(os.path.exists(os.path.join(ROOT, p)) for p in paths), argv
            continue
        if rest[:2] == ["-m", "torch.distributed.run"]:
            first = next(i for i, a in enumerate(rest) if a.endswith(".py"))  # the launcher's options before it
            launcher, rest = rest[2:first], rest[first:]
            processes = int(next(a.split("=")[1] for a in launcher if a.startswith("--nproc_per_node=")))
        script, flags = rest[0], rest[1:]
        scripts.add(script)
        assert os.path.exists(os.path.join(ROOT, script)), argv
        if script in ("bench.py", "tools/profile_step.py"):
            module = load_tool(os.path.join(ROOT, script))
            monkeypatch.setattr(sys, "argv", [script, *flags])
            module.get_args()
        elif script == "pretrain.py":
            args = pretrain.get_args(flags)
            ctx = distributed.Context(ddp=processes > 1 or "torch.distributed.run" in argv, rank=0, world=processes,
                                      local_rank=0, device=torch.device("cuda", 0))
            pretrain.check_compile(args, ctx)  # exits (SystemExit) where it refuses
        else:
            {"linear_eval.py": linear_eval, "finetune.py": finetune, "distill.py": distill}[script].get_args(flags)
    assert scripts == {"bench.py", "tools/profile_step.py", "pretrain.py", "linear_eval.py", "finetune.py", "distill.py"}
    assert any("--compile" in argv for argv in commands)


def fake_session_tools(tmp_path, shm_free=None):
    """A bin/ folder for gpu_session.sh on the CPU: 16 CPUs, an H200, df saying `shm_free` bytes
    (None: df fails), and a `timeout` that appends its arguments to tmp_path/timeouts and runs nothing
    -> the environment to run the script in."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fakes = {"nproc": "echo 16", "nvidia-smi": "echo 'NVIDIA H200, 143771 MiB'",
             "df": "echo Avail; echo ' %s'" % shm_free if shm_free else "exit 1",
             "timeout": f'echo "$*" >> {tmp_path / "timeouts"}'}
    for name, body in fakes.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(tmp_path / "out"), "PYTHON": "true",
            "TMPDIR": str(tmp_path)}


@pytest.mark.parametrize("part", ["tests", "profile", "runs", "compile", "suite"])
def test_each_gpu_session_part_fits_one_command(tmp_path, part):
    """The limits gpu_session.sh gives a part's commands (read off the `timeout` each one runs under)
    add up to 560 s or less, so that the part with its kill grace fits one 600 s device command."""
    result = subprocess.run(["bash", SESSION, part], env=fake_session_tools(tmp_path), capture_output=True, text=True,
                            timeout=60)
    steps = [line.split() for line in (tmp_path / "timeouts").read_text().splitlines() if line.startswith("--signal=")]
    limits = [int(argv[2]) for argv in steps]  # --signal=S --kill-after=10 LIMIT COMMAND...
    assert steps and all(argv[1] == "--kill-after=10" for argv in steps), result.stdout + result.stderr
    assert sum(limits) <= 560, limits
    assert len(steps) == {"tests": 2, "profile": 4, "runs": 4, "compile": 4, "suite": 1}[part], steps


@pytest.mark.parametrize("shm_free,workers,bench_workers", [
    (50 * 10**9, 16, 16), (10 * 10**9, 16, 8), (10**9, 3, 0), (64 * 2**20, 0, 0), (None, 16, 16)])
def test_gpu_session_gives_the_workers_what_dev_shm_holds(tmp_path, shm_free, workers, bench_workers):
    """On 16 CPUs, gpu_session.sh runs 16 data workers, fewer where /dev/shm cannot hold two of their
    batches each (154 MB of uint8 crops; bench.py's float32 views 4x), so a small /dev/shm does not
    cost a whole part (data.check_shared_memory would stop each script); no answer from df: 16."""
    result = subprocess.run(["bash", SESSION, "no-such-part"], env=fake_session_tools(tmp_path, shm_free),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "unknown part no-such-part" in result.stderr, result.stderr
    record = (tmp_path / "out" / "gpu.txt").read_text()
    assert f"16 CPUs, {workers} data workers ({bench_workers} for bench.py)" in record, record


# ----------------------------------------------------------------------------
# /dev/shm: what the loaders really hand over

IMAGE = 16  # px


def fake_shm(monkeypatch, tmp_path, free):
    """/dev/shm as tmp_path/shm with `free` bytes -> its path; every other path keeps its real file
    system (the scripts also ask os.statvfs about their --out)."""
    shm = tmp_path / "shm"
    shm.mkdir(exist_ok=True)
    monkeypatch.setattr(data, "SHM", str(shm))
    real = os.statvfs
    monkeypatch.setattr(os, "statvfs", lambda path: types.SimpleNamespace(f_bavail=free, f_frsize=1)
                        if str(path) == str(shm) else real(path))
    return shm


def labelled_batch(batch, image_bytes):
    """Bytes of a batch of (images, int64 label, int64 unreadable flag), counted by hand."""
    return batch * (image_bytes + 8 + 8)


@pytest.mark.parametrize("transform,image_bytes", [
    ("crops", 2 * 3 * IMAGE * IMAGE),  # two uint8 crops (--distort-on device)
    ("views", 2 * 3 * IMAGE * IMAGE * 4),  # two float32 views (--distort-on workers)
    ("eval", 3 * IMAGE * IMAGE),  # one uint8 image (evaluation)
])
@pytest.mark.parametrize("pinned", [False, True])
def test_make_loader_counts_the_batches_in_shared_memory(monkeypatch, tmp_path, transform, image_bytes, pinned):
    """workers x 2 prefetched batches, plus the 2 the training loop may hold when they are not pinned
    away, of the bytes the transform really makes; LOCAL_WORLD_SIZE processes on the node."""
    from augment import EvalTransform, SimCLRViews
    views = SimCLRViews(IMAGE)
    make = {"crops": views.crops, "views": views, "eval": EvalTransform(IMAGE, train=False)}[transform]
    dataset = data.SeededTransform(data.SyntheticImages(32, IMAGE), make)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    need = 3 * (2 * 2 + (0 if pinned else 2)) * labelled_batch(8, image_bytes)
    fake_shm(monkeypatch, tmp_path, need)
    data.make_loader(dataset, 8, train=True, workers=2, pin_memory=pinned)
    fake_shm(monkeypatch, tmp_path, need - 1)
    with pytest.raises(data.DataError) as e:
        data.make_loader(dataset, 8, train=True, workers=2, pin_memory=pinned)
    assert "--shm-size=" in str(e.value) and "--workers 1 or fewer" in str(e.value) and "\n" not in str(e.value)
    data.make_loader(dataset, 8, train=True, workers=0, pin_memory=pinned)  # no workers: nothing to check


def test_every_dataloader_checks_shared_memory():
    """Every loader goes through data.make_loader, which checks /dev/shm, or checks it itself
    (tools/compare_lightly.py's run of lightly's pipeline)."""
    found = [path for path in project_files() if not path.startswith("tests/") and path != "data.py"
             and re.search(r"\bDataLoader\(", text := open(os.path.join(ROOT, path)).read())
             and "check_shared_memory(" not in text]
    assert not found


@pytest.mark.parametrize("script,stop,image_bytes", [
    ("linear_eval", "extract_features", 3 * IMAGE * IMAGE),  # uint8 evaluation images
    ("finetune", "print_start", 3 * IMAGE * IMAGE),  # uint8 crop + flip
    ("pretrain", "print_start", 2 * 3 * IMAGE * IMAGE * 4),  # CPU: float views made by the workers
])
def test_scripts_count_their_loaders_batches(monkeypatch, tmp_path, encoder_file, script, stop, image_bytes):
    """On the CPU with one worker and a batch of 16: /dev/shm of exactly (1 x 2 + 2) batches as the
    loaders make them is enough, one byte less is refused in one line."""
    module = {"linear_eval": linear_eval, "finetune": finetune, "pretrain": pretrain}[script]
    monkeypatch.setattr(module, stop, lambda *a, **k: (_ for _ in ()).throw(Built()))  # the loaders are made
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    if script == "pretrain":
        argv = ["--dataset", "synthetic", "--arch", "resnet18", "--width", "0.25", "--image-size", str(IMAGE),
                "--synthetic-size", "64", "--batch-size", "16", "--workers", "1", "--epochs", "1",
                "--knn-every", "0"]
    else:
        argv = [encoder_file, "--batch-size", "16", "--workers", "1", "--epochs", "1"]
        argv += ["--label-fraction", "1.0"] if script == "finetune" else []
    need = (1 * 2 + 2) * labelled_batch(16, image_bytes)
    for free, out in ((need, "fits"), (need - 1, "short")):
        fake_shm(monkeypatch, tmp_path, free)
        if out == "fits":
            with pytest.raises(Built):
                run_main(module, monkeypatch, argv + ["--out", tmp_path / f"{out}.out"])
        else:
            with pytest.raises(data.DataError, match="data workers"):
                run_main(module, monkeypatch, argv + ["--out", tmp_path / f"{out}.out"])


@pytest.mark.parametrize("tool", ["bench.py", "tools/profile_step.py"])
def test_bench_and_profile_step_check_shared_memory(monkeypatch, tmp_path, capsys, tool):
    shm = fake_shm(monkeypatch, tmp_path, 1000)  # bytes free: less than one batch (2 images x 2 views of 8 px, float32)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    module = load_tool(os.path.join(ROOT, tool))
    flags = ["--device", "cpu", "--arch", "resnet18", "--image-size", "8", "--batch-size", "2", "--steps", "1",
             "--workers", "2"] + (["--only", "step"] if tool == "bench.py" else [])
    monkeypatch.setattr(sys, "argv", [tool, *flags])
    if tool == "bench.py":  # its step section times (a), batches already on the device, before the loaders
        monkeypatch.setattr(module, "train_step", lambda *a, **k: None)
    with pytest.raises(SystemExit) as e:
        module.main()
    text = str(e.value.code) + capsys.readouterr().out
    assert f"{shm} has 0 MiB free" in text and "--shm-size=" in text, text
