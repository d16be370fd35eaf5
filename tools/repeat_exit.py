"""Run tiny two-process torchrun jobs of pretrain.py and finetune.py many times and count
the runs that never exit (the teardown hang of issue 13), the runs that fail, and the
runs whose exit the teardown watchdog had to force.

    python tools/repeat_exit.py --runs 20                       # this interpreter's torch
    python tools/repeat_exit.py --runs 20 --python /venvs/torch2.1.2/bin/python

A run that has not exited after --timeout seconds counts as hung; its whole process
group is then killed with SIGKILL, so nothing is left behind.
"""
import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset", "synthetic", "--arch", "resnet18", "--width", "0.25", "--synthetic-size", "64",
        "--batch-size", "16", "--log-every", "2", "--warmup-epochs", "1", "--workers", "0"]
JOBS = {
    "pretrain.py": [*TINY, "--epochs", "1", "--out", "run"],
    "finetune.py": ["run/encoder.pt", "--label-fraction", "0.5", "--workers", "0", "--batch-size", "16",
                    "--epochs", "1", "--out", "ft.json"],
}
WATCHDOG_LINE = "teardown did not finish within"  # what distributed.py's watchdog prints when it fires


def torchrun(python, script, args, cwd, timeout):
    """-> (exit status or None if it hung, seconds, output)."""
    cmd = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", os.path.join(ROOT, script)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    t0 = time.time()
    proc = subprocess.Popen(cmd + args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, time.time() - t0, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks: a hung rank ignores SIGTERM
        out, _ = proc.communicate()
        return None, time.time() - t0, out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--python", default=sys.executable, help="interpreter whose torch runs the jobs")
    p.add_argument("--runs", type=int, default=20, help="runs of each script")
    p.add_argument("--timeout", type=float, default=180, help="seconds after which a run counts as hung")
    args = p.parse_args()
    version = subprocess.run([args.python, "-c", "import torch, torchvision; print(torch.__version__, "
                              "torchvision.__version__)"], capture_output=True, text=True).stdout.strip()
    counts = {script: {"ok": 0, "failed": 0, "hung": 0, "watchdog": 0, "seconds": 0.0} for script in JOBS}
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as cwd:
            for script, script_args in JOBS.items():
                code, seconds, out = torchrun(args.python, script, script_args, cwd, args.timeout)
                c = counts[script]
                c["seconds"] += seconds
                c["watchdog"] += WATCHDOG_LINE in out
                c["hung" if code is None else "ok" if code == 0 else "failed"] += 1
                status = "HUNG" if code is None else f"exit {code}"
                print(f"run {i + 1}/{args.runs} {script}: {status} in {seconds:.1f}s"
                      f"{' (watchdog fired)' if WATCHDOG_LINE in out else ''}", flush=True)
                if code != 0:
                    print(out[-2000:], flush=True)
                    if script == "pretrain.py" and code is not None:
                        break  # finetune needs the encoder
    for script, c in counts.items():
        print(f"torch/torchvision {version}: {script} x{args.runs}: {c['ok']} ok, {c['failed']} failed, "
              f"{c['hung']} hung, watchdog fired {c['watchdog']} times, {c['seconds'] / args.runs:.1f} s per run",
              flush=True)
    sys.exit(1 if any(c["ok"] != args.runs for c in counts.values()) else 0)


if __name__ == "__main__":
    main()
