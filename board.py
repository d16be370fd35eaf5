"""TensorBoard scalars for pretrain.py, linear_eval.py and finetune.py (--tensorboard).

Written through torch.utils.tensorboard by rank 0 only, and flushed at every log line, so
`tensorboard --logdir OUT/tensorboard` follows a run as it goes. tensorboard is an optional
dependency: without it --tensorboard stops at start with one line that says how to install it.

    board = Board("runs/x/tensorboard", enabled=args.tensorboard, master=ctx.master)
    board.add(step, **{"train/loss": 5.1, "train/lr": 4.8})   # None values are left out
"""
import os

from distributed import fail


def results_folder(results_path):
    """Where an evaluation script's scalars go: DIR/tensorboard/NAME for results DIR/NAME.json, so that
    `tensorboard --logdir DIR/tensorboard` shows pretraining (DIR/tensorboard) and its evaluations together."""
    folder, name = os.path.split(os.path.abspath(results_path))
    return os.path.join(folder, "tensorboard", os.path.splitext(name)[0])


class Board:
    def __init__(self, folder, enabled, master=True):
        self.writer = None
        if not enabled:
            return
        try:  # on every rank, so that a missing package stops them all at start
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            fail("--tensorboard needs the tensorboard package: pip install tensorboard")
        if master:
            self.writer = SummaryWriter(folder)

    def add(self, step, **scalars):
        """Write the scalars (tag: value) at `step` and flush them to disk."""
        if self.writer is None:
            return
        for tag, value in scalars.items():
            if value is not None:
                self.writer.add_scalar(tag, float(value), step)
        self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
