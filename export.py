"""The pretrained encoder out of this project: for torchvision, for detectron2, as features, or as a
picture of each query image's nearest neighbours.

  python export.py runs/imagenet/encoder.pt --to torchvision resnet50_simclr.pth
  python export.py runs/imagenet/encoder.pt --to detectron2 resnet50_simclr.pkl
  python export.py runs/mine/encoder.pt --to features --data-dir photos features.npz
  python export.py runs/mine/encoder.pt --to neighbours --data-dir photos neighbours.png
  python export.py runs/mine/encoder.pt --to neighbours --features features.npz neighbours.png

Reads encoder.pt or ckpt.pt (pretrain.py, convert_official.py). torchvision: the state dict under
torchvision's names; torchvision.models.resnetNN() loads it strictly with fc replaced by
nn.Identity(), and gives the encoder's features exactly (width 1, ImageNet stem). detectron2: the
pickle DetectionCheckpointer reads for build_resnet_backbone, and the config lines it needs are
printed. features: h of every readable image under --data-dir, in sorted path order, to OUT.npz
(`features` (N, d) float32, `paths` (N,); unreadable images skipped and listed in `unreadable`, or
--strict-data). neighbours: a picture of each query image and its --k nearest images by cosine
similarity of h, from --data-dir or a --features file. Selective-kernel encoders and the CIFAR stem
are refused for torchvision and detectron2 with one line; TensorFlow's max-pool padding gives a warning.

Details: docs/export.md.
"""
import argparse
import json
import os
import pickle
import sys

import numpy as np
import torch
import torchvision
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset

import data
import flags
import output
from augment import EvalTransform, center_crop_resize
from distributed import AMP_DTYPES, add_amp_flags, fail, resolve_amp, run, setup
from features import extract_features, nearest, to_device
from model import CheckpointError, build_encoder, load_encoder, pretrain_settings, save_atomic, tensor_bytes

TARGETS = ("torchvision", "detectron2", "features", "neighbours")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="encoder.pt or ckpt.pt")
    p.add_argument("out", help="the file to write (.pth for torchvision, .pkl for detectron2, .npz for features, "
                               ".png or .jpg for neighbours)")
    p.add_argument("--to", required=True, choices=TARGETS)
    p.add_argument("--data-dir", default=None, help="--to features, neighbours: the folder of images (any layout)")
    p.add_argument("--strict-data", action="store_true",
                   help="--to features, neighbours: stop at an unreadable image (default: skip it, count it, and list "
                        "it in OUT.npz's `unreadable`)")
    p.add_argument("--image-size", type=int, default=None, help="--to features, neighbours: default: the pretraining one")
    p.add_argument("--batch-size", type=int, default=256, help="--to features, neighbours: images per batch")
    p.add_argument("--workers", type=int, default=None, help="--to features, neighbours: data loading processes")
    n = p.add_argument_group("--to neighbours")
    n.add_argument("--features", default=None, help="the features of the images (--to features' OUT.npz) instead of "
                                                     "--data-dir: a large folder is embedded once")
    n.add_argument("--queries", type=int, default=6, help="query images, drawn at random (--seed) from the images")
    n.add_argument("--query", action="append", default=None, metavar="PATH",
                   help="a query image instead (repeat for several); one that is not among the images is embedded "
                        "with the checkpoint")
    n.add_argument("--k", type=int, default=8, help="nearest images per query")
    n.add_argument("--seed", type=int, default=0, help="draws the queries")
    n.add_argument("--tile", type=int, default=128, help="pixels of each image in the picture")
    add_amp_flags(p, what="the encoder (--to features, neighbours)")
    args = p.parse_args(argv)
    images = args.to in ("features", "neighbours")
    if args.to == "features" and not args.data_dir:
        p.error("--to features needs --data-dir, the folder of images")
    if args.to == "neighbours" and bool(args.data_dir) == bool(args.features):
        p.error("--to neighbours needs the images: --data-dir DIR (embedded now) or --features FILE.npz (from --to "
                "features), one of them")
    if not images and (args.data_dir or args.features):
        p.error(f"--data-dir and --features are for --to features and neighbours; --to {args.to} exports the "
                "weights alone")
    if args.to != "neighbours" and args.features:
        p.error("--features is for --to neighbours")
    flags.check(p.error, args, {"batch_size": "[1, inf)", "image_size": "[1, inf)", "workers": "[0, inf)",
                                "k": "[1, inf)", "queries": "[1, inf)", "tile": "[16, inf)"})
    if args.to == "neighbours" and os.path.splitext(args.out)[1].lower() not in Image.registered_extensions():
        p.error(f"{args.out}: the picture's name must end in an image format PIL writes (.png, .jpg, ...)")
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

class OwnIndex(Dataset):
    """dataset[i] = (image, i): the label a row of features gets names the image it was made from, so
    the rows SeededTransform filled with a stand-in (for an image it could not read) are told apart."""

    def __init__(self, dataset):
        self.dataset, self.samples = dataset, dataset.samples

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i][0], i


def eval_image_size(args, encoder, ckpt, recorded=None):
    """The evaluation transform's size: --image-size, else the one the features were made at (a
    features file's), else the pretraining one; one line if the encoder's stem cannot take it."""
    size = args.image_size or recorded or pretrain_settings(ckpt).get("image_size") or 224
    flags.check_image_size(fail, size, encoder.config["cifar_stem"])
    return size


def folder_features(args, encoder, ckpt, ctx):
    """h of every readable image under --data-dir -> (features (N, d) float32 on the CPU, their paths
    (N,), the unreadable images' paths, image size)."""
    args.amp, amp_text = resolve_amp(args.amp, ctx.device, train=False)
    size = eval_image_size(args, encoder, ckpt)
    images = data.FolderImages(args.data_dir)
    if ctx.master:  # every input is checked: the folder is made (rank 0 writes the file)
        output.check_file(args.out, "OUT")
    workers = data.default_workers() if args.workers is None else args.workers
    loader = data.make_loader(data.SeededTransform(OwnIndex(images), EvalTransform(size, train=False),
                                                   strict=args.strict_data,
                                                   hint="without --strict-data unreadable images are skipped and "
                                                        "listed"),
                              args.batch_size, train=False, workers=workers, pin_memory=ctx.cuda)
    if ctx.master:
        print(f"{amp_text}; {data.describe(images, 'folder', args.data_dir, None).split(': ', 1)[1]}, {size} px, "
              f"encoder {encoder.config}", flush=True)
    # eval mode: BN uses the statistics from pretraining, as in the evaluation scripts
    feats, made_from = extract_features(encoder.to(ctx.device).eval(), loader, ctx.device, AMP_DTYPES[args.amp],
                                        what="features")
    readable = (made_from.cpu() == torch.arange(len(images))).numpy()  # rows of stand-ins are dropped
    paths = np.array([p for p, _ in images.samples])
    unreadable = paths[~readable]
    if len(unreadable) and ctx.master:
        print(f"skipped {len(unreadable)} unreadable image{'s' if len(unreadable) > 1 else ''} of {len(images)} "
              f"(warnings above; --strict-data stops at the first)", flush=True)
    return feats.float().cpu()[torch.from_numpy(readable)], paths[readable], unreadable, size


def export_features(args, encoder, ckpt):
    """Under torchrun each process embeds its share of the images and gets every row
    (extract_features gathers them); rank 0 writes the file."""
    ctx = setup()
    feats, paths, unreadable, size = folder_features(args, encoder, ckpt, ctx)
    if not ctx.master:
        return
    output.write_atomic(args.out, lambda tmp: np.savez(tmp, features=feats.numpy(), paths=paths, unreadable=unreadable,
                                                       image_size=np.array(size),
                                                       encoder=np.array(json.dumps(encoder.config))),
                        "OUT", needed=feats.numel() * 4, suffix=".npz")  # np.savez adds .npz to a name without it
    print(f"wrote {args.out}: features {tuple(feats.shape)} float32 and paths ({len(paths)})"
          + (f", and the {len(unreadable)} unreadable images' paths in `unreadable`" if len(unreadable) else ""),
          flush=True)


# ----------------------------------------------------------------------------
# neighbours

def read_features(path, encoder):
    """--to features' file -> (features (N, d) float32, paths (N,), image size or None)."""
    try:
        with np.load(path) as f:
            feats, paths = torch.from_numpy(f["features"]).float(), f["paths"]
            size = int(f["image_size"]) if "image_size" in f else None
            config = json.loads(str(f["encoder"])) if "encoder" in f else None
    except (OSError, ValueError, KeyError) as e:
        fail(f"cannot read features from {path} ({type(e).__name__}: {' '.join(str(e).split())[:160]}); "
             "make the file with --to features")
    if feats.dim() != 2 or len(feats) != len(paths) or len(paths) < 2:
        fail(f"{path} holds {tuple(feats.shape)} features for {len(paths)} paths; it needs at least 2 rows, one per path")
    if feats.shape[1] != encoder.feature_dim:
        fail(f"{path} holds {feats.shape[1]}-d features, this encoder gives {encoder.feature_dim}-d: the file was "
             "made with another encoder; pass that one's checkpoint, or embed the images anew with --data-dir")
    if config is not None and config != encoder.config:
        print(f"warning: {path} was made by an encoder {config}, not this one ({encoder.config}); queries from "
              "outside the file are embedded with this one", file=sys.stderr, flush=True)
    return feats, paths, size


@torch.no_grad()
def embed(encoder, paths, size, ctx, amp):
    """h of some image files, through the evaluation transform (as folder_features): (n, d) float32."""
    transform = EvalTransform(size, train=False)
    images = []
    for path in paths:
        try:
            images.append(transform(data.load_image(path)))
        except Exception as e:  # a missing or unreadable query (PIL raises OSError, SyntaxError, ValueError, ...)
            fail(f"cannot read the query image {path} ({type(e).__name__}: {' '.join(str(e).split())[:160]})")
    x = torch.stack(images)
    with torch.autocast(ctx.device.type, dtype=AMP_DTYPES[amp], enabled=AMP_DTYPES[amp] is not None):
        return encoder.to(ctx.device).eval()(to_device(x, ctx.device)).float().cpu()


def choose_queries(args, encoder, paths, size, ctx):
    """-> (query features (q, d) or None for rows of the set, the set's row of each query or -1, query paths)."""
    if not args.query:
        rows = np.random.default_rng(args.seed).choice(len(paths), size=min(args.queries, len(paths)), replace=False)
        return None, torch.from_numpy(rows), list(paths[rows])
    where = {os.path.realpath(p): i for i, p in enumerate(paths)}
    rows = torch.tensor([where.get(os.path.realpath(p), -1) for p in args.query])
    outside = [p for p, r in zip(args.query, rows.tolist()) if r < 0]
    return (embed(encoder, outside, size, ctx, args.amp) if outside else None), rows, list(args.query)


def export_neighbours(args, encoder, ckpt):
    ctx = setup()
    if args.features:
        feats, paths, recorded = read_features(args.features, encoder)
        args.amp, _ = resolve_amp(args.amp, ctx.device, train=False)
        size = eval_image_size(args, encoder, ckpt, recorded)
        output.check_file(args.out, "OUT")
    else:
        feats, paths, _, size = folder_features(args, encoder, ckpt, ctx)
        if len(paths) < 2:
            fail(f"{args.data_dir} has {len(paths)} readable image; the picture needs at least 2")
    if not ctx.master:  # under torchrun the others helped embed the folder; rank 0 searches and draws
        return
    outside, rows, query_paths = choose_queries(args, encoder, paths, size, ctx)
    queries = feats[rows.clamp(min=0)]
    if outside is not None:
        queries[rows < 0] = outside
    k = min(args.k, len(paths) - int((rows >= 0).any()))
    if k < args.k:
        print(f"note: {len(paths)} images: {k} neighbours per query, not --k {args.k}", flush=True)
    sims, idx = nearest(queries, feats, k, exclude=rows, device=ctx.device)  # a query is not its own neighbour
    sims, idx = sims.cpu(), idx.cpu()
    for q, (path, s, i) in enumerate(zip(query_paths, sims.tolist(), idx.tolist())):
        print(f"query {q + 1} {path}: " + ", ".join(f"{paths[j]} {v:.3f}" for j, v in zip(i, s)), flush=True)
    picture = neighbours_picture([[p] + [paths[j] for j in i] for p, i in zip(query_paths, idx.tolist())],
                                 sims.tolist(), args.tile)
    ext = os.path.splitext(args.out)[1].lower()
    output.write_atomic(args.out, lambda tmp: picture.save(tmp, format=Image.registered_extensions()[ext]), "OUT")
    print(f"wrote {args.out}: {len(query_paths)} queries x {k} nearest images by cosine similarity of h, "
          f"{picture.width}x{picture.height} px", flush=True)


PAD = 2  # white pixels around every tile


def text_box(draw, text, font):
    """(left, top, right, bottom) of text drawn at (0, 0): textbbox, or textsize on Pillow < 8 (which
    torchvision 0.16 still allows)."""
    if hasattr(draw, "textbbox"):
        return draw.textbbox((0, 0), text, font=font)
    return (0, 0, *draw.textsize(text, font=font))


def neighbours_picture(rows, similarities, tile):
    """A grid: one row per query, its image and then its neighbours' (a square centre crop of each,
    `tile` px), "query" under the first and each neighbour's similarity under it -> an RGB PIL image
    of PAD + columns x (tile + PAD) by PAD + rows x (tile + label + PAD) pixels."""
    font = ImageFont.load_default()
    probe = text_box(ImageDraw.Draw(Image.new("RGB", (1, 1))), "query 0.999", font)
    label = probe[3] - probe[1] + 6  # the text's height and a margin (the font's own size)
    columns = max(len(r) for r in rows)
    canvas = Image.new("RGB", (PAD + columns * (tile + PAD), PAD + len(rows) * (tile + label + PAD)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (paths, sims) in enumerate(zip(rows, similarities)):
        y = PAD + r * (tile + label + PAD)
        for c, (path, text) in enumerate(zip(paths, ["query"] + [f"{v:.3f}" for v in sims])):
            x = PAD + c * (tile + PAD)
            try:
                pixels = center_crop_resize(data.load_image(path), tile, fraction=1.0)  # uint8 (3, tile, tile)
            except Exception as e:  # moved or deleted since the features were made
                fail(f"cannot read {path} for the picture ({type(e).__name__}: {' '.join(str(e).split())[:160]})")
            canvas.paste(Image.fromarray(pixels.permute(1, 2, 0).numpy()), (x, y))
            box = text_box(draw, text, font)
            draw.text((x + (tile - (box[2] - box[0])) // 2 - box[0], y + tile + 3 - box[1]), text, fill="black", font=font)
    return canvas


def _dump_pickle(obj, path):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def main(argv=None):
    args = get_args(argv)
    output.check_file(args.out, "OUT", create_folder=False)  # told without making anything
    encoder, ckpt = load_encoder(args.checkpoint)
    if args.to == "features":
        return export_features(args, encoder, ckpt)
    if args.to == "neighbours":
        return export_neighbours(args, encoder, ckpt)
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
