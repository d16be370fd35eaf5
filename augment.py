"""SimCLR views: random resized crop + flip, colour distortion, Gaussian blur.

Implements the augmentation of Chen et al. 2020 (Sec. 3, Appendix A) as the
official code does it (data_util.py): images are floats in [0, 1] with no
mean/std normalisation.

The work is split in two stages so that the expensive part can run in batches
wherever the images live:
  CropFlip    per image, on a PIL image or uint8 tensor -> uint8 (3, size, size)
  distort     per batch, float (B, 3, size, size) in [0, 1], any device: colour
              jitter (p=0.8, the four operations in a random order per image),
              grayscale (p=0.2), Gaussian blur (p=0.5), each image drawing its
              own parameters.

    views = SimCLRViews(224)            # CIFAR: SimCLRViews(32, strength=0.5, blur=False)
    x1, x2 = views(pil_image)           # two float (3, 224, 224) tensors in [0, 1]
"""
import math

import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

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
    """tf.image.adjust_contrast: scale each channel about its own mean."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    return (x - mean) * _per_image(factor) + mean


def adjust_saturation(x, factor):
    """tf.image.adjust_saturation: HSV saturation times factor, clipped to 1.

    In HSV, scaling S keeps hue and value V = max(r, g, b), and each channel
    c maps to V - k * (V - c) with k = factor, capped at V / (V - min) where
    S would exceed 1. Same result as converting to HSV and back, without it.
    """
    v = x.amax(dim=1, keepdim=True)
    spread = v - x.amin(dim=1, keepdim=True)
    cap = v / spread.clamp_min(1e-12)
    k = torch.minimum(_per_image(factor).expand_as(cap), cap)
    return v - k * (v - x)


def adjust_hue(x, delta):
    """tf.image.adjust_hue: rotate the HSV hue by delta (fraction of a turn)."""
    r, g, b = x.unbind(dim=1)
    v, _ = x.max(dim=1)
    chroma = v - x.min(dim=1).values
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(v == r, (g - b) / safe,
                      torch.where(v == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = (hue / 6.0 + delta.view(-1, 1, 1)) % 1.0
    # HSV -> RGB: channel n (5 for R, 3 for G, 1 for B) is V - C * clamp(min(k, 4 - k), 0, 1)
    # with k = (n + 6 * hue) mod 6.
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = (n + 6.0 * hue.unsqueeze(1)) % 6.0
    return v.unsqueeze(1) - chroma.unsqueeze(1) * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


def to_grayscale(x):
    """Luma, repeated over the 3 channels."""
    w = torch.tensor(GRAY_WEIGHTS, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True).expand_as(x)


def blur_kernel_size(size):
    """Official rule: kernel_size = size // 10, made odd (23 taps at 224 px)."""
    return 2 * ((size // 10) // 2) + 1


def gaussian_blur(x, sigma, kernel_size):
    """Separable Gaussian blur with one sigma per image, reflect padding.

    x: (B, C, H, W) float; sigma: (B,). Two 1-D passes (2K taps per pixel
    instead of K^2). The official code pads with zeros ('SAME'), which darkens
    the border; reflect padding keeps the image's own edge values.
    """
    b, c, h, w = x.shape
    radius = kernel_size // 2
    if radius == 0:
        return x
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-t.pow(2) / (2.0 * sigma.to(x.dtype).view(-1, 1).pow(2)))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (B*C, K)
    mode = "reflect" if radius < min(h, w) else "replicate"  # reflect needs a side longer than the radius
    y = x.reshape(1, b * c, h, w)  # one group per (image, channel)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode=mode), kernel.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode=mode), kernel.view(b * c, 1, -1, 1), groups=b * c)
    return y.reshape(b, c, h, w)


def _uniform(n, low, high, x, generator):
    return low + (high - low) * torch.rand(n, generator=generator, device=x.device, dtype=x.dtype)


def color_jitter(x, strength=1.0, generator=None):
    """Brightness, contrast, saturation (0.8 s each) and hue (0.2 s), applied in a
    random order drawn per image, clipped to [0, 1] after each (official color_jitter_rand)."""
    n = x.shape[0]
    s = 0.8 * strength
    factors = [_uniform(n, max(0.0, 1.0 - s), 1.0 + s, x, generator) for _ in range(3)]
    factors.append(_uniform(n, -0.2 * strength, 0.2 * strength, x, generator))
    ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    order = torch.rand(n, 4, generator=generator, device=x.device).argsort(dim=1)  # a permutation per image
    x = x.clone()
    for position in range(4):
        for op_index, (op, factor) in enumerate(zip(ops, factors)):
            idx = (order[:, position] == op_index).nonzero().squeeze(1)
            if idx.numel():
                x[idx] = op(x[idx], factor[idx]).clamp_(0.0, 1.0)
    return x


def _apply_where(x, p, fn, generator):
    """x[i] = fn(x[i]) for the images chosen with probability p each, in place."""
    idx = (torch.rand(x.shape[0], generator=generator, device=x.device) < p).nonzero().squeeze(1)
    if idx.numel():
        x[idx] = fn(x[idx])
    return x


def distort(x, strength=1.0, blur=True, generator=None):
    """Colour distortion and blur of SimCLR on a float batch (B, 3, H, W) in [0, 1].

    Jitter with p = 0.8, then grayscale with p = 0.2 (random_color_jitter),
    then Gaussian blur with p = 0.5, sigma ~ U[0.1, 2.0], kernel ~10% of the
    side (batch_random_blur). Every image draws its own parameters. Returns a
    new tensor; x is not modified.
    """
    if x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise ValueError(f"distort expects a float batch (B, 3, H, W), got {tuple(x.shape)} {x.dtype}")
    x = x.clone()
    x = _apply_where(x, 0.8, lambda v: color_jitter(v, strength, generator), generator)
    x = _apply_where(x, 0.2, to_grayscale, generator)
    if blur:
        size = blur_kernel_size(x.shape[-2])
        x = _apply_where(x, 0.5, lambda v: gaussian_blur(v, _uniform(len(v), 0.1, 2.0, v, generator), size), generator)
    return x.clamp_(0.0, 1.0)


# ----------------------------------------------------------------------------
# Per-image geometric stage.

def _rgb(img):
    """PIL images in any mode (grayscale, palette, CMYK, RGBA) -> RGB; tensors pass."""
    if isinstance(img, torch.Tensor) or img.mode == "RGB":
        return img
    return img.convert("RGB")


def _to_uint8_tensor(img):
    return img if isinstance(img, torch.Tensor) else TF.pil_to_tensor(img)


def random_resized_crop_params(height, width, scale, ratio, generator=None, attempts=100):
    """Crop box (top, left, h, w): area fraction ~ U(scale), log aspect ratio ~ U(log ratio),
    retried until it fits (Inception-style; the official code makes up to 100 attempts),
    else the largest central crop within the ratio range."""
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


class CropFlip:
    """Random resized crop (area 0.08-1, aspect 3/4-4/3, bicubic) and horizontal
    flip (p = 0.5), on a PIL image or uint8 (3, H, W) tensor -> uint8 (3, size, size)."""

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = size, scale, ratio

    def __call__(self, img, generator=None):
        img = _rgb(img)
        _, height, width = TF.get_dimensions(img)
        top, left, h, w = random_resized_crop_params(height, width, self.scale, self.ratio, generator)
        img = TF.resized_crop(img, top, left, h, w, [self.size, self.size],
                              interpolation=InterpolationMode.BICUBIC, antialias=True)
        if torch.rand(1, generator=generator).item() < 0.5:
            img = TF.hflip(img)
        return _to_uint8_tensor(img)

    def __repr__(self):
        return f"CropFlip(size={self.size})"


class SimCLRViews:
    """Two independent SimCLR views of one image, float (3, size, size) in [0, 1].

    Defaults are the ImageNet recipe; CIFAR uses SimCLRViews(32, strength=0.5, blur=False).
    Pass a torch.Generator to make the views reproducible.
    """

    def __init__(self, size=224, strength=1.0, blur=True):
        self.size, self.strength, self.blur = size, strength, blur
        self.crop_flip = CropFlip(size)

    def __call__(self, img, generator=None):
        pair = torch.stack([self.crop_flip(img, generator), self.crop_flip(img, generator)])  # (2, 3, s, s) uint8
        x1, x2 = distort(pair.float().div_(255.0), self.strength, self.blur, generator).unbind(0)
        return x1, x2

    def __repr__(self):
        return f"SimCLRViews(size={self.size}, strength={self.strength}, blur={self.blur})"


# ----------------------------------------------------------------------------
# Evaluation transforms (linear evaluation and fine-tuning).

def center_crop_resize(img, size, fraction=0.875):
    """Square centre crop of `fraction` of the shorter side, then bicubic resize
    (official center_crop, CROP_PROPORTION = 0.875)."""
    _, h, w = TF.get_dimensions(img)
    side = int(round(fraction * min(h, w)))
    if side != h or side != w:
        img = TF.center_crop(img, [side, side])
    if side != size:
        img = TF.resize(img, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return img


class EvalTransform:
    """Linear-eval / fine-tune transform -> float (3, size, size) in [0, 1].

    train: random resized crop + flip only (no colour, no blur).
    test:  centre crop of 87.5% + resize; at 32 px and below no crop (official).
    """

    def __init__(self, size, train):
        self.size, self.train = size, train
        self.crop_flip = CropFlip(size)

    def __call__(self, img, generator=None):
        img = _rgb(img)
        if self.train:
            x = self.crop_flip(img, generator)
        else:
            x = _to_uint8_tensor(center_crop_resize(img, self.size, 1.0 if self.size <= 32 else 0.875))
        return x.float().div_(255.0)

    def __repr__(self):
        return f"EvalTransform(size={self.size}, train={self.train})"
