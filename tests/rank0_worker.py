"""distributed.rank0_first under torchrun with a collective timeout of 3 s, while a
preparation takes 8 s: on rank 0 ("rank0"), on rank 1 after rank 0's ("rank1"), or rank 0
dies during its own ("die"). Prints "prepared, all_reduce 3.0" when both the wait and a
collective of the default group afterwards work.

    torchrun --nproc_per_node=2 tests/rank0_worker.py rank0|rank1|die
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distributed import all_sum, rank0_first, run, setup  # noqa: E402

SLOW_SECONDS = 8


def main():
    mode = sys.argv[1]
    ctx = setup(timeout_minutes=3 / 60)

    def build():
        if (mode == "rank0" and ctx.master) or (mode == "rank1" and ctx.rank == 1):
            time.sleep(SLOW_SECONDS)
        if mode == "die" and ctx.master:
            time.sleep(2)
            os._exit(9)
        return ctx.rank + 1.0

    value = rank0_first(ctx, build, ValueError)
    total = all_sum(torch.tensor([value]), ctx)
    print(f"rank {ctx.rank} prepared, all_reduce {total.item()}", flush=True)


if __name__ == "__main__":
    run(main, (ValueError,))
