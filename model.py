"""SimCLR model: ResNet encoder f, projection head g, and encoder save/load.

Implements Sec. 2.1 and Appendix B.9 of Chen et al. 2020 and the official
resnet.py: a ResNet whose width multiplier scales every convolution (ResNet-50
1x/2x/4x: 24M/94M/375M parameters, 2048/4096/8192-d features), the last BN
gamma of each residual block initialised to zero, and a CIFAR stem (3x3 conv,
stride 1, no max-pool) for 32 px images. At width 1 parameter names and shapes
are torchvision's, so a torchvision ResNet state dict (minus fc) loads strictly.
h = f(x) is the representation; z = g(h) only feeds the contrastive loss.
Also the SimCLRv2 variants of the official code: selective kernels with ResNet-D
stem and shortcuts (sk_ratio), and its ResNet-18/34 shortcuts (first_group_projection).

    encoder = build_encoder("resnet50", width=1)         # (B, 3, H, W) -> (B, 2048)
    model = SimCLR(encoder, ProjectionHead(encoder.feature_dim))
    h, z = model(images)

Classifier is a fine-tuned network (encoder, the first k projection-head layers, a linear
layer: SimCLRv2's), saved and loaded with save_classifier / load_classifier. rescale_convs
changes the scale of the BN-normalised kernels without changing the function (what a momentum
optimizer's effective step depends on; conv_weight_scale measures it).

With activation_checkpointing=True the encoder keeps only the input of the stem and
of each residual block through the backward pass and recomputes the rest there: the
same loss, gradients and BatchNorm statistics, in less memory, for about one more
forward pass of compute.
"""
import math
import os
import warnings
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CHECKPOINT_FORMAT = "simclr-encoder"  # marks files written by save_encoder / pretrain.py


def _conv(cin, cout, kernel, stride=1):
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34). projection=True gives it a projection shortcut even
    where the shape does not change (the official first block of the first group)."""
    expansion = 1

    def __init__(self, cin, planes, stride=1, projection=False, sk_ratio=0.0):
        super().__init__()
        if sk_ratio > 0:
            raise ValueError("sk_ratio needs a bottleneck ResNet (resnet50/101/152): the official resnet.py "
                             "builds no selective-kernel ResNet-18/34")
        self.conv1 = _conv(cin, planes, 3, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(planes, planes, 3)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, planes, stride, projection)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (carries the stride, 'ResNet v1.5') -> 1x1 x4 (ResNet-50/101/152).

    With sk_ratio > 0 (SimCLRv2 "sk1"), the 3x3 convolution and its BN + ReLU become a
    SelectiveKernel and the projection shortcut is ResNet-D's (official resnet.py,
    bottleneck_block, lines 431-475)."""
    expansion = 4

    def __init__(self, cin, planes, stride=1, projection=False, sk_ratio=0.0):
        super().__init__()
        self.conv1 = _conv(cin, planes, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.sk = sk_ratio > 0
        if self.sk:
            self.conv2 = SelectiveKernel(planes, planes, stride, sk_ratio)  # includes its BN + ReLU
        else:
            self.conv2 = _conv(planes, planes, 3, stride)
            self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv(planes, planes * 4, 1)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, planes * 4, stride, projection, resnet_d=self.sk)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.conv2(out) if self.sk else self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class SelectiveKernel(nn.Module):
    """The official sk_conv2d (resnet.py lines 280-310; Li et al. 2019, two 3x3 branches).

    One 3x3 convolution to 2f channels (the block's stride) + BN + ReLU, split into two
    branches a, b of f channels. The attention reads the spatial mean of a + b through a
    1x1 conv to max(int(f * sk_ratio), 32) channels + BN + ReLU and a 1x1 conv to 2f (no
    BN, no bias); a softmax over the two branches, per channel, weighs them: out = wa*a + wb*b.
    """

    def __init__(self, cin, planes, stride, sk_ratio, min_dim=32):
        super().__init__()
        mid = max(int(planes * sk_ratio), min_dim)
        self.conv = _conv(cin, 2 * planes, 3, stride)
        self.bn = nn.BatchNorm2d(2 * planes)
        self.fc1 = nn.Conv2d(planes, mid, 1, bias=False)
        self.fc_bn = nn.BatchNorm2d(mid)
        self.fc2 = nn.Conv2d(mid, 2 * planes, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        a, b = self.relu(self.bn(self.conv(x))).chunk(2, dim=1)  # 2 x (B, f, H, W)
        s = (a + b).mean((2, 3), keepdim=True)  # (B, f, 1, 1)
        logits = self.fc2(self.relu(self.fc_bn(self.fc1(s))))  # (B, 2f, 1, 1): first f for a, last f for b
        w = torch.stack(logits.chunk(2, dim=1)).softmax(dim=0)  # (2, B, f, 1, 1), softmax over the branches
        return a * w[0] + b * w[1]


class ResNetDPool(nn.Module):
    """The 2x2 average pool that ResNet-D puts before a projection shortcut's 1x1 convolution
    (official resnet.py lines 435-445; He et al. 2019, "Bag of Tricks").

    stride 2: pad bottom/right by one zero (fixed_padding with kernel 2), 2x2 'VALID' pool
    with stride 2, zeros counted (they enter only at odd sizes). stride 1 (the first block
    of the first group): TF's 2x2 'SAME' pool with stride 1, which pads one row and column
    after the input and averages only the real pixels there; replicating the last row and
    column gives the same means (each real edge pixel is counted twice, out of four)."""

    def __init__(self, stride):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        if self.stride == 1:
            return F.avg_pool2d(replicate_last_row_and_column(x), 2, stride=1)
        return F.avg_pool2d(F.pad(x, (0, 1, 0, 1)), 2, stride=self.stride)


def replicate_last_row_and_column(x):
    """x (B, C, H, W) -> (B, C, H + 1, W + 1), its last row and column repeated: what
    F.pad(x, (0, 1, 0, 1), mode="replicate") gives, element for element, built by concatenation.
    torch 2.1 has no bf16 CUDA kernel for replicate padding ("replication_pad2d_cuda" not
    implemented for 'BFloat16', pytorch/pytorch#117961; added by #112099 in October 2023, after
    the 2.1 branch), and SK encoders run this pool under bf16 autocast; torch.cat copies every
    dtype on every device and torch version."""
    x = torch.cat([x, x[:, :, -1:]], dim=2)
    return torch.cat([x, x[:, :, :, -1:]], dim=3)


def _shortcut(cin, cout, stride, projection=False, resnet_d=False):
    if stride == 1 and cin == cout and not projection:
        return None
    if resnet_d:  # pool, then a stride-1 1x1 conv: every input pixel reaches the shortcut
        return nn.Sequential(ResNetDPool(stride), _conv(cin, cout, 1), nn.BatchNorm2d(cout))
    return nn.Sequential(_conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))


class TFSameMaxPool(nn.Module):
    """3x3 / stride-2 max-pool with TensorFlow's 'SAME' padding, as the official stem.

    TF pads only as much as the output size ceil(n / 2) needs and puts the odd
    pixel after: at even sizes (112 px for 224 px images) 0 before and 1 after,
    where nn.MaxPool2d(padding=1) pads 1 on both sides and so shifts every window.
    """

    def forward(self, x):
        pads = []
        for n in (x.shape[-1], x.shape[-2]):  # F.pad order: last dim first
            total = max((math.ceil(n / 2) - 1) * 2 + 3 - n, 0)
            pads += [total // 2, total - total // 2]
        return F.max_pool2d(F.pad(x, pads, value=float("-inf")), kernel_size=3, stride=2)


ARCHS = {  # block type and blocks per stage
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}


# Input scalings of the encoder: (mean, std) per RGB channel; "none" leaves the [0, 1] pixels as they are.
INPUT_NORMS = {"none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
               "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
CONV_INITS = ("kaiming", "pytorch")


class ResNet(nn.Module):
    """ResNet trunk with global average pooling and no classifier: (B, 3, H, W) -> (B, feature_dim)."""

    def __init__(self, block, layers, width=1, cifar_stem=False, tf_same_pool=False, activation_checkpointing=False,
                 zero_init_residual=True, sk_ratio=0.0, first_group_projection=False, input_norm="none",
                 conv_init="kaiming"):
        super().__init__()
        self.activation_checkpointing = activation_checkpointing  # a run-time choice, not saved in config
        self.normalise_input = input_norm != "none"
        mean, std = INPUT_NORMS[input_norm]  # (x - mean) / std per channel before the stem; not in state_dict
        self.register_buffer("input_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        planes = [max(1, int(round(p * width))) for p in (64, 128, 256, 512)]
        if cifar_stem:  # 32 px images: keep the resolution (official: image_size <= 32)
            self.conv1 = _conv(3, planes[0], 3)
            self.maxpool = nn.Identity()
        else:
            if sk_ratio > 0:  # ResNet-D stem: three 3x3 convs, 32w, 32w, 64w (official resnet.py lines 575-586)
                c = max(1, planes[0] // 2)
                self.conv1 = nn.Sequential(_conv(3, c, 3, stride=2), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                                           _conv(c, c, 3), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                                           _conv(c, planes[0], 3))
            else:
                self.conv1 = _conv(3, planes[0], 7, stride=2)
            self.maxpool = (TFSameMaxPool() if tf_same_pool
                            else nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        cin = planes[0]
        for i, (p, n) in enumerate(zip(planes, layers)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, p, stride=2 if (i > 0 and j == 0) else 1,
                                    projection=(j == 0 and first_group_projection), sk_ratio=sk_ratio))
                cin = p * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = cin

        for m in self.modules():
            if isinstance(m, nn.Conv2d) and conv_init == "kaiming":  # "pytorch": nn.Conv2d's own init, kept
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules() if zero_init_residual else ():  # each residual block starts as the identity (official)
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def stem(self, x):
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward(self, x):
        if self.normalise_input:
            x = (x - self.input_mean) / self.input_std
        x = self._maybe_checkpoint(self.stem, (self.conv1, self.bn1), x)  # conv1 holds BNs in the ResNet-D stem
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x = self._maybe_checkpoint(block, (block,), x)
        return torch.flatten(self.avgpool(x), 1)

    def _maybe_checkpoint(self, fn, owners, x):
        """fn(x); with activation checkpointing, only x is kept for the backward pass,
        which runs fn a second time. The modules `owners` hold fn's BatchNorm layers."""
        if not (self.activation_checkpointing and torch.is_grad_enabled()):
            return fn(x)
        # The recomputation normalises with the batch statistics again (the same numbers),
        # but must not move the running statistics a second time. With SyncBatchNorm it
        # all-gathers the statistics again, inside the backward pass: every rank recomputes
        # the same blocks in the same order, so the collectives stay matched across ranks.
        return checkpoint(fn, x, use_reentrant=False, preserve_rng_state=False,  # no randomness inside
                          context_fn=lambda: (nullcontext(), frozen_running_stats(*owners)))


@contextmanager
def frozen_running_stats(*modules):
    """BatchNorm layers in `modules` (SyncBatchNorm too) normalise as usual, but their
    running_mean, running_var and num_batches_tracked come out untouched: for the time
    being they update scratch copies. (Not passing the buffers at all would change what
    the layer saves for its backward pass, which checkpoint matches by position.)"""
    layers = [m for module in modules for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    names = ("running_mean", "running_var", "num_batches_tracked")
    kept = [{n: getattr(m, n) for n in names} for m in layers]
    for m, buffers in zip(layers, kept):
        for n, b in buffers.items():
            setattr(m, n, None if b is None else b.clone())
    try:
        yield
    finally:
        for m, buffers in zip(layers, kept):
            for n, b in buffers.items():
                setattr(m, n, b)


def build_encoder(arch="resnet50", width=1, cifar_stem=False, tf_same_pool=False, activation_checkpointing=False,
                  zero_init_residual=True, sk_ratio=0.0, first_group_projection=False, input_norm="none",
                  conv_init="kaiming"):
    """ResNet encoder; `width` multiplies every convolution's channels (paper: 1, 2, 4).

    tf_same_pool=True pads the stem max-pool as TensorFlow's 'SAME' (see
    TFSameMaxPool): the official checkpoints (convert_official.py) need it for
    exact features; the default is torchvision's padding. Parameters are the same.

    sk_ratio > 0 (SimCLRv2 "sk1": 0.0625) builds the official selective-kernel ResNet
    (bottleneck depths only): ResNet-D stem (three 3x3 convs, in conv1), SelectiveKernel
    in place of every 3x3 convolution, ResNet-D projection shortcuts. ResNet-50 1x: 35.2M
    parameters against 23.5M.

    first_group_projection=True gives the first block of the first group a projection
    shortcut as the official resnet.py does (block_group: use_projection=True in every
    group's first block). Only ResNet-18/34 change (64w -> 64w at stride 1, where
    torchvision's has none); bottleneck ResNets have one there anyway.

    activation_checkpointing: recompute the activations inside the stem and each residual
    block in the backward pass instead of storing them (exact: same gradients and BN
    statistics; less memory, about one extra forward pass of time). It can be switched
    later through `encoder.activation_checkpointing` and is not part of `config`.

    zero_init_residual (default True, official): the last BN gamma of every residual block
    starts at 0; False starts it at 1, as torchvision's and lightly's ResNets do.

    input_norm: "none" (default, official: the network sees [0, 1] pixels) or "imagenet"
    (x - mean) / std with ImageNet's per-channel mean and std, as torchvision's and lightly's
    transforms do. It is part of the encoder (and of `config`), so every script that loads the
    encoder feeds it [0, 1] pixels either way.

    conv_init: "kaiming" (default: He normal, fan_out, as torchvision's ResNet; the official code
    uses a He-scaled variance too) or "pytorch" (nn.Conv2d's own uniform init, 1/sqrt(3) of that
    scale per fan_in, as lightly's ResNetGenerator keeps). Initialisation only, not in `config`.

    The returned module has `feature_dim` and `config` (the arguments that fix the
    weights, used by save_encoder so a checkpoint can rebuild it).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if not width > 0:
        raise ValueError(f"width must be positive, got {width}")
    if not 0 <= sk_ratio < 1:
        raise ValueError(f"sk_ratio must be in [0, 1) (0 = no selective kernels, SimCLRv2 sk1: 0.0625), got {sk_ratio}")
    if input_norm not in INPUT_NORMS:
        raise ValueError(f"unknown input_norm {input_norm!r}; choose one of {', '.join(INPUT_NORMS)}")
    if conv_init not in CONV_INITS:
        raise ValueError(f"unknown conv_init {conv_init!r}; choose one of {', '.join(CONV_INITS)}")
    block, layers = ARCHS[arch]
    encoder = ResNet(block, layers, width=width, cifar_stem=cifar_stem, tf_same_pool=tf_same_pool,
                     activation_checkpointing=activation_checkpointing, zero_init_residual=zero_init_residual,
                     sk_ratio=sk_ratio, first_group_projection=first_group_projection, input_norm=input_norm,
                     conv_init=conv_init)
    encoder.config = {"arch": arch, "width": width, "cifar_stem": bool(cifar_stem)}
    # the options below only when set, so configs of the default model (old checkpoints) stay as before
    if tf_same_pool:
        encoder.config["tf_same_pool"] = True
    if sk_ratio > 0:
        encoder.config["sk_ratio"] = float(sk_ratio)
    if first_group_projection:
        encoder.config["first_group_projection"] = True
    if input_norm != "none":
        encoder.config["input_norm"] = input_norm
    return encoder


def min_image_size(cifar_stem):
    """The smallest image (px) on which the encoder still works as a ResNet: every stride-2 layer
    halves a map of at least 2 px. Each halving (3x3 or 7x7 convolution, or max-pool, stride 2,
    padded) takes s px to ceil(s / 2). The CIFAR stem keeps the resolution and the first block of
    layers 2 and 3 halves it before layer 4 halves it once more: ceil(s / 4) >= 2 -> 5 px. The
    ImageNet stem (7x7 convolution or ResNet-D's three 3x3, then max-pool) halves it twice first:
    ceil(s / 16) >= 2 -> 17 px. Below that, layer 4 (and at smaller sizes layer 3 too) gets a 1x1
    map: its 3x3 convolutions see one pixel among zero padding and its stride does nothing."""
    return 2 ** (2 if cifar_stem else 4) + 1


class ProjectionHead(nn.Module):
    """g(h): num_layers linear layers, 128-d output.

    Hidden layers are Linear-BN-ReLU. As in the official code, the output
    layer is Linear followed by BN with a scale but no shift (center=False),
    and no ReLU; the loss normalises z anyway. num_layers=2 is SimCLR v1,
    3 is v2. hidden_dim defaults to in_dim. out_bn=False makes the output
    layer a plain Linear with a bias, as lightly's SimCLRProjectionHead and
    most PyTorch ports have it.
    """

    def __init__(self, in_dim, hidden_dim=None, out_dim=128, num_layers=2, out_bn=True):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        hidden_dim = hidden_dim or in_dim
        layers, dim = [], in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
            dim = hidden_dim
        if out_bn:
            bn = nn.BatchNorm1d(out_dim)
            bn.bias.requires_grad_(False)  # stays 0: BN without centring, as the official head
            layers += [nn.Linear(dim, out_dim, bias=False), bn]
        else:
            layers += [nn.Linear(dim, out_dim)]
        self.net = nn.Sequential(*layers)
        self.config = {"in_dim": in_dim, "hidden_dim": hidden_dim, "out_dim": out_dim, "num_layers": num_layers}
        if not out_bn:  # only then, so configs of the default head stay as before
            self.config["out_bn"] = False

    def forward(self, h):
        return self.net(h)

    def first_layers(self, k):
        """The first k layers as a module: h -> output of layer k (after its ReLU for a hidden
        layer; z for k = num_layers; h itself for k = 0). SimCLR v2 fine-tunes from k = 1."""
        if not 0 <= k <= self.config["num_layers"]:
            raise ValueError(f"the projection head has {self.config['num_layers']} layers; cannot take {k}")
        return self.net if k == self.config["num_layers"] else self.net[:3 * k]


class Classifier(nn.Module):
    """x -> class logits: an encoder, the first `head_layer` layers of a projection head, and a
    linear layer (SimCLRv2 Sec. 2.2 fine-tunes from head layer 1; head_layer 0 reads h).

    What finetune.py trains and saves, and distill.py's teacher and student. The whole head is
    kept (so that save_encoder writes it as load_head reads it), but its layers past `head_layer`
    take no part and are frozen (requires_grad False: DDP and the optimizers leave them out)."""

    def __init__(self, encoder, linear, head=None, head_layer=0):
        super().__init__()
        if head_layer and head is None:
            raise ValueError(f"head_layer {head_layer} needs a projection head")
        self.encoder, self.head, self.linear, self.head_layer = encoder, head, linear, head_layer
        if head is not None:
            kept = {id(p) for p in head.first_layers(head_layer).parameters()} if head_layer else set()
            for p in head.parameters():
                if id(p) not in kept:
                    p.requires_grad_(False)

    def forward(self, x):
        h = self.encoder(x)
        if self.head_layer:
            h = self.head.first_layers(self.head_layer)(h)
        return self.linear(h)

    @property
    def classes(self):
        return self.linear.out_features

    def stored(self):
        """The encoder.pt "classifier" entry: {"weight", "bias", "head_layer"}."""
        return {"weight": self.linear.weight.detach(), "bias": self.linear.bias.detach(), "head_layer": self.head_layer}


def scale_invariant_convs(encoder):
    """[(conv, the BatchNorm right after it)] for every convolution of a ResNet encoder whose
    output goes straight into a BN: all of them but the selective kernels' last attention conv."""
    order = [m for m in encoder.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    unnormalised = {id(m.fc2) for m in encoder.modules() if isinstance(m, SelectiveKernel)}
    pairs = []
    for i, m in enumerate(order):
        if isinstance(m, nn.Conv2d) and id(m) not in unnormalised:
            pairs.append((m, next(b for b in order[i + 1:] if isinstance(b, nn.BatchNorm2d))))
    return pairs


def conv_weight_scale(encoder):
    """The mean, over the BN-normalised convolutions, of |kernel| / the |kernel| that He
    initialisation (fan_out, model.py's) gives on average: about 1 for a new encoder. The official
    README (Known issues) measures SimCLRv1's ResNet-50 kernels 16.8x SimCLRv2's on average."""
    ratios = []
    for conv, _ in scale_invariant_convs(encoder):
        w = conv.weight.detach().float()
        fan_out = w.shape[0] * w[0, 0].numel()
        ratios.append(w.norm().item() / math.sqrt(w.numel() * 2.0 / fan_out))
    return sum(ratios) / len(ratios)


@torch.no_grad()
def rescale_convs(encoder, factor):
    """Multiply every BN-normalised convolution kernel by `factor` and its BN's running mean by
    `factor`, running variance by factor^2: the same function (BN normalises the scale away), with
    weights of another scale; up to BN's epsilon, which now counts 1/factor^2 as much (it matters
    only where a variance nears it: in train mode, the SK attention's BN on a few images). SGD's step on such a kernel changes its direction
    by about lr / |w|^2, so this is what sets the effective learning rate of a momentum optimizer;
    LARS scales its steps with |w| and is unaffected."""
    for conv, bn in scale_invariant_convs(encoder):
        conv.weight.mul_(factor)
        if bn.running_mean is not None:
            bn.running_mean.mul_(factor)
            bn.running_var.mul_(factor * factor)
    return encoder


class SimCLR(nn.Module):
    """Encoder + projection head: x -> (h, z).

    bn_chunks=1 (default, official): the whole batch x = [x1; x2] goes through every BN layer
    at once, so both views share the batch statistics. bn_chunks=2 forwards each view (each
    half of x) on its own, so each has its own statistics, as lightly's examples do."""

    def __init__(self, encoder, head, bn_chunks=1):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.bn_chunks = bn_chunks

    def forward(self, x):
        if self.bn_chunks == 1:
            h = self.encoder(x)
            return h, self.head(h)
        hz = [(h, self.head(h)) for h in map(self.encoder, x.chunk(self.bn_chunks))]
        return torch.cat([h for h, _ in hz]), torch.cat([z for _, z in hz])


# ----------------------------------------------------------------------------
# Saving and loading. Two files, both plain dicts that load with
# torch.load(weights_only=True):
#   encoder.pt  {"format", "encoder_config", "encoder", "meta"}: what eval scripts need;
#               optionally "head_config" + "head" (projection head weights) and
#               "classifier": {"weight" (C, d), "bias" (C,), "head_layer": k}, a
#               linear classifier reading the output of head layer k (0: h itself)
#   ckpt.pt     pretrain.py's resume state; also carries "format",
#               "encoder_config" and "model" (encoder.* and head.* weights); finetune.py's
#               and distill.py's resume states likewise (a Classifier's encoder.*, head.*, linear.*)

def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written file, and a
    failed write (disk full, read-only) raises its OSError, leaving path as it was and no temporary
    file. Tensors are saved on the CPU, so a plain torch.load reads the file on a machine without a GPU."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            out = _WriteRecorder(f)
            try:
                torch.save(_on_cpu(obj), out)
            except RuntimeError:
                if out.error is not None:  # torch reports it as "unexpected pos N vs M"; the cause is the OSError
                    raise out.error from None
                raise
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class _WriteRecorder:
    """A file for torch.save that keeps the OSError of a failed write: torch's zip writer swallows it
    and fails later with a RuntimeError that names no cause ("unexpected pos")."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b):
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def tensor_bytes(obj):
    """The bytes of every tensor in obj's dicts, lists and tuples: about the size torch.save writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _on_cpu(obj):
    """obj with every tensor in its dicts, lists and tuples moved to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        out = type(obj)((k, _on_cpu(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # a state_dict's module versions
            out._metadata = obj._metadata
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj


def unwrap(module):
    """The plain module inside DDP (.module) and torch.compile (._orig_mod) wrappers."""
    while True:
        if hasattr(module, "_orig_mod"):
            module = module._orig_mod
        elif isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        else:
            return module


def save_encoder(path, encoder, head=None, classifier=None, **meta):
    """Write the encoder-only export read by linear_eval.py and finetune.py; with the
    projection head and a classifier ({"weight", "bias", "head_layer"}) when given."""
    encoder = unwrap(encoder)
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "encoder_config": dict(encoder.config),
        "encoder": encoder.state_dict(),
        "meta": meta,
    }
    if head is not None:
        ckpt["head_config"], ckpt["head"] = dict(unwrap(head).config), unwrap(head).state_dict()
    if classifier is not None:
        ckpt["classifier"] = dict(classifier)
    save_atomic(ckpt, path)


class CheckpointError(ValueError):
    """A file that is missing, unreadable, or not a checkpoint of this project."""


def read_checkpoint(path):
    """torch.load a checkpoint of this project, with one-line errors for bad files."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():
            # torch 2.1's weights_only loader reads a TypedStorage's dtype itself, which warns that
            # TypedStorage is deprecated: torch's own access, nothing the caller can change
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated", category=UserWarning)
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, or not a torch file: torch's whole text, on one line
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(e).__name__}: {' '.join(str(e).split())}); "
            "the file is truncated, corrupt, or not a PyTorch checkpoint") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a checkpoint written by this project's pretrain.py "
            "(expected ckpt.pt or encoder.pt from its --out folder)")
    return ckpt


def load_encoder(path):
    """Rebuild the encoder from encoder.pt or ckpt.pt alone -> (encoder, checkpoint dict).

    The encoder comes back on the CPU, in train mode, with the saved weights.
    """
    ckpt = read_checkpoint(path)
    if "encoder" in ckpt:
        state = ckpt["encoder"]
    else:
        state = {k[len("encoder."):]: v for k, v in ckpt["model"].items() if k.startswith("encoder.")}
    encoder = build_encoder(**ckpt["encoder_config"])
    try:
        encoder.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(
            f"{path}: weights do not match the encoder it describes "
            f"({ckpt['encoder_config']}): {str(e).splitlines()[0]}") from None
    return encoder, ckpt


def load_head(path, ckpt):
    """The projection head a checkpoint carries (encoder.pt "head", or ckpt.pt's head.*
    weights), in train mode on the CPU, or None when it has none."""
    if "head" in ckpt:
        config, state = ckpt["head_config"], ckpt["head"]
    elif "model" in ckpt and "proj_layers" in (ckpt.get("args") or {}):  # pretrain.py's ckpt.pt
        args = ckpt["args"]
        state = {k[len("head."):]: v for k, v in ckpt["model"].items() if k.startswith("head.")}
        config = {"in_dim": state["net.0.weight"].shape[1], "hidden_dim": args["proj_hidden_dim"],
                  "out_dim": args["proj_dim"], "num_layers": args["proj_layers"],
                  "out_bn": args.get("proj_out_bn", True)}
    else:
        return None
    head = ProjectionHead(**config)
    try:
        head.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: projection head weights do not match {config}: "
                              f"{str(e).splitlines()[0]}") from None
    return head


def save_classifier(path, classifier, **meta):
    """Write a Classifier in the encoder.pt format: the encoder, the projection head (when it reads
    one of its layers) and "classifier", as convert_official.py writes a fine-tuned official model."""
    classifier = unwrap(classifier)
    save_encoder(path, classifier.encoder, head=classifier.head if classifier.head_layer else None,
                 classifier=classifier.stored(), **meta)


def load_classifier(path, ckpt=None, encoder=None):
    """The classifier a checkpoint stores ("classifier", written by finetune.py, distill.py and
    convert_official.py) -> Classifier on the CPU, in train mode. encoder: the checkpoint's encoder
    when already loaded (load_encoder). CheckpointError when it stores none or it does not fit."""
    if encoder is None or ckpt is None:
        encoder, ckpt = load_encoder(path)
    stored = ckpt.get("classifier")
    if stored is None:
        raise CheckpointError(f"{path} stores no classifier, only an encoder: fine-tune one first "
                              "(finetune.py writes its network with its classifier), or convert an official "
                              "checkpoint that has one (finetuned_*, supervised, pretrained)")
    k = stored.get("head_layer", 0)
    head = load_head(path, ckpt) if k else None
    if k and head is None:
        raise CheckpointError(f"{path}: its classifier reads projection-head layer {k}, but it stores no projection head")
    weight, bias = stored["weight"], stored["bias"]
    dim = encoder.feature_dim if k == 0 else (head.config["out_dim"] if k == head.config["num_layers"]
                                              else head.config["hidden_dim"])
    if weight.dim() != 2 or weight.shape[1] != dim or bias.shape != weight.shape[:1]:
        raise CheckpointError(f"{path}: its classifier has weight {tuple(weight.shape)} and bias {tuple(bias.shape)}, "
                              f"but reads {dim}-d features (head layer {k})")
    linear = nn.Linear(weight.shape[1], weight.shape[0])
    linear.load_state_dict({"weight": weight, "bias": bias})
    return Classifier(encoder, linear, head, k)


def pretrain_settings(ckpt):
    """The pretraining flags a checkpoint records ({} if none): ckpt.pt keeps
    them in "args", encoder.pt in "meta" (with "args" inside when pretrain.py wrote it)."""
    meta = ckpt.get("meta") or {}
    settings = dict(meta.get("args") or ckpt.get("args") or {})
    settings.update({k: v for k, v in meta.items() if k != "args"})
    return settings
