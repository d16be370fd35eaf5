"""Shared helpers: the repository on sys.path, and running the scripts as users do."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Small, fast pretraining settings on generated data (CPU).
TINY = ["--dataset", "synthetic", "--arch", "resnet18", "--width", "0.25", "--synthetic-size", "64",
        "--batch-size", "16", "--log-every", "2", "--warmup-epochs", "1", "--workers", "0"]


def run_script(args, cwd, torchrun=0, timeout=600):
    """Run `python SCRIPT ARGS` (or torchrun with that many processes) -> CompletedProcess."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1" if torchrun else os.environ.get("OMP_NUM_THREADS", "2"))
    script = os.path.join(ROOT, args[0])
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}", script]
    else:
        cmd = [sys.executable, script]
    return subprocess.run(cmd + [str(a) for a in args[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def run(tmp_path):
    def _run(*args, torchrun=0, check=True):
        result = run_script(list(args), tmp_path, torchrun=torchrun)
        if check and result.returncode != 0:
            raise AssertionError(f"{args} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result
    return _run
