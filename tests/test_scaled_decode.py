"""JPEGs decoded at the scale the crops need (augment.CropFlip(scaled_decode=True)): the frame header
read without decoding, libjpeg's reduced sizes and block geometry, the choice of scale, the same draws
(boxes, flips, generator state) as the full decode with views within a stated bound of it, the inputs it
leaves alone, unreadable files found in the views, and pretrain.py's default."""
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import augment
import data
from augment import CropFlip, SimCLRViews, decode_reduced, decode_scale, jpeg_size


def jpeg(pixels, **save):
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", **{"quality": 90, **save})
    return buf.getvalue()


def photo(w, h, seed=0):
    """Photo-like: smooth shading, 20 hard-edged discs (where a misplaced crop box shows), sensor noise."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(20):
        x, y, r = rng.integers(0, w), rng.integers(0, h), rng.integers(5, min(w, h) // 4)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    noisy = np.asarray(img, np.float32) + rng.normal(0, 2, (h, w, 3))
    return jpeg(np.clip(noisy + 0.5, 0, 255).astype(np.uint8))


def test_jpeg_size_reads_the_frame_header_of_every_kind():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x010F] = "camera" * 2000  # a large APP1 segment before the frame header
    kinds = {"baseline": jpeg(rgb), "progressive": jpeg(rgb, progressive=True), "exif": jpeg(rgb, exif=exif.tobytes()),
             "grayscale": jpeg(rgb[..., 0]), "444": jpeg(rgb, subsampling=0)}
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, "JPEG")
    kinds["cmyk"] = buf.getvalue()
    for name, blob in kinds.items():
        assert jpeg_size(blob) == (37, 53), name
        assert jpeg_size(bytearray(blob)) == jpeg_size(memoryview(blob)) == (37, 53)
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, "PNG")
    for blob in (png.getvalue(), kinds["baseline"][:20], b"", b"\xff\xd8\xff not a JPEG after all"):
        assert jpeg_size(blob) is None


def test_the_scale_is_the_largest_at_which_every_crop_keeps_the_view_size():
    assert decode_scale([(0, 0, 896, 1000)], 224) == 4
    assert decode_scale([(0, 0, 895, 1000)], 224) == 1  # 1/2 is not used (see augment.JPEG_SCALES)
    assert decode_scale([(0, 0, 1000, 895)], 224) == 1  # both directions count
    assert decode_scale([(5, 9, 1792, 2000), (0, 0, 1800, 1900)], 224) == 8
    assert decode_scale([(5, 9, 1792, 2000), (0, 0, 900, 1900)], 224) == 4  # the smaller crop decides
    assert decode_scale([(0, 0, 64, 64)], 32, scales=(8, 4, 2)) == 2


@pytest.mark.parametrize("w,h", [(1001, 757), (640, 480), (83, 45)])
def test_reduced_decode_has_libjpegs_rounded_up_size_and_its_block_geometry(w, h):
    """Reduced pixel j covers full pixels [j s, (j + 1) s): on a smooth image (quality 100, no chroma
    subsampling) each is the mean of its s x s block of the full decode within about half a level
    (the last, partial block: of the edge-padded image, as the encoder pads it)."""
    rng = np.random.default_rng(w)
    smooth = np.asarray(Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC))
    blob = jpeg(smooth, quality=100, subsampling=0)
    full = augment.decode(blob).permute(1, 2, 0).double().numpy()
    for s in (2, 4, 8):
        reduced = decode_reduced(blob, s)
        hs, ws = -(-h // s), -(-w // s)
        assert reduced.size == (ws, hs) and reduced.mode == "RGB"
        padded = np.pad(full, ((0, hs * s - h), (0, ws * s - w), (0, 0)), mode="edge")
        means = padded.reshape(hs, s, ws, s, 3).mean(axis=(1, 3))
        diff = np.abs(np.asarray(reduced, np.float64) - means)
        assert diff.mean() < 0.6 and diff.max() <= 3, (s, diff.mean(), diff.max())
    assert decode_reduced(b"\xff\xd8\xff not a JPEG", 4) is None  # refused: the caller decodes in full


def test_scaled_views_draw_the_same_boxes_and_stay_within_the_bound():
    """The same seed gives the same boxes and flips, and leaves the generator in the same state (resumes
    see the views they would have seen); the views are within the bound the docs state for this test image
    (placing the box on whole reduced pixels instead breaks it: mean 2.3 levels)."""
    blob = photo(640, 480)
    size, seen = 36, {False: [], True: []}  # (at 36 px: 1/4 for 3 pairs in 4, 1/8 for the rest)
    diffs = {1: [], 4: [], 8: []}
    for scaled in (False, True):
        crop_flip = CropFlip(size, scaled_decode=scaled)
        draw = crop_flip.draw
        crop_flip.draw = lambda *a, _draw=draw, _seen=seen[scaled], **k: _seen.append(_draw(*a, **k)) or _seen[-1]
        outs = []
        for seed in range(160):
            g = torch.Generator().manual_seed(seed)
            outs.append(crop_flip.crops(blob, 2, g))
            seen[scaled].append(("state", g.get_state()))
        if scaled:
            views_scaled = outs
        else:
            views_full = outs
    assert len(seen[True]) == len(seen[False]) == 160 * 3
    for a, b in zip(seen[False], seen[True]):
        assert a[0] == b[0] and (torch.equal(a[1], b[1]) if a[0] == "state" else a == b)
    for seed, (full, scaled) in enumerate(zip(views_full, views_scaled)):
        boxes = [box for box, _ in seen[False][3 * seed:3 * seed + 2]]
        s = decode_scale(boxes, size)
        for x, y in zip(full, scaled):
            assert x.shape == y.shape == (3, size, size) and y.dtype == torch.uint8
            d = (x.int() - y.int()).abs()
            diffs[s].append((d.float().mean().item(), d.max().item()))
    assert all(m == 0 for m, _ in diffs[1])  # the full decode itself (test_other_inputs_are_as_without_it)
    assert len(diffs[4]) > 100 and len(diffs[8]) > 50
    reduced = np.array(diffs[4] + diffs[8])
    assert reduced[:, 0].mean() < 1.0 and reduced[:, 0].max() < 2.5 and reduced[:, 1].max() < 64, (
        reduced[:, 0].mean(), reduced[:, 0].max(), reduced[:, 1].max())


def test_other_inputs_are_as_without_it():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, "PNG")
    small_jpeg = jpeg(pixels[:60, :80])  # every crop needs the full size: the full decode
    tensor = torch.from_numpy(pixels).permute(2, 0, 1)
    full, scaled = SimCLRViews(32, blur=False), SimCLRViews(32, blur=False, scaled_decode=True)
    for img in (png.getvalue(), Image.fromarray(pixels), tensor, small_jpeg):
        for seed in range(5):
            a = full.crops(img, torch.Generator().manual_seed(seed))
            b = scaled.crops(img, torch.Generator().manual_seed(seed))
            assert all(torch.equal(x, y) for x, y in zip(a, b))
    whole = scaled(photo(640, 480), torch.Generator().manual_seed(0))  # whole views (distortion on the CPU)
    again = scaled(photo(640, 480), torch.Generator().manual_seed(0))
    assert all(x.shape == (3, 32, 32) and x.dtype == torch.float32 and torch.equal(x, y) for x, y in zip(whole, again))
    for mode in ("L", "CMYK"):  # reduced decodes of other colour spaces come as RGB
        buf = io.BytesIO()
        Image.open(io.BytesIO(photo(640, 480))).convert(mode).save(buf, "JPEG")
        for x in scaled.crops(buf.getvalue(), torch.Generator().manual_seed(3)):
            assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
    assert "scaled_decode=True" in repr(scaled) and "scaled_decode" not in repr(full)


def test_a_jpeg_that_fails_in_the_views_is_skipped_and_flagged_or_stops_with_strict(tmp_path, capsys):
    """A folder read with encoded=True hands JPEGs over undecoded: one whose header is whole but whose
    data is cut short fails in the views (augment.DecodeError), and counts as unreadable there."""
    good = photo(640, 480)
    (tmp_path / "a.jpg").write_bytes(good)
    (tmp_path / "b_cut.jpg").write_bytes(good[:len(good) // 2])
    (tmp_path / "c.jpg").write_bytes(photo(640, 480, seed=1))
    folder = data.FolderImages(str(tmp_path), encoded=True)
    assert isinstance(folder[0][0], bytes) and jpeg_size(folder[1][0]) == (480, 640)
    views = data.SeededTransform(folder, SimCLRViews(32, scaled_decode=True).crops, seed=0)
    for epoch in range(3):
        (x1, x2), _, unreadable = views[(epoch, 1)]
        assert unreadable == 1 and x1.shape == (3, 32, 32)
        # the stand-in is image 2 with the generator of sample 1, as for files the dataset cannot read
        expected = SimCLRViews(32, scaled_decode=True).crops(
            folder[2][0], torch.Generator().manual_seed(data._sample_seed(0, epoch, 1)))
        assert torch.equal(x1, expected[0]) and torch.equal(x2, expected[1])
        assert views[(epoch, 0)][2] == 0
    err = capsys.readouterr().err
    assert err.count(f"skipping unreadable image {tmp_path}/b_cut.jpg (OSError: ") == 1, err
    strict = data.SeededTransform(folder, SimCLRViews(32, scaled_decode=True).crops, strict=True)
    with pytest.raises(data.DataError, match="cannot read .*b_cut.jpg") as e:
        strict[(0, 1)]
    assert "\n" not in str(e.value)


def test_pretrain_decodes_folders_at_the_crops_scale_by_default():
    import pretrain
    common = ["--data-dir", "d", "--image-size", "64"]
    assert pretrain.get_args(["--dataset", "folder"] + common).scaled_decode is True
    assert pretrain.get_args(["--dataset", "imagefolder"] + common).scaled_decode is True
    assert pretrain.get_args(["--dataset", "imagefolder", "--no-scaled-decode"] + common).scaled_decode is False
    assert pretrain.get_args(["--dataset", "cifar10", "--data-dir", "d"]).scaled_decode is False


def test_pretraining_on_photos_resumes_exactly_with_the_scaled_decode(run, tmp_path):
    """pretrain.py on a folder of JPEGs whose crops decode at 1/4 and 1/8 (32 px views of 400x300 photos):
    one epoch and a resume (2 workers, then none) give the weights of a straight 2-epoch run, bit for bit."""
    for i in range(16):
        (tmp_path / "photos" / f"d{i % 2}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "photos" / f"d{i % 2}" / f"{i:02d}.jpg").write_bytes(photo(400, 300, seed=i))
    flags = ["--dataset", "folder", "--data-dir", "photos", "--image-size", "32", "--arch", "resnet18", "--width",
             "0.25", "--batch-size", "8", "--warmup-epochs", "1", "--log-every", "1"]
    first = run("pretrain.py", *flags, "--epochs", "2", "--out", "straight", "--workers", "0")
    assert "scaled_decode=True" in first.stdout and '"scaled_decode": true' in first.stdout
    run("pretrain.py", *flags, "--epochs", "1", "--out", "resumed", "--workers", "2")
    resumed = run("pretrain.py", *flags, "--epochs", "2", "--out", "resumed", "--workers", "0", "--resume")
    changed = [line for line in resumed.stdout.splitlines() if "changed settings" in line]
    assert "resumed from" in resumed.stdout and changed and "scaled_decode" not in changed[0]  # (only --epochs)
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    off = run("pretrain.py", *flags, "--epochs", "2", "--out", "resumed", "--workers", "0", "--resume",
              "--no-scaled-decode")  # nothing left to do, but the change is named
    assert "'scaled_decode': (True, False)" in off.stdout
