"""The pretrained encoder out of this project: for torchvision, for detectron2, or as features.

  python export.py runs/imagenet/encoder.pt --to torchvision resnet50_simclr.pth
  python export.py runs/imagenet/encoder.pt --to detectron2 resnet50_simclr.pkl
  python export.py runs/mine/encoder.pt --to features --data-dir photos features.npz

Reads encoder.pt or ckpt.pt (pretrain.py, convert_official.py). torchvision: the state dict under
torchvision's names; torchvision.models.resnetNN() loads it strictly with fc replaced by
nn.Identity(), and gives the encoder's features exactly (width 1, ImageNet stem). detectron2: the
pickle DetectionCheckpointer reads for build_resnet_backbone, and the config lines it needs are
printed. features: h of every image under --data-dir, in sorted path order, to OUT.npz
(`features` (N, d) float32, `paths` (N,)). Selective-kernel encoders and the CIFAR stem are refused
for torchvision and detectron2 with one line; TensorFlow's max-pool padding gives a warning.

Details: docs/export.md.
"""
import argparse
import pickle
import sys

import numpy as np
import torch
import torchvision

import data
import flags
import output
from augment import EvalTransform
from distributed import AMP_DTYPES, add_amp_flags, fail, resolve_amp, run, setup
from features import extract_features
from model import CheckpointError, build_encoder, load_encoder, pretrain_settings, save_atomic, tensor_bytes

TARGETS = ("torchvision", "detectron2", "features")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="encoder.pt or ckpt.pt")
    p.add_argument("out", help="the file to write (.pth for torchvision, .pkl for detectron2, .npz for features)")
    p.add_argument("--to", required=True, choices=TARGETS)
    p.add_argument("--data-dir", default=None, help="--to features: the folder of images (any layout)")
    p.add_argument("--image-size", type=int, default=None, help="--to features: default: the pretraining one")
    p.add_argument("--batch-size", type=int, default=256, help="--to features: images per batch")
    p.add_argument("--workers", type=int, default=None, help="--to features: data loading processes")
    add_amp_flags(p, what="the encoder (--to features)")
    args = p.parse_args(argv)
    if args.to == "features" and not args.data_dir:
        p.error("--to features needs --data-dir, the folder of images")
    if args.to != "features" and args.data_dir:
        p.error(f"--data-dir is for --to features; --to {args.to} exports the weights alone")
    flags.check(p.error, args, {"batch_size": "[1, inf)", "image_size": "[1, inf)", "workers": "[0, inf)"})
    return args


# ----------------------------------------------------------------------------
# torchvision and detectron2

def check_stem(encoder, target):
    """One line unless the encoder has the ImageNet stem (and, for torchvision, width 1)."""
    config = encoder.config
    if config["cifar_stem"]:
        fail(f"this encoder has the CIFAR stem (3x3 convolution, no max-pool); {target}'s ResNet has the ImageNet "
             "stem (7x7, stride 2, max-pool), so its weights cannot go there")
    if config.get("sk_ratio") or config.get("first_group_projection"):
        kind = "selective-kernel (SimCLRv2 sk1)" if config.get("sk_ratio") else "official ResNet-18/34 shortcut"
        fail(f"this encoder has {kind} blocks; {target}'s ResNet has no such layers, so its weights cannot go "
             "there (export a plain ResNet, or use it through model.load_encoder / --to features)")
    if target == "torchvision" and config["width"] != 1:
        fail(f"this encoder has width {config['width']:g}; torchvision's ResNets exist at width 1 only "
             "(--to detectron2 takes any width of ResNet-50/101/152)")


def torchvision_state(encoder):
    """The encoder's weights under torchvision's names (this project's names at width 1): a plain
    state dict that torchvision.models.<arch>() loads strictly except for fc."""
    check_stem(encoder, "torchvision")
    state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    net = getattr(torchvision.models, encoder.config["arch"])()
    missing, unexpected = net.load_state_dict(state, strict=False)
    if sorted(missing) != ["fc.bias", "fc.weight"] or unexpected:  # a guard: the names are shared by construction
        raise RuntimeError(f"torchvision's {encoder.config['arch']} does not take these weights: "
                           f"missing {missing}, unexpected {unexpected}")
    return state


def detectron2_name(name):
    """This project's (torchvision's) parameter name -> detectron2's ResNet backbone name, or None for
    tensors detectron2 has no place for (num_batches_tracked: its FrozenBatchNorm2d keeps none).
    conv1 / bn1 -> stem.conv1 / stem.conv1.norm; layerK.i -> res{K+1}.i, where bnJ -> convJ.norm and the
    projection shortcut downsample.0 / downsample.1 -> shortcut / shortcut.norm."""
    parts = name.split(".")
    if parts[-1] == "num_batches_tracked":
        return None
    if parts[0] in ("conv1", "bn1"):
        return "stem.conv1." + ("norm." if parts[0] == "bn1" else "") + parts[-1]
    stage, block, module, rest = f"res{int(parts[0][len('layer'):]) + 1}", parts[1], parts[2], parts[3:]
    if module == "downsample":
        module, rest = ("shortcut" if rest[0] == "0" else "shortcut.norm"), rest[1:]
    elif module.startswith("bn"):
        module = f"conv{module[2:]}.norm"
    return ".".join([stage, block, module] + rest)


def detectron2_checkpoint(encoder):
    """{"model": {detectron2 name: float32 numpy array}, "__author__", "matching_heuristics": True}."""
    check_stem(encoder, "detectron2")
    config = encoder.config
    if config["arch"] in ("resnet18", "resnet34") and config["width"] != 1:
        fail(f"detectron2 builds {config['arch']} at width 1 only (it requires RES2_OUT_CHANNELS = 64); "
             f"this encoder has width {config['width']:g}")
    weights = {}
    for k, v in encoder.state_dict().items():
        name = detectron2_name(k)
        if name is not None:
            weights[name] = v.detach().cpu().float().numpy()
    return {"model": weights, "__author__": f"simclr export.py from {encoder.config}", "matching_heuristics": True}


def pixel_lines(encoder):
    """detectron2 normalises (x - PIXEL_MEAN) / PIXEL_STD on 0-255 pixels: what makes the encoder's own input,
    [0, 1] RGB, or (x - mean) / std of it when it was pretrained with --input-norm."""
    mean = encoder.input_mean.flatten().tolist() if encoder.normalise_input else [0.0, 0.0, 0.0]
    std = encoder.input_std.flatten().tolist() if encoder.normalise_input else [1.0, 1.0, 1.0]
    seen = f"{encoder.config['input_norm']}-normalised RGB" if encoder.normalise_input else "RGB in [0, 1]"
    return [f"MODEL.PIXEL_MEAN {[round(255 * m, 4) for m in mean]}",
            f"MODEL.PIXEL_STD {[round(255 * v, 4) for v in std]}  # the encoder saw {seen}"]


def detectron2_config(encoder, path):
    """The detectron2 config lines that build the backbone these weights fit."""
    config = encoder.config
    depth = int(config["arch"][len("resnet"):])
    stem = encoder.conv1.out_channels
    lines = [f"MODEL.WEIGHTS {path}", f"MODEL.RESNETS.DEPTH {depth}",
             "MODEL.RESNETS.STRIDE_IN_1X1 False  # the stride is in the 3x3 convolution (torchvision's, ResNet v1.5)",
             *pixel_lines(encoder), "INPUT.FORMAT RGB"]
    if depth >= 50 and stem != 64:
        lines += [f"MODEL.RESNETS.STEM_OUT_CHANNELS {stem}", f"MODEL.RESNETS.WIDTH_PER_GROUP {stem}",
                  f"MODEL.RESNETS.RES2_OUT_CHANNELS {encoder.layer1[0].conv3.out_channels}"]
    return lines


def pooling_shift(encoder, images=8, size=224, seed=0):
    """How much a max-pool padded as PyTorch's (1 on each side) moves the features of an encoder built
    with TensorFlow's 'SAME' padding: (max |h - h'|, max |h|, smallest cosine similarity of h and h'),
    on `images` smooth random images of `size` px (8 x 8 uniform noise, bicubically enlarged: pixel noise
    alone would hide the shift, a max over a window of noise being much the same wherever it sits)."""
    config = {k: v for k, v in encoder.config.items() if k != "tf_same_pool"}
    other = build_encoder(**config)
    other.load_state_dict(encoder.state_dict())
    x = torch.rand(images, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    with torch.no_grad():
        h, h2 = encoder.eval()(x), other.eval()(x)
    cos = torch.nn.functional.cosine_similarity(h, h2, dim=1).min().item()
    return (h - h2).abs().max().item(), h.abs().max().item(), cos


def warn_tf_pool(encoder, target):
    if not encoder.config.get("tf_same_pool"):
        return
    diff, scale, cos = pooling_shift(encoder)
    print(f"warning: this encoder pads its stem max-pool as TensorFlow ('SAME': 0 before, 1 after at even sizes); "
          f"{target}'s max-pool pads 1 on each side, which shifts every pooling window and the features: on 8 "
          f"smooth random 224 px images max |h - h_{target}| = {diff:.4g} (of max |h| {scale:.4g}, {100 * diff / scale:.2g}%), "
          f"smallest cosine similarity {cos:.6f}. Exported anyway", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------
# features

def export_features(args, encoder, ckpt):
    ctx = setup()
    args.amp, amp_text = resolve_amp(args.amp, ctx.device, train=False)
    size = args.image_size or pretrain_settings(ckpt).get("image_size") or 224
    if flags.image_size_problem(size, encoder.config["cifar_stem"]):
        fail(flags.image_size_problem(size, encoder.config["cifar_stem"]))
    images = data.FolderImages(args.data_dir)
    output.check_file(args.out, "OUT")  # every input is checked: the folder is made
    workers = data.default_workers() if args.workers is None else args.workers
    loader = data.make_loader(data.SeededTransform(images, EvalTransform(size, train=False), strict=True,
                                                   hint="export.py writes the features of every image, so each "
                                                        "must be readable"),
                              args.batch_size, train=False, workers=workers, pin_memory=ctx.cuda)
    print(f"{amp_text}; {data.describe(images, 'folder', args.data_dir, None).split(': ', 1)[1]}, {size} px, "
          f"encoder {encoder.config}", flush=True)
    # eval mode: BN uses the statistics from pretraining, as in the evaluation scripts
    feats, _ = extract_features(encoder.to(ctx.device).eval(), loader, ctx.device, AMP_DTYPES[args.amp],
                                what="features")
    output.write_atomic(args.out, lambda tmp: np.savez(tmp, features=feats.float().cpu().numpy(),
                                                       paths=np.array([p for p, _ in images.samples])),
                        "OUT", needed=feats.numel() * 4, suffix=".npz")  # np.savez adds .npz to a name without it
    print(f"wrote {args.out}: features {tuple(feats.shape)} float32 and paths ({len(images)})", flush=True)


def _dump_pickle(obj, path):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def main(argv=None):
    args = get_args(argv)
    output.check_file(args.out, "OUT", create_folder=False)  # told without making anything
    encoder, ckpt = load_encoder(args.checkpoint)
    if args.to == "features":
        return export_features(args, encoder, ckpt)
    if args.to == "torchvision":
        state = torchvision_state(encoder)
        warn_tf_pool(encoder, "torchvision")
        output.check_file(args.out, "OUT")
        with output.writing(args.out, "OUT", needed=tensor_bytes(state)):
            save_atomic(state, args.out)
        arch = encoder.config["arch"]
        if encoder.normalise_input:  # torchvision's model has no input normalisation of its own
            print(f"note: this encoder was pretrained with --input-norm {encoder.config['input_norm']}: feed the "
                  "torchvision model (x - mean) / std of [0, 1] RGB, e.g. torchvision.transforms.Normalize"
                  f"({encoder.input_mean.flatten().tolist()}, {encoder.input_std.flatten().tolist()})", flush=True)
        print(f"wrote {args.out}: {len(state)} tensors for torchvision.models.{arch}(); load with\n"
              f"  net = torchvision.models.{arch}(); net.fc = torch.nn.Identity()\n"
              f"  net.load_state_dict(torch.load({args.out!r}))", flush=True)
        return
    checkpoint = detectron2_checkpoint(encoder)
    warn_tf_pool(encoder, "detectron2")
    output.check_file(args.out, "OUT")
    output.write_atomic(args.out, lambda tmp: _dump_pickle(checkpoint, tmp), "OUT",
                        needed=sum(v.nbytes for v in checkpoint["model"].values()))
    print(f"wrote {args.out}: {len(checkpoint['model'])} tensors of detectron2's ResNet backbone; config:\n  "
          + "\n  ".join(detectron2_config(encoder, args.out)), flush=True)


if __name__ == "__main__":
    run(main, (data.DataError, CheckpointError, output.WriteError), data.error_text)
