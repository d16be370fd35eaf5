"""python augment.py IMAGE... --out views.png: the grid of each image and its views, from a copy of
augment.py alone (it stays copyable), with the size the flags give and views that follow --seed."""
import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image

from conftest import ROOT, child_env


def test_views_picture_size_seed_and_flags(tmp_path):
    alone = tmp_path / "alone"  # augment.py with nothing of the project beside it
    alone.mkdir()
    shutil.copy(os.path.join(ROOT, "augment.py"), alone)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(alone / "a.png")
    Image.fromarray(rng.integers(0, 256, (50, 40, 3), dtype=np.uint8)).save(alone / "b.jpg")
    flags = ["--pairs", "2", "--image-size", "32"]
    # as a user runs it, in a folder that holds the copy alone
    result = subprocess.run([sys.executable, "augment.py", "a.png", "b.jpg", "--out", "first.png", *flags],
                            cwd=alone, env=child_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    # the other pictures from the same copy, in this process
    spec = importlib.util.spec_from_file_location("augment_copy", alone / "augment.py")
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)

    def grid(name, *more):
        copy.main([str(alone / "a.png"), str(alone / "b.jpg"), "--out", str(alone / name), *more])
        return np.asarray(Image.open(alone / name).convert("RGB"))

    first = np.asarray(Image.open(alone / "first.png").convert("RGB"))
    again, other = grid("again.png", *flags), grid("other.png", *flags, "--seed", "1")
    # two rows of 1 + 2 x 2 tiles of 32 px, 2 px of padding around each
    assert first.shape == (2 * 34 + 2, 5 * 34 + 2, 3)
    assert np.array_equal(first, again)
    tile = (slice(2, 34), slice(36, 68))  # the first view of the first image
    assert not np.array_equal(first[tile], other[tile])
    assert np.array_equal(first[2:34, 2:34], other[2:34, 2:34])  # the image itself does not depend on the seed
    plain = grid("plain.png", *flags, "--strength", "0", "--no-blur")  # crops and flips only: no colour change
    assert np.array_equal(first[:, :34], plain[:, :34]) and not np.array_equal(first, plain)
    small = grid("small.png", "--pairs", "1", "--image-size", "16")
    assert small.shape == (2 * 18 + 2, 3 * 18 + 2, 3)
