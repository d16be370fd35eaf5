"""TensorBoard scalars for pretrain.py, linear_eval.py and finetune.py (--tensorboard).

Written through torch.utils.tensorboard by rank 0 only, and flushed at every log line, so
`tensorboard --logdir OUT/tensorboard` follows a run as it goes. tensorboard is an optional
dependency: without it --tensorboard stops at start with one line that says how to install it.

    board = Board("runs/x/tensorboard", enabled=args.tensorboard, master=ctx.master)
    board.add(step, **{"train/loss": 5.1, "train/lr": 4.8})   # None values are left out
"""
import os

from distributed import fail
from output import writing


def results_folder(results_path):
    """Where an evaluation script's scalars go: DIR/tensorboard/NAME for results DIR/NAME.json, so that
    `tensorboard --logdir DIR/tensorboard` shows pretraining (DIR/tensorboard) and its evaluations together."""
    folder, name = os.path.split(os.path.abspath(results_path))
    return os.path.join(folder, "tensorboard", os.path.splitext(name)[0])


class Board:
    def __init__(self, folder, enabled, master=True):
        self.writer, self.folder, self.summary_writer = None, folder, None
        if not enabled:
            return
        try:  # on every rank, so that a missing package stops them all at start
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            fail("--tensorboard needs the tensorboard package: pip install tensorboard")
        if master:  # the folder is made at the first add(), once the run's inputs are checked
            self.summary_writer = SummaryWriter

    def add(self, step, **scalars):
        """Write the scalars (tag: value) at `step` and flush them to disk."""
        if self.summary_writer is None:
            return
        with writing(self.folder, "--out"):
            if self.writer is None:
                self.writer = self.summary_writer(self.folder)
            for tag, value in scalars.items():
                if value is not None:
                    self.writer.add_scalar(tag, float(value), step)
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            with writing(self.folder, "--out"):
                self.writer.close()
