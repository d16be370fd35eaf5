"""SimCLR views: random resized crop + flip, colour distortion, Gaussian blur.

Implements the augmentation of Chen et al. 2020 (Sec. 3, Appendix A) as the
official code does it (data_util.py): images are floats in [0, 1] with no
mean/std normalisation.

The work is split in two stages so that the expensive part can run in batches
wherever the images live:
  CropFlip    per image, on a PIL image, a uint8 tensor or JPEG bytes -> uint8
              (3, size, size): the crop box drawn as TensorFlow draws it for the
              official code, or area-uniform as torchvision (crop_sampler="inception"),
              resized by torch's uint8 antialiased bicubic kernel on channels-last
              pixels (PIL's filter and arithmetic, several times faster than PIL)
  distort     per batch, float (B, 3, size, size) in [0, 1], any device: colour
              jitter (p=0.8, the four operations in a random order per image),
              grayscale (p=0.2), Gaussian blur (p=0.5), each image drawing its
              own parameters (sample_distortion, on the CPU), then applied
              where the batch lives (apply_distortion).

    views = SimCLRViews(224)            # CIFAR: SimCLRViews(32, strength=0.5, blur=False)
    x1, x2 = views(pil_image)           # two float (3, 224, 224) tensors in [0, 1]
"""
import io
import math
import struct
import warnings

import numpy as np
import torch
import torch.nn.functional as F

GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)  # ITU-R 601-2 luma, as tf.image.rgb_to_grayscale


# ----------------------------------------------------------------------------
# Colour operations on float batches (B, 3, H, W) in [0, 1].
# Each takes a per-image factor of shape (B,). Definitions follow tf.image,
# which the official code calls (not torchvision, which differs for contrast
# and saturation).

def _per_image(f):
    return f.view(-1, 1, 1, 1)


def adjust_brightness(x, factor):
    """Multiplicative brightness (official 'simclrv2' variant)."""
    return x * _per_image(factor)


def adjust_contrast(x, factor):
    """tf.image.adjust_contrast: scale each channel about its own mean, (x - mean) * f + mean."""
    return torch.lerp(x.mean(dim=(2, 3), keepdim=True), x, _per_image(factor))


def _channel_max_min(x):
    """Per-pixel max and min over the 3 channels, (B, 1, H, W) each (elementwise: much
    faster on CPU than a strided reduction over dim 1)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return torch.maximum(torch.maximum(r, g), b), torch.minimum(torch.minimum(r, g), b)


def adjust_saturation(x, factor):
    """tf.image.adjust_saturation: HSV saturation times factor, clipped to 1.

    In HSV, scaling S keeps hue and value V = max(r, g, b), and each channel
    c maps to V - k * (V - c) with k = factor, capped at V / (V - min) where
    S would exceed 1. Same result as converting to HSV and back, without it.
    """
    v, low = _channel_max_min(x)
    k = torch.minimum(_per_image(factor), v / (v - low).clamp_min(1e-12))
    return torch.lerp(v, x, k)  # v + k * (x - v)


def adjust_hue(x, delta):
    """tf.image.adjust_hue: rotate the HSV hue by delta (fraction of a turn)."""
    # In-place steps on a few buffers: each fresh (B, 1, H, W) temporary costs an allocation and,
    # once the allocator has handed memory back to the system, page faults (most of this
    # function's time on some machines).
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    v = torch.maximum(r, g)
    torch.maximum(v, b, out=v)
    chroma = torch.minimum(r, g)
    torch.minimum(chroma, b, out=chroma)
    torch.sub(v, chroma, out=chroma)
    # Which channel is the maximum, as 0/1 floats (v >= c always, so 1 - sign(v - c) is 1 exactly
    # where c = v); arithmetic instead of comparisons and where(), which are slow on CPU.
    is_r = torch.sub(v, r).sign_().neg_().add_(1.0)
    is_g = torch.sub(v, g).sign_().neg_().add_(1.0)
    torch.addcmul(is_g, is_g, is_r, value=-1.0, out=is_g)  # red wins ties, as in HSV
    # hue in sixths of a turn: (sector start * C + signed spread) / C, divided once; C = 0 gives 0
    num = torch.sub(r, g).add_(chroma, alpha=4.0)
    tmp = torch.sub(b, r).add_(chroma, alpha=2.0)
    num.lerp_(tmp, is_g)
    num.lerp_(torch.sub(g, b, out=tmp), is_r)
    hue6 = num.div_(torch.clamp_min(chroma, 1e-12, out=is_g)).add_(6.0 * _per_image(delta))
    hue6.sub_(torch.mul(hue6, 1.0 / 6.0, out=tmp).floor_().mul_(6.0))  # wrapped to [0, 6), on one plane
    # HSV -> RGB: channel n (5 for R, 3 for G, 1 for B) is V - C * f(k mod 6) with k = n + hue6
    # and f the trapezoid clamp(min(k, 4 - k), 0, 1). For k in [1, 11), f(k mod 6) is
    # clamp(4 - k, 0, 1) + clamp(2 - |k - 8|, 0, 1): no modulo over the three channels.
    k = torch.add(torch.arange(5.0, 0.0, -2.0, device=x.device, dtype=x.dtype).view(1, 3, 1, 1), hue6)  # made there: no copy
    f = torch.rsub(k, 4.0).clamp_(0.0, 1.0)
    f.add_(k.sub_(8.0).abs_().neg_().add_(2.0).clamp_(0.0, 1.0))
    return torch.addcmul(v, chroma, f, value=-1.0, out=f)


def to_grayscale(x):
    """Luma, repeated over the 3 channels."""
    # non_blocking: a GPU batch must not make the host wait for the device (a plain copy would)
    w = torch.tensor(GRAY_WEIGHTS, dtype=x.dtype).to(x.device, non_blocking=True).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True).expand_as(x)


def blur_kernel_size(size):
    """Official rule: kernel_size = size // 10, made odd (23 taps at 224 px)."""
    return 2 * ((size // 10) // 2) + 1


def gaussian_blur(x, sigma, kernel_size):
    """Separable Gaussian blur with one sigma per image, reflect padding.

    x: (B, C, H, W) float; sigma: (B,). Two 1-D passes (2K taps per pixel
    instead of K^2), each a grouped 1-D convolution with one group per image
    row: on CPU the faster form for a pair of views, what the data workers blur
    (two depthwise 2-D convolutions are 1.2-1.5x faster on large batches:
    tools/profile_step.py --blur-forms). The official
    code pads with zeros ('SAME'), which darkens the border; reflect padding
    keeps the image's own edge values.
    """
    kernel = blur_kernels(sigma, kernel_size, x.device, x.dtype)
    if kernel is None:
        return x
    radius = kernel.shape[1] // 2
    x = _blur_rows(x, kernel, radius)                   # along W
    return _blur_rows(x.transpose(2, 3), kernel, radius).transpose(2, 3)  # along H


def blur_kernels(sigma, kernel_size, device, dtype):
    """Normalised 1-D Gaussian kernels (B, 2r + 1) on `device`, one per sigma (B,) on the CPU,
    r at most kernel_size // 2; None when r is 0 (nothing to blur)."""
    # Taps beyond 5.7 sigma weigh under 1e-7 of the centre: dropping them changes no float32
    # result (their total mass is < 2e-7), and small sigmas need far fewer than 2r + 1 taps.
    radius = min(kernel_size // 2, math.ceil(5.7 * float(sigma.max())))  # (sigma on the CPU: no sync)
    if radius == 0:
        return None
    sigma = sigma.to(device, dtype, non_blocking=True)
    t = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    kernel = torch.exp(-t.pow(2) / (2.0 * sigma.view(-1, 1).pow(2)))
    return kernel / kernel.sum(dim=1, keepdim=True)


def _blur_rows(x, kernel, radius):
    """Convolve every row of x (B, C, H, W) with its image's 1-D kernel (B, K)."""
    b, c, h, w = x.shape
    rows = x.reshape(1, b * c * h, w)
    if radius < w:  # reflect padding from two flipped slices: several times faster than F.pad's reflect
        rows = torch.cat([rows[..., 1:radius + 1].flip(-1), rows, rows[..., w - radius - 1:w - 1].flip(-1)], dim=-1)
    else:  # reflect needs a row longer than the radius
        rows = F.pad(rows, (radius, radius), mode="replicate")              # (1, rows, W + 2r)
    weight = kernel.repeat_interleave(c * h, dim=0).unsqueeze(1)            # (rows, 1, K)
    return F.conv1d(rows, weight, groups=b * c * h).view(b, c, h, w)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def sample_distortion(n, strength=1.0, blur=True, generator=None):
    """Random parameters of distort() for n images, drawn independently per image, on the CPU
    (so that applying them on a GPU needs no device-to-host synchronisation).

    jitter (n,) bool, p = 0.8; factors (n, 4): brightness, contrast, saturation
    ~ U[max(0, 1 - 0.8 s), 1 + 0.8 s], hue shift ~ U[-0.2 s, 0.2 s]; order (n, 4):
    a uniform random permutation of the four; gray (n,) bool, p = 0.2; blur (n,)
    bool, p = 0.5 (never if blur=False); sigma (n,) ~ U[0.1, 2.0].
    """
    def rand(*shape):
        return torch.rand(*shape, generator=generator)

    s = 0.8 * strength
    low = max(0.0, 1.0 - s)
    factors = torch.cat([low + (1.0 + s - low) * rand(n, 3), 0.2 * strength * (2.0 * rand(n, 1) - 1.0)], dim=1)
    return {"jitter": rand(n) < 0.8, "factors": factors, "order": rand(n, 4).argsort(dim=1),
            "gray": rand(n) < 0.2, "blur": (rand(n) < 0.5) & blur, "sigma": 0.1 + 1.9 * rand(n)}


def color_jitter(x, factors, order):
    """Brightness, contrast, saturation and hue with per-image factors (B, 4), applied in
    each image's own order (B, 4, on the CPU), clipped to [0, 1] after each
    (official color_jitter_rand). Images that share an order go through together."""
    factors = factors.to(x.device, x.dtype, non_blocking=True)
    codes = (order * torch.tensor([64, 16, 4, 1])).sum(dim=1)  # one number per order (24 possible)
    groups = torch.unique(codes).tolist()
    out = None if len(groups) == 1 else torch.empty_like(x)
    for code in groups:
        members = (codes == code).nonzero().squeeze(1)
        idx = members.to(x.device, non_blocking=True)
        y = x if out is None else x.index_select(0, idx)  # (index_select/index_copy_: much faster than x[idx])
        for op_index in order[members[0]].tolist():  # every op returns a new tensor: x is never written
            y = JITTER_OPS[op_index](y, factors[idx, op_index]).clamp_(0.0, 1.0)
        if out is None:
            return y
        out.index_copy_(0, idx, y)  # every image is in exactly one group
    return out


def apply_distortion(x, params, kernel_size):
    """distort() with given parameters (from sample_distortion, on the CPU): jitter, then
    grayscale, then blur, each on the images it selects. Returns a new tensor."""
    if x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise ValueError(f"expected a float batch (B, 3, H, W), got {tuple(x.shape)} {x.dtype}")

    x = x.clone()
    stages = ((params["jitter"], lambda v, sel: color_jitter(v, params["factors"][sel], params["order"][sel])),
              (params["gray"], lambda v, sel: to_grayscale(v)),
              (params["blur"], lambda v, sel: gaussian_blur(v, params["sigma"][sel], kernel_size)))
    for mask, stage in stages:
        sel = mask.nonzero().squeeze(1)  # on the CPU: no wait for the device
        if sel.numel() == len(x):  # the whole batch: no gather and scatter
            x = stage(x, sel).contiguous()  # (grayscale returns an expanded view)
        elif sel.numel():
            idx = sel.to(x.device, non_blocking=True)
            x.index_copy_(0, idx, stage(x.index_select(0, idx), sel))  # much faster than x[idx] = ...
    return x.clamp_(0.0, 1.0)


def distort(x, strength=1.0, blur=True, generator=None):
    """Colour distortion and blur of SimCLR on a float batch (B, 3, H, W) in [0, 1].

    Jitter with p = 0.8, then grayscale with p = 0.2 (random_color_jitter),
    then Gaussian blur with p = 0.5, sigma ~ U[0.1, 2.0], kernel ~10% of the
    side (batch_random_blur). Every image draws its own parameters (from the
    CPU generator `generator`); the work runs on the device x lives on.
    Returns a new tensor.
    """
    params = sample_distortion(x.shape[0], strength, blur, generator)
    return apply_distortion(x, params, blur_kernel_size(x.shape[-2]))


# ----------------------------------------------------------------------------
# Per-image geometric stage, on uint8 pixels in channels-last layout: the layout JPEG
# decoders produce and the one torch's uint8 antialiased bicubic kernel runs fastest on.

JPEG_MAGIC = b"\xff\xd8\xff"


def _uint8_bicubic_works():
    """Whether F.interpolate takes uint8 for antialiased bicubic (torch >= 2.1; a port of
    PIL's fixed-point resampling, AVX2-vectorised where torch dispatches AVX2)."""
    try:
        F.interpolate(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), size=(2, 2), mode="bicubic", antialias=True)
        return True
    except (RuntimeError, NotImplementedError):
        return False


UINT8_BICUBIC = _uint8_bicubic_works()


def decode(data):
    """Encoded image bytes -> uint8 (3, H, W) RGB tensor, a channels-last view of the decoder's
    own (H, W, 3) buffer. JPEGs go through torchvision's libjpeg-turbo decoder (the same pixels
    as PIL's; no copy into numpy afterwards), anything else and JPEGs it refuses through PIL."""
    data = bytearray(data)  # writable: torch.frombuffer warns on read-only buffers
    if data[:3] == JPEG_MAGIC:
        try:
            return _decode_jpeg(data)
        except (ImportError, AttributeError, RuntimeError):  # no decoder in this torchvision, or a JPEG it refuses
            pass
    from PIL import Image
    with Image.open(io.BytesIO(data)) as img:
        return _tensor(img)


def _decode_jpeg(data):
    from torchvision.io import ImageReadMode  # (loads torchvision's image extension, which registers the op)
    # The registered op itself (the same schema in torchvision 0.16-0.29): the Python wrapper
    # adds usage logging and, from 0.29 (which deprecates it for torchcodec), a warning per call,
    # 3% of a decode here. A torchvision without it raises, and PIL decodes instead.
    return torch.ops.image.decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), ImageReadMode.RGB.value, False)


def _tensor(img):
    """A PIL image (any mode: grayscale, palette, CMYK, RGBA -> RGB) as uint8 (3, H, W) in
    channels-last layout; one copy, PIL's export of its pixels."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    with warnings.catch_warnings():  # the array is read-only (PIL's bytes) and is never written
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(img)).permute(2, 0, 1)


def pixels(img):
    """The image a view is made from, as uint8 (H, W, 3) (a view, no copy when it can be):
    from a PIL image, a uint8 (3, H, W) or (1, H, W) tensor in any layout, or encoded bytes."""
    if isinstance(img, (bytes, bytearray, memoryview)):
        img = decode(img)
    elif not isinstance(img, torch.Tensor):
        img = _tensor(img)
    if img.dtype != torch.uint8 or img.dim() != 3 or img.shape[0] not in (1, 3):
        raise ValueError(f"expected a uint8 image (3, H, W) or (1, H, W), got {tuple(img.shape)} {img.dtype}")
    return img.expand(3, -1, -1).permute(1, 2, 0)


def resized_crop(hwc, box, size, flip=False):
    """The box (top, left, h, w) of uint8 pixels (H, W, 3), resized to (size, size) with
    antialiased bicubic interpolation (PIL's filter, a = -0.5, support scaled when
    downscaling, and its fixed-point arithmetic), flipped left-right if flip -> a new uint8
    (3, size, size) in channels-last layout, a view of its (size, size, 3) pixels: a batch of
    them stacks by a plain copy of those (data.collate) and is transposed where it is used."""
    top, left, h, w = box
    crop = hwc[top:top + h, left:left + w].unsqueeze(0).permute(0, 3, 1, 2)  # (1, 3, h, w), channels-last view
    if (h, w) != (size, size):  # (torch's generic kernel reads the view; its AVX2 one copies it to channels-last)
        out = _resize(crop, size)
    else:
        out = crop.clone(memory_format=torch.channels_last)  # never a view of the caller's image
    return (out.flip(-1) if flip else out)[0]


def _resize(x, size):
    """(1, 3, h, w) uint8 (a channels-last view) -> (1, 3, size, size) uint8, antialiased bicubic."""
    if UINT8_BICUBIC:
        return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True)
    # torch without the uint8 kernel: the same filter in float32, rounded once (no rounding
    # between the horizontal and vertical passes, so within a level of the uint8 result)
    y = F.interpolate(x.float(), size=(size, size), mode="bicubic", antialias=True)
    return y.round_().clamp_(0, 255).to(torch.uint8)


CROP_SAMPLERS = ("official", "inception")


def _f32(x):
    """x rounded to the nearest float32, as a Python float (for TensorFlow's float arithmetic:
    +, -, *, / and sqrt of float32 operands done in float64 and rounded once are exact)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def official_crop_params(height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), generator=None,
                         attempts=100, min_covered=0.1):
    """Crop box (top, left, h, w) drawn as tf.image.sample_distorted_bounding_box draws it with the
    official SimCLR settings (whole image as the object box, min_object_covered 0.1, 100 attempts).

    Per attempt: aspect ratio w/h ~ U(ratio) (not log-uniform); the height is uniform over the whole
    numbers between the heights that give the smallest and the largest allowed area at that aspect,
    w = round(h * aspect); a box outside the area range after one repair step, or covering less
    than min_covered of the image, is rejected. No success in `attempts`: the whole image. The
    arithmetic is TensorFlow's float32 with round-half-to-even, so the boxes are its boxes.
    Offsets are uniform in [0, H - h) and [0, W - w) (TensorFlow's: a smaller box never touches
    the bottom or right edge).
    """
    lo_ratio, hi_ratio = _f32(ratio[0]), _f32(ratio[1])
    min_area = _f32(_f32(_f32(scale[0]) * width) * height)
    max_area = _f32(_f32(_f32(scale[1]) * width) * height)
    image_area, min_covered = _f32(width * height), _f32(min_covered)
    for _ in range(attempts):
        u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        u0 = math.floor(u[0] * 2 ** 23) / 2 ** 23  # a multiple of 2^-23 in [0, 1), like Philox's RandFloat
        aspect = _f32(_f32(u0 * _f32(hi_ratio - lo_ratio)) + lo_ratio)
        h = round(_f32(math.sqrt(_f32(min_area / aspect))))  # round(): half to even, as lrintf
        max_h = round(_f32(math.sqrt(_f32(max_area / aspect))))
        if round(_f32(max_h * aspect)) > width:  # the tallest box whose rounded width still fits
            max_h = int((width + 0.5 - _f32(1e-7)) / aspect)
            if round(_f32(max_h * aspect)) > width:
                max_h -= 1
        max_h = min(max_h, height)
        if h >= max_h:
            h = max_h
        else:
            h += _uniform_int(u[1], max_h - h + 1)  # closed range [h, max_h]
        w = round(_f32(h * aspect))
        area = _f32(w * h)
        if area < min_area:  # rounding made it too small: one pixel taller
            h += 1
            w = round(_f32(h * aspect))
            area = _f32(w * h)
        if area > max_area:  # too large: one pixel shorter
            h -= 1
            w = round(_f32(h * aspect))
            area = _f32(w * h)
        if area < min_area or area > max_area or not (0 < w <= width and 0 < h <= height):
            continue
        if area < 1.0 or _f32(area / image_area) < min_covered:  # the min_object_covered test
            continue
        top = _uniform_int(u[2], height - h) if h < height else 0
        left = _uniform_int(u[3], width - w) if w < width else 0
        return top, left, h, w
    return 0, 0, height, width


def _uniform_int(u, n):
    """A whole number uniform in [0, n) from u uniform in [0, 1)."""
    return min(int(u * n), n - 1)


def inception_crop_params(height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), generator=None, attempts=100):
    """Crop box (top, left, h, w): area fraction ~ U(scale), log aspect ratio ~ U(log ratio),
    retried until it fits (Inception-style, as torchvision and the paper's text; up to 100
    attempts), else the largest central crop within the ratio range."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop_params(height, width, scale, ratio, generator=None, attempts=100, sampler="official"):
    """Crop box (top, left, h, w) of a random resized crop of an image height x width.

    sampler="official": TensorFlow's sample_distorted_bounding_box as the official code calls it
    (official_crop_params: smaller crops, median area fraction 0.35 on a 375x500 image, never
    below 10%); "inception": area-uniform, as the paper's text, torchvision and most ports
    (inception_crop_params: median 0.42, down to 8%).
    """
    if sampler == "official":
        return official_crop_params(height, width, scale, ratio, generator, attempts)
    if sampler == "inception":
        return inception_crop_params(height, width, scale, ratio, generator, attempts)
    raise ValueError(f"crop sampler must be one of {CROP_SAMPLERS}, got {sampler!r}")


class CropFlip:
    """Random resized crop (area 0.08-1, aspect 3/4-4/3, bicubic) and horizontal flip
    (p = 0.5) -> uint8 (3, size, size), from a PIL image, a uint8 (3, H, W) tensor or
    encoded JPEG bytes (see pixels). crop_sampler: "official" (TensorFlow's, as the
    official code) or "inception" (area-uniform). Each call draws the box, then the flip."""

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), crop_sampler="official"):
        if crop_sampler not in CROP_SAMPLERS:
            raise ValueError(f"crop_sampler must be one of {CROP_SAMPLERS}, got {crop_sampler!r}")
        self.size, self.scale, self.ratio, self.crop_sampler = size, scale, ratio, crop_sampler

    def __call__(self, img, generator=None):
        return self.crop(pixels(img), generator)

    def crop(self, hwc, generator=None):
        """One crop + flip of pixels (H, W, 3) uint8 (from pixels())."""
        height, width = hwc.shape[:2]
        box = random_resized_crop_params(height, width, self.scale, self.ratio, generator, sampler=self.crop_sampler)
        flip = torch.rand(1, generator=generator).item() < 0.5
        return resized_crop(hwc, box, self.size, flip)

    def __repr__(self):
        return f"CropFlip(size={self.size}, crop_sampler={self.crop_sampler!r})"


class SimCLRViews:
    """Two independent SimCLR views of one image, float (3, size, size) in [0, 1].

    Defaults are the ImageNet recipe; CIFAR uses SimCLRViews(32, strength=0.5, blur=False).
    crop_sampler: "official" (TensorFlow's crop, as the official code) or "inception"
    (area-uniform, as the paper's text and torchvision). Pass a torch.Generator to make the
    views reproducible.
    """

    def __init__(self, size=224, strength=1.0, blur=True, crop_sampler="official"):
        self.size, self.strength, self.blur = size, strength, blur
        self.crop_flip = CropFlip(size, crop_sampler=crop_sampler)

    def crops(self, img, generator=None):
        """The per-image stage alone: two independent crop + flips, uint8 (3, size, size) each,
        of one decoded image. The device path runs these in the data workers and distort() on
        the batch."""
        hwc = pixels(img)
        return self.crop_flip.crop(hwc, generator), self.crop_flip.crop(hwc, generator)

    def __call__(self, img, generator=None):
        rows = torch.stack([c.permute(1, 2, 0) for c in self.crops(img, generator)])  # (2, size, size, 3)
        # one pass to float in (2, 3, size, size) layout, the one the distortion runs fastest on here
        pair = rows.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)
        x1, x2 = distort(pair, self.strength, self.blur, generator).unbind(0)
        return x1, x2

    def __repr__(self):
        return (f"SimCLRViews(size={self.size}, strength={self.strength}, blur={self.blur}, "
                f"crop_sampler={self.crop_flip.crop_sampler!r})")


# ----------------------------------------------------------------------------
# Evaluation transforms (linear evaluation and fine-tuning).

def center_crop_resize(img, size, fraction=0.875):
    """Square centre crop of `fraction` of the shorter side, then bicubic resize
    (official center_crop, CROP_PROPORTION = 0.875) -> uint8 (3, size, size)."""
    hwc = pixels(img)
    h, w = hwc.shape[:2]
    side = int(round(fraction * min(h, w)))
    box = (int(round((h - side) / 2.0)), int(round((w - side) / 2.0)), side, side)  # torchvision's centre
    return resized_crop(hwc, box, size)


class EvalTransform:
    """Linear-eval / fine-tune transform -> uint8 (3, size, size), as the views; the
    batch becomes float in [0, 1] on the device (features.to_device).

    train: random resized crop + flip only (no colour, no blur).
    test:  centre crop of 87.5% + resize; at 32 px and below no crop (official).
    """

    def __init__(self, size, train):
        self.size, self.train = size, train
        self.crop_flip = CropFlip(size)

    def __call__(self, img, generator=None):
        if self.train:
            return self.crop_flip(img, generator)
        return center_crop_resize(img, self.size, 1.0 if self.size <= 32 else 0.875)

    def __repr__(self):
        return f"EvalTransform(size={self.size}, train={self.train})"


# ----------------------------------------------------------------------------
# A picture of the views: python augment.py IMAGE [IMAGE...] --out views.png

def main(argv=None):
    """Write a grid: one row per image, the image (square centre crop) and then --pairs pairs of its
    views, made with the pretraining flags that shape them."""
    import argparse

    from PIL import Image
    from torchvision.utils import save_image

    p = argparse.ArgumentParser(description="A grid of SimCLR views: each image, then --pairs pairs of its views. "
                                            "The defaults are the ImageNet recipe; pretrain.py's CIFAR recipe "
                                            "(images <= 32 px) is --strength 0.5 --no-blur.")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--out", default="views.png", help="the grid to write (PNG, JPEG, ...)")
    p.add_argument("--pairs", type=int, default=4, help="pairs of views per image")
    p.add_argument("--image-size", type=int, default=224, help="view size in pixels")
    p.add_argument("--strength", type=float, default=1.0, help="colour distortion strength s")
    p.add_argument("--blur", action=argparse.BooleanOptionalAction, default=True, help="Gaussian blur with p=0.5")
    p.add_argument("--crop-sampler", default="official", choices=CROP_SAMPLERS)
    p.add_argument("--seed", type=int, default=0, help="seeds every view")
    args = p.parse_args(argv)
    if args.pairs < 1 or args.image_size < 1 or not 0 <= args.strength < float("inf"):
        p.error("--pairs and --image-size must be at least 1, --strength a finite number >= 0")
    views = SimCLRViews(args.image_size, strength=args.strength, blur=args.blur, crop_sampler=args.crop_sampler)
    generator = torch.Generator().manual_seed(args.seed)
    tiles = []
    for path in args.images:
        try:
            with Image.open(path) as f:
                img = f.convert("RGB")
        except OSError as e:
            p.error(f"cannot read {path}: {e}")
        tiles.append(center_crop_resize(img, args.image_size, fraction=1.0).float() / 255.0)  # uint8 (3, size, size)
        for _ in range(args.pairs):
            tiles.extend(views(img, generator))
    try:
        save_image(torch.stack(tiles), args.out, nrow=1 + 2 * args.pairs, padding=2, pad_value=1.0)
    except OSError as e:  # read-only, full, a folder in the way: one line (this file imports no script helpers)
        p.exit(2, f"augment.py: error: cannot write {args.out} ({e.strerror or e}); choose another --out\n")
    print(f"wrote {args.out}: {len(args.images)} rows of the image and {args.pairs} pairs of {views}")


if __name__ == "__main__":
    main()
