"""Views: shape, range, randomness; each colour op against an independent definition; the crop +
resize + flip against PIL."""
import colorsys
import io
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

import augment
from augment import (CropFlip, EvalTransform, SimCLRViews, adjust_brightness, adjust_contrast, adjust_hue,
                     adjust_saturation, apply_distortion, blur_kernel_size, distort, gaussian_blur,
                     inception_crop_params, official_crop_params, random_resized_crop_params, sample_distortion,
                     to_grayscale)


def random_image(h=60, w=80, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def is_gray(x):
    """(B, 3, H, W) -> (B,) whether every pixel has equal channels."""
    return (x.amax(dim=1) - x.amin(dim=1)).flatten(1).amax(dim=1) < 1e-6


@pytest.mark.parametrize("size,strength,blur", [(224, 1.0, True), (32, 0.5, False), (96, 1.0, True)])
def test_views_shape_range_and_independence(size, strength, blur):
    x1, x2 = SimCLRViews(size, strength, blur)(random_image())
    for x in (x1, x2):
        assert x.shape == (3, size, size) and x.dtype == torch.float32
        assert x.min() >= 0.0 and x.max() <= 1.0
    assert not torch.equal(x1, x2)


def test_views_reproducible_with_generator_and_accept_any_mode():
    views = SimCLRViews(32, 0.5, False)
    img = random_image()
    a = views(img, torch.Generator().manual_seed(3))
    b = views(img, torch.Generator().manual_seed(3))
    c = views(img, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    for mode in ("L", "P", "RGBA", "CMYK"):
        x1, _ = views(img.convert(mode))
        assert x1.shape == (3, 32, 32)


def test_grayscale_rate_near_20_percent():
    # Colourful images: jitter alone never makes them gray, so gray outputs count grayscale draws.
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4000, 3, 4, 4, generator=g)
    share = is_gray(distort(x, 1.0, blur=False, generator=g)).float().mean().item()
    assert abs(share - 0.2) < 0.02  # binomial sd 0.0063


def test_blur_kernel_size_is_ten_percent_and_odd():
    assert [blur_kernel_size(s) for s in (224, 96, 32)] == [23, 9, 3]


def test_gaussian_blur_matches_direct_2d_convolution():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 9, 11, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.7, 1.9], dtype=torch.float64)
    k = 5
    ours = gaussian_blur(x, sigma, k)
    r = k // 2
    for b in range(2):
        w1 = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma[b].item() ** 2))
        w2 = np.outer(w1, w1) / np.outer(w1, w1).sum()
        img = x[b].numpy()
        padded = np.pad(img, ((0, 0), (r, r), (r, r)), mode="reflect")
        ref = np.zeros_like(img)
        for i in range(img.shape[1]):
            for j in range(img.shape[2]):
                ref[:, i, j] = (padded[:, i:i + k, j:j + k] * w2).sum(axis=(1, 2))
        np.testing.assert_allclose(ours[b].numpy(), ref, rtol=1e-10, atol=1e-12)


def test_brightness_and_contrast_follow_tf_definitions():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 3, 5, 5, generator=g, dtype=torch.float64)
    f = torch.tensor([0.3, 1.0, 1.7], dtype=torch.float64)
    np.testing.assert_allclose(adjust_brightness(x, f).numpy(), x.numpy() * f.numpy()[:, None, None, None])
    # tf.image.adjust_contrast: per channel, (x - mean) * f + mean
    xn = x.numpy()
    mean = xn.mean(axis=(2, 3), keepdims=True)
    np.testing.assert_allclose(adjust_contrast(x, f).numpy(), (xn - mean) * f.numpy()[:, None, None, None] + mean)


def test_saturation_and_hue_match_colorsys():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(5, 3, 4, 4, generator=g, dtype=torch.float64)
    x[0, :, 0, 0] = 0.5  # a gray pixel
    x[1, :, 1, 1] = 0.0  # a black pixel
    f = torch.tensor([0.2, 0.7, 1.0, 1.5, 3.0], dtype=torch.float64)
    d = torch.tensor([-0.2, 0.05, 0.0, 0.3, 0.9], dtype=torch.float64)
    sat, hue = adjust_saturation(x, f), adjust_hue(x, d)
    for b in range(5):
        for i in range(4):
            for j in range(4):
                h, s, v = colorsys.rgb_to_hsv(*x[b, :, i, j].tolist())
                np.testing.assert_allclose(sat[b, :, i, j].numpy(), colorsys.hsv_to_rgb(h, min(1.0, s * f[b].item()), v),
                                           atol=1e-12)
                np.testing.assert_allclose(hue[b, :, i, j].numpy(), colorsys.hsv_to_rgb((h + d[b].item()) % 1.0, s, v),
                                           atol=1e-12)


def test_grayscale_uses_luma_weights():
    x = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    assert to_grayscale(x).flatten().tolist() == pytest.approx([0.2989] * 3)


def test_sampled_parameters_follow_the_paper():
    n = 24000
    p = sample_distortion(n, strength=1.0, blur=True, generator=torch.Generator().manual_seed(4))
    sd = 3.5 * math.sqrt(0.25 / n)  # 3.5 binomial standard deviations at p = 0.5
    assert abs(p["jitter"].float().mean() - 0.8) < sd and abs(p["gray"].float().mean() - 0.2) < sd
    assert abs(p["blur"].float().mean() - 0.5) < sd
    f = p["factors"]
    for j in range(3):  # brightness, contrast, saturation ~ U[0.2, 1.8]
        assert 0.2 <= f[:, j].min() < 0.21 and 1.79 < f[:, j].max() <= 1.8 and abs(f[:, j].mean() - 1.0) < 0.01
    assert -0.2 <= f[:, 3].min() < -0.19 and 0.19 < f[:, 3].max() <= 0.2 and abs(f[:, 3].mean()) < 0.005
    assert 0.1 <= p["sigma"].min() < 0.11 and 1.99 < p["sigma"].max() <= 2.0
    # every one of the 24 orders equally likely (chi-square, 23 dof: 99.9% quantile 49.7)
    codes = (p["order"] * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.unique(codes, return_counts=True)[1].double()
    assert len(counts) == 24 and ((counts - n / 24) ** 2 / (n / 24)).sum() < 49.7
    weak = sample_distortion(1000, strength=0.5, blur=False, generator=torch.Generator().manual_seed(5))
    assert not weak["blur"].any() and weak["factors"][:, :3].min() >= 0.6 and weak["factors"][:, 3].abs().max() <= 0.1


def test_jitter_applies_the_four_operations_in_each_images_order():
    g = torch.Generator().manual_seed(7)
    x = torch.rand(12, 3, 6, 6, generator=g, dtype=torch.float64)
    p = sample_distortion(12, generator=g)
    ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    out = augment.color_jitter(x, p["factors"].double(), p["order"])
    for i in range(12):  # the per-image definition: one image, four operations in sequence
        y = x[i:i + 1]
        for op_index in p["order"][i].tolist():
            y = ops[op_index](y, p["factors"][i:i + 1, op_index].double()).clamp(0, 1)
        torch.testing.assert_close(out[i:i + 1], y, rtol=0, atol=1e-12)
    assert len({tuple(o) for o in p["order"].tolist()}) > 1


def test_batched_path_equals_each_image_alone():
    """The device path distorts a whole batch; each image must come out as if alone."""
    g = torch.Generator().manual_seed(8)
    x = torch.rand(16, 3, 40, 40, generator=g)
    p = sample_distortion(16, generator=g)
    batch = apply_distortion(x, p, 5)
    for i in range(16):
        alone = apply_distortion(x[i:i + 1], {k: v[i:i + 1] for k, v in p.items()}, 5)
        torch.testing.assert_close(batch[i:i + 1], alone, rtol=0, atol=1e-6)


def test_cpu_path_equals_crops_then_distortion_with_the_same_draws():
    """SimCLRViews (CPU path) = its crops (what device-path workers make) + apply_distortion,
    when the distortion parameters come from the same generator state."""
    views = SimCLRViews(32, strength=1.0, blur=True)
    img = random_image()
    x1, x2 = views(img, torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    crops = torch.stack(views.crops(img, g))
    assert crops.dtype == torch.uint8 and crops.shape == (2, 3, 32, 32)
    expected = apply_distortion(crops.float() / 255, sample_distortion(2, 1.0, True, g), blur_kernel_size(32))
    torch.testing.assert_close(torch.stack([x1, x2]), expected, rtol=0, atol=0)


def test_each_operation_acts_only_on_the_images_it_selects():
    g = torch.Generator().manual_seed(10)
    x = torch.rand(4, 3, 30, 30, generator=g)
    p = sample_distortion(4, generator=g)
    p["jitter"] = torch.tensor([True, False, False, False])
    p["gray"] = torch.tensor([False, True, False, False])
    p["blur"] = torch.tensor([False, False, True, False])
    out = apply_distortion(x, p, 3)
    assert not torch.allclose(out[0], x[0]) and not is_gray(out[:1])[0]
    torch.testing.assert_close(out[1], to_grayscale(x[1:2])[0])
    torch.testing.assert_close(out[2], gaussian_blur(x[2:3], p["sigma"][2:3], 3)[0])
    assert torch.equal(out[3], x[3])


def test_blur_drops_only_taps_below_float32_resolution():
    g = torch.Generator().manual_seed(11)
    x = torch.rand(6, 3, 40, 40, generator=g)
    sigma = torch.tensor([0.1, 0.3, 0.7, 1.0, 1.5, 2.0])
    for i in range(6):  # each alone, so small sigmas get the short kernel
        short = gaussian_blur(x[i:i + 1], sigma[i:i + 1], 23)
        full = _reference_blur(x[i:i + 1], sigma[i].item(), 23)
        torch.testing.assert_close(short, full, rtol=0, atol=3e-7)


def test_float32_hue_and_blur_at_float32_rounding():
    """The float32 paths (in-place hue, padding by flipped slices, replicate padding when the image is
    smaller than the radius) against float64 definitions, to float32 rounding."""
    g = torch.Generator().manual_seed(12)
    x = torch.rand(3, 3, 24, 20, generator=g)
    x[0, :, :3] = 0.25  # gray pixels: no hue
    x[1, 0, 3:6] = x[1, 1, 3:6]  # ties between channels
    d = torch.tensor([-0.2, 0.07, 0.2])
    hue = adjust_hue(x, d)
    ref = torch.empty(3, 3, 24, 20, dtype=torch.float64)
    for b in range(3):
        for i in range(24):
            for j in range(20):
                h, s, v = colorsys.rgb_to_hsv(*x[b, :, i, j].double().tolist())
                ref[b, :, i, j] = torch.tensor(colorsys.hsv_to_rgb((h + d[b].item()) % 1.0, s, v))
    torch.testing.assert_close(hue.double(), ref, rtol=0, atol=1e-6)
    sigma = torch.tensor([0.4, 1.3, 2.0])
    torch.testing.assert_close(gaussian_blur(x, sigma, 23).double(),
                               torch.cat([_reference_blur(x[i:i + 1], sigma[i].item(), 23, dtype=torch.float64)
                                          for i in range(3)]), rtol=0, atol=1e-6)
    tiny = torch.rand(2, 3, 4, 6, generator=g)  # radius 11 > 6: edge values repeated instead of reflected
    torch.testing.assert_close(gaussian_blur(tiny, torch.tensor([2.0, 1.5]), 23).double(),
                               torch.cat([_reference_blur(tiny[i:i + 1], s, 23, "replicate", torch.float64)
                                          for i, s in enumerate((2.0, 1.5))]), rtol=0, atol=1e-6)


def test_distortion_never_writes_its_input_and_whole_batches_equal_subsets():
    g = torch.Generator().manual_seed(13)
    x = torch.rand(4, 3, 30, 30, generator=g)
    before = x.clone()
    p = sample_distortion(4, generator=g)
    p["order"][:] = p["order"][0]  # one jitter group: the whole batch goes through at once
    for key in ("jitter", "gray", "blur"):
        p[key][:] = True
    whole = apply_distortion(x, p, 5)
    assert torch.equal(x, before)
    for i in range(4):
        alone = apply_distortion(x[i:i + 1], {k: v[i:i + 1] for k, v in p.items()}, 5)
        torch.testing.assert_close(whole[i:i + 1], alone, rtol=0, atol=1e-6)
    parts = dict(p, jitter=torch.tensor([True, False, True, True]))  # a subset: gathered and scattered
    mixed = apply_distortion(x, parts, 5)
    assert torch.equal(x, before)
    torch.testing.assert_close(mixed[[0, 2, 3]], whole[[0, 2, 3]], rtol=0, atol=0)
    torch.testing.assert_close(mixed[1:2], apply_distortion(x[1:2], {k: v[1:2] for k, v in parts.items()}, 5))


def _reference_blur(x, sigma, k, mode="reflect", dtype=torch.float32):
    """Full-length kernel, direct separable convolution in float64."""
    r = k // 2
    w = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float64) ** 2 / (2 * sigma ** 2))
    w = w / w.sum()
    y = torch.nn.functional.pad(x.double(), (r, r, r, r), mode=mode)
    y = sum(w[j] * y[..., j:j + x.shape[-1]] for j in range(k))
    y = sum(w[j] * y[..., j:j + x.shape[-2], :] for j in range(k))
    return y.to(dtype)


def test_inception_crop_matches_torchvision():
    g = torch.Generator().manual_seed(5)
    areas, aspects = [], []
    for _ in range(2000):
        top, left, h, w = random_resized_crop_params(300, 400, (0.08, 1.0), (3 / 4, 4 / 3), g, sampler="inception")
        assert 0 <= top <= 300 - h and 0 <= left <= 400 - w
        areas.append(h * w / (300 * 400))
        aspects.append(w / h)
    # rounding to whole pixels moves the bounds slightly
    assert min(areas) >= 0.079 and max(areas) <= 1.0
    assert min(aspects) >= 0.74 and max(aspects) <= 1.35
    # Same distribution as torchvision's independent implementation of the Inception crop.
    torch.manual_seed(0)
    img = torch.zeros(3, 300, 400)
    tv = [transforms.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(2000)]
    tv_areas = [h * w / (300 * 400) for _, _, h, w in tv]
    tv_aspects = [w / h for _, _, h, w in tv]
    assert np.mean(areas) == pytest.approx(np.mean(tv_areas), abs=0.02)  # sd of a mean of 2000: 0.006
    assert np.mean(aspects) == pytest.approx(np.mean(tv_aspects), abs=0.01)


CROP_REFERENCE = json.loads((Path(__file__).parent / "reference" / "crop_reference.json").read_text())


def _crop_mismatches(sampler, ref, seed=0):
    """Draw as many boxes as the TensorFlow reference did and list the quantiles that disagree.

    For the reference's q-quantile v, the share of our boxes below v and at or below v must
    bracket q within 4.5 standard errors of two independent samples, sqrt(q(1-q)(1/n + 1/m))
    (0.021 at the median for 20,000 draws each); bracketing handles the ties of small images.
    """
    height, width, m = ref["height"], ref["width"], ref["draws"]
    g = torch.Generator().manual_seed(seed)
    boxes = np.array([random_resized_crop_params(height, width, (0.08, 1.0), (3 / 4, 4 / 3), g, sampler=sampler)
                      for _ in range(m)])
    top, left, h, w = boxes.T
    values = {"area_fraction": h * w / (height * width), "aspect": w / h}
    bad = []
    for name, x in values.items():
        for q, v in zip(ref["quantiles"], ref[name]):
            tol = 4.5 * math.sqrt(q * (1 - q) * (2 / m))
            below, at_or_below = np.mean(x < v - 1e-12), np.mean(x <= v + 1e-12)
            if not below - tol <= q <= at_or_below + tol:
                bad.append(f"{height}x{width} {name} q={q}: TF {v:.4f}, ours {np.quantile(x, q):.4f}")
    return bad, boxes


@pytest.mark.parametrize("ref", CROP_REFERENCE["shapes"], ids=lambda r: f"{r['height']}x{r['width']}")
def test_official_crop_matches_tensorflow_percentiles(ref):
    """The default crop against boxes that tf.image.sample_distorted_bounding_box drew with the official
    code's settings (tests/reference/make_crop_reference.py)."""
    bad, boxes = _crop_mismatches("official", ref)
    assert not bad, bad
    height, width, m = ref["height"], ref["width"], ref["draws"]
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    area = h * w / (height * width)
    assert area.min() >= 0.1 - 1e-12  # min_object_covered: TF's smallest is 0.1 too, never 0.08
    assert abs(area.min() - ref["area_min"]) < 0.01 and abs(area.max() - ref["area_max"]) < 0.02
    # TensorFlow draws offsets in [0, H - h): a smaller box never touches the bottom or right edge
    smaller = (h < height) | (w < width)
    assert ref["share_touching_bottom_or_right"] == 0
    assert not (((h < height) & (top + h == height)) | ((w < width) & (left + w == width))).any()
    whole, ref_whole = (~smaller).mean(), ref["share_whole_image"]  # rare: 0.2% at 32x32, ~0 above
    assert abs(whole - ref_whole) <= 5 * math.sqrt((whole + ref_whole + 1 / m) / m)


def _size_chi2(sampler, ref, seed=1):
    """Two-sample chi-square of the box sizes (h, w) against TensorFlow's counts, same number of draws;
    cells with fewer than 10 draws in both samples together are pooled -> (statistic, its 99.9% quantile)."""
    height, width, m = ref["height"], ref["width"], ref["draws"]
    g = torch.Generator().manual_seed(seed)
    ours = Counter(random_resized_crop_params(height, width, (0.08, 1.0), (3 / 4, 4 / 3), g, sampler=sampler)[2:]
                   for _ in range(m))
    theirs = Counter({(h, w): c for h, w, c in ref["size_counts"]})
    cells = [(theirs[k], ours[k]) for k in set(theirs) | set(ours)]
    big = [c for c in cells if sum(c) >= 10]
    big.append((sum(a for a, b in cells if a + b < 10), sum(b for a, b in cells if a + b < 10)))
    stat = sum((a - b) ** 2 / (a + b) for a, b in big if a + b)
    dof = len(big) - 1
    return stat, dof * (1 - 2 / (9 * dof) + 3.09 * math.sqrt(2 / (9 * dof))) ** 3  # Wilson-Hilferty, z(0.999)


def test_official_crop_sizes_match_tensorflow_at_32px():
    """At 32x32 the rounding rules decide which whole-pixel boxes exist and how often: the whole
    distribution of (h, w) must agree with TensorFlow's, not only its percentiles."""
    ref = next(r for r in CROP_REFERENCE["shapes"] if r["size_counts"])
    stat, limit = _size_chi2("official", ref)
    assert stat < limit, (stat, limit)
    stat, limit = _size_chi2("inception", ref)
    assert stat > limit, (stat, limit)


def test_the_inception_crop_would_fail_the_tensorflow_comparison():
    ref = next(r for r in CROP_REFERENCE["shapes"] if (r["height"], r["width"]) == (375, 500))
    bad, boxes = _crop_mismatches("inception", ref)
    assert any("area_fraction q=0.5" in b for b in bad), bad  # median 0.42 against TF's 0.35
    assert (boxes[:, 2] * boxes[:, 3]).min() < 0.1 * 375 * 500  # it goes down to 8%


def test_official_crop_falls_back_to_the_whole_image_and_checks_its_arguments():
    # No box of aspect 3-4 covers 90% of a square: after 100 attempts TensorFlow takes the whole image
    # (the Inception rule would take a central crop instead).
    g = torch.Generator().manual_seed(0)
    assert official_crop_params(10, 10, (0.9, 1.0), (3.0, 4.0), g) == (0, 0, 10, 10)
    assert inception_crop_params(10, 10, (0.9, 1.0), (3.0, 4.0), g) == (3, 0, 3, 10)
    assert official_crop_params(40, 30, (1.0, 1.0), (0.75, 0.75), g) == (0, 0, 40, 30)  # exactly the image
    assert random_resized_crop_params(300, 400, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(1)) == \
        official_crop_params(300, 400, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(1))  # the default
    with pytest.raises(ValueError, match="crop_sampler"):
        CropFlip(32, crop_sampler="torchvision")
    with pytest.raises(ValueError, match="crop sampler"):
        random_resized_crop_params(30, 30, (0.08, 1.0), (3 / 4, 4 / 3), sampler="uniform")
    assert SimCLRViews(32, crop_sampler="inception").crop_flip.crop_sampler == "inception"


def test_crop_flip_output_and_flip_rate():
    img = random_image(40, 40)
    crop = CropFlip(24, scale=(1.0, 1.0), ratio=(1.0, 1.0))  # the whole image: only the flip is random
    whole = crop(img, torch.Generator().manual_seed(0))
    assert whole.dtype == torch.uint8 and whole.shape == (3, 24, 24)
    g = torch.Generator().manual_seed(1)
    outs = [crop(img, g) for _ in range(400)]
    flipped = sum(not torch.equal(o, outs[0]) for o in outs)
    assert 0.4 < flipped / 400 < 0.6 or 0.4 < (400 - flipped) / 400 < 0.6


def test_eval_transforms():
    img32 = random_image(32, 32)
    x = EvalTransform(32, train=False)(img32)  # no crop at 32 px: the image itself, uint8 as the views
    assert x.dtype == torch.uint8 and torch.equal(x, torch.from_numpy(np.array(img32)).permute(2, 0, 1))
    img256 = random_image(256, 300)
    x = EvalTransform(224, train=False)(img256)  # centre 224 = 87.5% of 256: a pure crop
    arr = np.asarray(img256)[16:240, 38:262]
    assert torch.equal(x, torch.from_numpy(arr.copy()).permute(2, 0, 1))
    y = EvalTransform(224, train=True)(img256, torch.Generator().manual_seed(0))
    assert y.shape == (3, 224, 224) and y.dtype == torch.uint8
    # an odd margin: torchvision's centre (round((h - side) / 2)), then PIL's bicubic resize
    img = random_image(101, 130, seed=3)
    ref = TF.resize(TF.center_crop(img, [88, 88]), [64, 64], interpolation=InterpolationMode.BICUBIC, antialias=True)
    diff = (EvalTransform(64, train=False)(img).int() - torch.from_numpy(np.asarray(ref)).permute(2, 0, 1).int()).abs()
    assert diff.max() <= 2 and diff.float().mean() < 0.3


# ----------------------------------------------------------------------------
# The crop + resize + flip on uint8 channels-last pixels, against PIL.

def photo_jpeg(seed=0, h=375, w=500, quality=90):
    """A real-photo-like JPEG: smooth colour gradients and blobs, fine texture (noise) and
    hard-edged discs (edges are where resampling filters differ most)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)  # in [0, 1) along the longer side
    img = np.stack([0.5 + 0.4 * np.sin(6 * x + 2 * y + p) for p in rng.uniform(0, 6, 3)], -1) * 127
    coarse = Image.fromarray((rng.random((h // 25, w // 25, 3)) * 255).astype(np.uint8))
    img = img + 0.5 * np.asarray(coarse.resize((w, h), Image.BICUBIC), np.float32) + rng.normal(0, 8, (h, w, 3))
    for _ in range(6):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(10, 80)
        img[(y * max(h, w) - cy) ** 2 + (x * max(h, w) - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def pil_view(img, box, size, flip=False):
    """PIL's own crop + bicubic antialiased resize (+ flip): what CropFlip did before, as uint8 (3, size, size)."""
    top, left, h, w = box
    out = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.array(out)).permute(2, 0, 1)


def level_diff(a, b):
    """(largest, mean) absolute difference in levels of 255."""
    d = (a.int() - b.int()).abs()
    return d.max().item(), d.float().mean().item()


# (box, size): downscaling 11x to 1.2x (one side or both), a pure crop, upscaling 1.5x to 17x
BOXES = [((0, 0, 375, 500), 224), ((20, 30, 300, 260), 224), ((0, 0, 375, 500), 32), ((40, 0, 330, 500), 96),
         ((100, 100, 224, 224), 224), ((50, 70, 150, 180), 224), ((10, 10, 100, 90), 224),
         ((200, 300, 40, 50), 224), ((5, 5, 17, 13), 224), ((7, 9, 30, 40), 32)]


@pytest.mark.parametrize("uint8_kernel", [True, False], ids=["uint8-kernel", "float-fallback"])
def test_resized_crop_equals_pils_bicubic_resize(monkeypatch, uint8_kernel):
    """Measured (3 generated photos, these boxes, torch 2.14): uint8 kernel largest difference
    2 levels, mean <= 0.25; the float fallback (torch without the uint8 kernel) 1 and <= 0.21."""
    if uint8_kernel and not augment.UINT8_BICUBIC:
        pytest.skip("this torch has no uint8 antialiased bicubic kernel")
    monkeypatch.setattr(augment, "UINT8_BICUBIC", uint8_kernel)
    for seed in range(2):
        data = photo_jpeg(seed)
        img = Image.open(io.BytesIO(data)).convert("RGB")
        hwc = augment.pixels(data)
        for box, size in BOXES:
            out = augment.resized_crop(hwc, box, size)
            assert out.shape == (3, size, size) and out.dtype == torch.uint8 and out.permute(1, 2, 0).is_contiguous()
            largest, mean = level_diff(out, pil_view(img, box, size))
            assert largest <= 2 and mean < 0.3, (box, size, largest, mean)
            assert torch.equal(augment.resized_crop(hwc, box, size, flip=True), out.flip(-1))
    # the comparison can fail: PIL's bilinear filter, or no antialiasing, is far from it
    box, size = (0, 0, 375, 500), 96
    bilinear = img.crop((0, 0, 500, 375)).resize((size, size), Image.BILINEAR)
    assert level_diff(augment.resized_crop(hwc, box, size), torch.from_numpy(np.array(bilinear)).permute(2, 0, 1))[0] > 10
    aliased = torch.nn.functional.interpolate(hwc.permute(2, 0, 1)[None].float(), size=(size, size), mode="bicubic")
    assert level_diff(aliased[0].round().clamp(0, 255), pil_view(img, box, size))[0] > 10


def test_crop_flip_draws_the_box_and_flip_it_drew_before():
    """Same generator, same draws: the box from random_resized_crop_params, then one uniform
    for the flip, so the views keep their distribution and a resumed run its exact views;
    the pixels are PIL's resize of that box within the measured tolerance."""
    data = photo_jpeg(2)
    img = Image.open(io.BytesIO(data)).convert("RGB")
    for sampler in augment.CROP_SAMPLERS:
        crop = CropFlip(96, crop_sampler=sampler)
        flips = 0
        for seed in range(12):
            g, ref_g = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
            out = crop(data, g)
            box = random_resized_crop_params(375, 500, (0.08, 1.0), (3 / 4, 4 / 3), ref_g, sampler=sampler)
            flip = torch.rand(1, generator=ref_g).item() < 0.5
            flips += flip
            assert level_diff(out, pil_view(img, box, 96, flip))[1] < 0.3
            assert level_diff(out, pil_view(img, box, 96, not flip))[1] > 3  # the flip decides
            assert torch.rand(1, generator=g).item() == torch.rand(1, generator=ref_g).item()  # no extra draws
        assert 0 < flips < 12


def test_views_from_jpeg_bytes_pil_and_tensors_agree():
    """decode() gives PIL's pixels bit for bit (RGB, grayscale and CMYK JPEGs; PNG through PIL),
    so a view does not depend on the form the image comes in."""
    data = photo_jpeg(3, 120, 160)
    img = Image.open(io.BytesIO(data)).convert("RGB")
    for mode in ("RGB", "L", "CMYK"):
        buf = io.BytesIO()
        img.convert(mode).save(buf, "JPEG", quality=90)
        assert torch.equal(augment.decode(buf.getvalue()).permute(1, 2, 0),
                           torch.from_numpy(np.array(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))))
    png = io.BytesIO()
    img.save(png, "PNG")
    chw = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
    forms = [data, img, chw, chw.permute(1, 2, 0).contiguous().permute(2, 0, 1), png.getvalue()]
    views = SimCLRViews(64)
    expected = views.crops(forms[0], torch.Generator().manual_seed(5))
    for form in forms[1:]:
        got = views.crops(form, torch.Generator().manual_seed(5))
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
    gray = views.crops(chw[:1], torch.Generator().manual_seed(5))  # (1, H, W): three equal channels
    assert torch.equal(gray[0][0], gray[0][1])
    with pytest.raises(ValueError, match="uint8 image"):
        CropFlip(32)(chw.float())


def test_distort_rejects_wrong_input():
    with pytest.raises(ValueError):
        distort(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError):
        distort(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
