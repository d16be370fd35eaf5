"""Image folders load as uint8 tensors (JPEGs decoded by torchvision, other files by PIL), with
PIL's pixels; unreadable files are still skipped and flagged, or an error with strict; image
batches reach the device as uint8 and become float there (features.to_device)."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

import data
from augment import EvalTransform, SimCLRViews
from features import to_device


def write_folder(root, bad=()):
    """train/{a,b}/ with 3 JPEGs each (one of them grayscale), a PNG, and `bad` files in train/a."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / "train" / c).mkdir(parents=True)
        for i in range(3):
            img = Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8))
            (img.convert("L") if i == 2 else img).save(root / "train" / c / f"{c}{i}.JPEG", quality=90)
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / "train" / "b" / "p.png")
    for name, content in dict(bad).items():
        (root / "train" / "a" / name).write_bytes(content)


def test_image_folder_gives_pils_pixels_as_uint8_tensors(tmp_path):
    write_folder(tmp_path)
    folder = data.build_dataset("imagefolder", str(tmp_path), "train")
    assert len(folder) == 7
    for path, label in folder.samples:
        x, y = folder[folder.samples.index((path, label))]
        assert y == label and x.dtype == torch.uint8 and x.shape[0] == 3
        assert torch.equal(x.permute(1, 2, 0), torch.from_numpy(np.array(Image.open(path).convert("RGB"))))


def test_unreadable_files_are_skipped_and_flagged_or_stop_with_strict(tmp_path, capsys):
    good = io.BytesIO()
    Image.new("RGB", (16, 16)).save(good, "JPEG")
    bad = {"a7_truncated.JPEG": good.getvalue()[:60], "a8_garbage.JPEG": b"\xff\xd8\xff not a JPEG after all",
           "a9_empty.JPEG": b""}
    write_folder(tmp_path, bad)
    folder = data.build_dataset("imagefolder", str(tmp_path), "train")
    names = [p.rsplit("/", 1)[1] for p, _ in folder.samples]
    views = data.SeededTransform(folder, SimCLRViews(16, blur=False).crops)
    for name in bad:
        (x1, x2), _, unreadable = views[(0, names.index(name))]  # replaced by the next readable image
        assert unreadable == 1 and x1.shape == (3, 16, 16)
    err = capsys.readouterr().err
    for name in bad:
        assert err.count(f"skipping unreadable image {tmp_path}/train/a/{name} (") == 1, err  # once each
    assert views[(0, names.index("a0.JPEG"))][2] == 0
    strict = data.SeededTransform(folder, EvalTransform(16, train=False), strict=True)
    with pytest.raises(data.DataError, match="cannot read .*a7_truncated.JPEG"):
        strict[(0, names.index("a7_truncated.JPEG"))]


def test_uint8_batches_become_float_on_the_device():
    x = torch.randint(0, 256, (4, 3, 5, 6), dtype=torch.uint8)
    y = to_device(x, torch.device("cpu"))
    assert y.dtype == torch.float32 and torch.equal(y, x.float() / 255)
    z = to_device(x, torch.device("cpu"), channels_last=True)
    assert z.is_contiguous(memory_format=torch.channels_last) and torch.equal(z, y)
    f = torch.rand(2, 3, 4, 4)
    assert to_device(f, torch.device("cpu")) is f  # a float batch is only moved
    assert to_device(f, torch.device("cpu"), channels_last=True).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_batches_are_the_stacked_views_in_channels_last(tmp_path, workers):
    """collate stacks the channels-last views by their pixels: the batch equals stacking them
    as they are, and labels and flags collate as default_collate does."""
    write_folder(tmp_path)
    folder = data.build_dataset("imagefolder", str(tmp_path), "train")
    views = data.SeededTransform(folder, SimCLRViews(24, blur=False).crops, seed=3)
    loader = data.make_loader(views, 7, train=False, workers=workers)
    (x1, x2), labels, unreadable = next(iter(loader))
    for i, x in enumerate((x1, x2)):
        assert x.shape == (7, 3, 24, 24) and x.dtype == torch.uint8 and x.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(x, torch.stack([views[(0, j)][0][i] for j in range(7)]))
    assert labels.tolist() == [y for _, y in folder.samples] and unreadable.tolist() == [0] * 7
    plain = data.make_loader(data.SeededTransform(folder, EvalTransform(16, train=False)), 7, train=False, workers=0)
    x, _, _ = next(iter(plain))
    assert torch.equal(to_device(x, torch.device("cpu")), torch.stack([EvalTransform(16, False)(folder[j][0]) for j in range(7)]) / 255)
