"""This project's SimCLR beside lightly's on Fashion-MNIST (or MNIST), at one budget, scored by one code.

  taskset -c 1 env OMP_NUM_THREADS=1 python tools/compare_lightly.py --data-dir data
  python tools/compare_lightly.py --data-dir data --no-lightly --seeds 0 1 \\
      --ours "ours=--warmup-epochs 1 --lr-scaling sqrt --weight-decay 1e-6" --ours "t0.2=--temperature 0.2"

1. A class-balanced split (--train-size / --test-size images, --split-seed) of the dataset
   (data.build_dataset, so the files as data.py finds them) is written once as PNG files in the
   ImageNet layout, WORK/split/{train,val}/CLASS/*.png: both methods read the same images.
2. Ours: pretrain.py --dataset imagefolder on WORK/split with the shared budget (--arch, --width,
   --image-size, --batch-size, --epochs, --seed) and each --ours variant's own flags.
3. Lightly: its CIFAR-10 benchmark's SimCLR (docs/.../benchmarks/cifar10_benchmark.py), in a
   throwaway virtual environment (WORK/venv-lightly, --system-site-packages so it reuses the
   installed torch; lightly is never a dependency of this project): SimCLRTransform(input_size,
   gaussian_blur=0) with its other defaults (colour strength 1.0, ImageNet normalisation),
   ResNetGenerator('resnet-18', width) with the benchmark's backbone (its children but the last,
   then a global average pool: as there, without the stem's ReLU), SimCLRProjectionHead(d, d, 128),
   NTXentLoss() (temperature 0.5), SGD lr 0.06 x batch/128, momentum 0.9, weight decay 5e-4,
   cosine over the epochs (stepped per epoch), each view forwarded on its own.
4. Evaluation, the same code for every encoder: features of the un-augmented images
   (augment.EvalTransform: at <= 32 px a plain resize to --image-size; each encoder gets the
   input scaling it was trained with: [0, 1] for ours, ImageNet mean/std for lightly's), weighted
   kNN (features.knn_accuracy, k = 200, t = 0.1) and a multinomial logistic regression on
   standardised features (full-batch L-BFGS, mean cross-entropy + ||W||^2 / (2 C n), scikit-learn's
   default objective with C = 1). Raw pixels (the --image-size eval image, flattened) and the
   untrained encoder pretrain.py starts from (its default init, seeded with each --seed) get the same.

Runs that finished are reused (WORK/runs/NAME-seedS), so the command can be repeated or extended.
The table is printed and written to WORK/results.json.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
from augment import EvalTransform  # noqa: E402
from features import knn_accuracy  # noqa: E402
from model import build_encoder, load_encoder  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # lightly's IMAGENET_NORMALIZE
# Issue 22's command beyond the shared budget, with the weight decay that was then its default
DEFAULT_OURS = "ours=--warmup-epochs 1 --lr-scaling sqrt --weight-decay 1e-6"


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashionmnist", choices=sorted(data.IDX_DATASETS))
    p.add_argument("--data-dir", default="data", help="holds FashionMNIST/raw (or MNIST/raw); see data.py")
    p.add_argument("--work", default="runs/compare_lightly", help="split, runs, venv and results go here")
    p.add_argument("--train-size", type=int, default=6000, help="training images, the same number of every class")
    p.add_argument("--test-size", type=int, default=1000, help="test images, the same number of every class")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (each method runs once per seed)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--arch", default="resnet18", choices=("resnet18", "resnet34"))
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--workers", type=int, default=0, help="data loading processes of every training run")
    p.add_argument("--ours", action="append", default=None, metavar="NAME=FLAGS",
                   help=f"a pretrain.py variant: its name and its flags beyond the shared budget; repeatable. "
                        f"Default: {DEFAULT_OURS!r}")
    p.add_argument("--no-lightly", action="store_true", help="only this project's runs (and raw pixels)")
    p.add_argument("--lightly-version", default="1.6.0")
    p.add_argument("--venv", default=None, help="lightly's throwaway environment; default WORK/venv-lightly")
    p.add_argument("--train-lightly", default=None, help=argparse.SUPPRESS)  # internal: the run inside the venv
    args = p.parse_args(argv)
    args.ours = [v.partition("=")[::2] for v in (args.ours or [DEFAULT_OURS])]
    if any(not name or "/" in name for name, _ in args.ours):
        p.error("--ours takes NAME=FLAGS with a plain name, e.g. --ours 'wd=--weight-decay 1e-4'")
    classes = 10
    if args.train_size % classes or args.test_size % classes or min(args.train_size, args.test_size) < classes:
        p.error(f"--train-size and --test-size must be positive multiples of the {classes} classes")
    return args


# ----------------------------------------------------------------------------
# The shared split and the shared evaluation.

def write_split(args):
    """WORK/split/{train,val}/CLASS/INDEX.png: a class-balanced subset of each split, written once."""
    root = os.path.join(args.work, "split")
    want = {"dataset": args.dataset, "train_size": args.train_size, "test_size": args.test_size,
            "split_seed": args.split_seed}
    manifest = os.path.join(root, "split.json")
    if os.path.exists(manifest):
        with open(manifest) as f:
            have = json.load(f)
        if {k: have.get(k) for k in want} != want:
            raise data.DataError(f"{root} holds another split ({ {k: have.get(k) for k in want} }); "
                                 "choose another --work")
        return root
    rng = np.random.default_rng(args.split_seed)
    indices = {}
    for split, sub, n in (("train", "train", args.train_size), ("test", "val", args.test_size)):
        dataset = data.build_dataset(args.dataset, args.data_dir, split)
        labels = data.labels_of(dataset)
        chosen = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), n // 10, replace=False)
                                         for c in range(10)]))
        for i in chosen:
            img, label = dataset[int(i)]
            folder = os.path.join(root, sub, f"{label:02d}")
            os.makedirs(folder, exist_ok=True)
            img.convert("L").save(os.path.join(folder, f"{i:05d}.png"))  # grayscale: the three channels are equal
        indices[split] = chosen.tolist()
    with open(manifest, "w") as f:
        json.dump({**want, "indices": indices}, f)
    return root


def eval_images(folder, image_size):
    """(n, 3, size, size) float images in [0, 1] of an ImageFolder, un-augmented, and (n,) labels."""
    from torchvision.datasets import ImageFolder
    dataset, plain = ImageFolder(folder), EvalTransform(image_size, train=False)
    images = torch.stack([plain(dataset[i][0]) for i in range(len(dataset))]).float() / 255  # uint8 -> [0, 1]
    return images, torch.tensor(dataset.targets)


@torch.no_grad()
def encode(encoder, images, normalize=None, batch=256):
    """Features of images (n, 3, H, W) in [0, 1] from an encoder in eval mode (BN running statistics)."""
    encoder.eval()
    if normalize is not None:
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in normalize)
        images = (images - mean) / std
    return torch.cat([encoder(images[i:i + batch]).flatten(1) for i in range(0, len(images), batch)])


def logistic_regression(train_f, train_y, test_f, test_y, c=1.0, max_iter=1000):
    """Test accuracy (%) of a multinomial logistic regression on standardised features: minimises
    mean cross-entropy + ||W||^2 / (2 c n) (scikit-learn's LogisticRegression(C=c) objective / n) by L-BFGS."""
    mean, std = train_f.mean(0), train_f.std(0).clamp_min(1e-6)
    x, xt = ((f.double() - mean) / std for f in (train_f, test_f))
    n, d, k = len(x), x.shape[1], int(train_y.max()) + 1
    w = torch.zeros(d, k, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, tolerance_grad=1e-7, tolerance_change=1e-10,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, train_y) + (w * w).sum() / (2 * c * n)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return 100.0 * ((xt @ w + b).argmax(1) == test_y).double().mean().item()


def scores(train_f, train_y, test_f, test_y):
    return {"knn": knn_accuracy(train_f.float(), train_y, test_f.float(), test_y, 10, 200, 0.1, "cpu"),
            "linear": logistic_regression(train_f, train_y, test_f, test_y)}


def save_features(path, encoder, split, args, normalize=None, **info):
    out = {}
    for part, sub in (("train", "train"), ("test", "val")):
        images, labels = eval_images(os.path.join(split, sub), args.image_size)
        out[part] = (encode(encoder, images, normalize), labels)
    torch.save({"train": out["train"], "test": out["test"], "info": info}, path)


# ----------------------------------------------------------------------------
# The two trainers.

def run_ours(name, flags, seed, split, args):
    """pretrain.py with the shared budget and this variant's flags -> path of its features."""
    out = os.path.join(args.work, "runs", f"{name}-seed{seed}")
    feats = os.path.join(out, "features.pt")
    if os.path.exists(feats):
        return feats
    cmd = [sys.executable, os.path.join(ROOT, "pretrain.py"), "--dataset", "imagefolder", "--data-dir", split,
           "--image-size", str(args.image_size), "--arch", args.arch, "--width", str(args.width),
           "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--seed", str(seed),
           "--workers", str(args.workers), "--knn-every", "0", "--log-every", "10", "--out", out,
           *shlex.split(flags)]
    if os.path.exists(os.path.join(out, "ckpt.pt")):
        cmd.append("--resume")  # finished (nothing to do) or stopped: continue it
    print("$", shlex.join(cmd), flush=True)
    t = time.time()
    subprocess.run(cmd, check=True)
    encoder, _ = load_encoder(os.path.join(out, "encoder.pt"))
    save_features(feats, encoder, split, args, train_seconds=round(time.time() - t, 1), command=shlex.join(cmd))
    return feats


def run_lightly(seed, split, args):
    """Lightly's SimCLR, trained in its venv by this file's --train-lightly -> path of its features."""
    out = os.path.join(args.work, "runs", f"lightly-seed{seed}")
    feats = os.path.join(out, "features.pt")
    if os.path.exists(feats):
        return feats
    venv = args.venv or os.path.join(args.work, "venv-lightly")
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", venv], check=True)
    probe = subprocess.run([python, "-c", "import lightly; print(lightly.__version__)"], capture_output=True, text=True)
    if probe.stdout.strip() != args.lightly_version:
        subprocess.run([python, "-m", "pip", "install", "-q", f"lightly=={args.lightly_version}"], check=True)
    cmd = [python, os.path.abspath(__file__), *sys.argv[1:], "--train-lightly", str(seed)]
    print("$", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return feats


def train_lightly(seed, split, args):
    """Runs inside the venv: lightly's CIFAR-10 benchmark SimCLR at this budget, then its features."""
    import lightly
    from lightly.loss import NTXentLoss
    from lightly.models import ResNetGenerator
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform
    from torch import nn
    from torchvision.datasets import ImageFolder

    out = os.path.join(args.work, "runs", f"lightly-seed{seed}")
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(seed)
    resnet = ResNetGenerator(args.arch.replace("resnet", "resnet-"), width=args.width)
    backbone = nn.Sequential(*list(resnet.children())[:-1], nn.AdaptiveAvgPool2d(1))
    dim = resnet.linear.in_features
    head = SimCLRProjectionHead(dim, dim, 128)
    criterion = NTXentLoss()
    transform = SimCLRTransform(input_size=args.image_size, gaussian_blur=0.0)
    dataset = ImageFolder(os.path.join(split, "train"), transform=transform)
    # /dev/shm must hold what the workers hand over, as data.make_loader checks for ours: two float views
    # and an int64 label per image
    image_bytes = sum(v.numel() * v.element_size() for v in dataset[0][0])
    data.check_shared_memory(args.workers, args.batch_size * (image_bytes + 8))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.workers)
    params = list(backbone.parameters()) + list(head.parameters())
    optimizer = torch.optim.SGD(params, lr=0.06 * args.batch_size / 128, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs)
    print(f"lightly {lightly.__version__}: {transform.transforms[0].transform}", flush=True)
    t = time.time()
    for epoch in range(args.epochs):
        backbone.train(), head.train()
        total, t_epoch = 0.0, time.time()
        for (x0, x1), _ in loader:
            z0, z1 = head(backbone(x0).flatten(1)), head(backbone(x1).flatten(1))
            loss = criterion(z0, z1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        scheduler.step()
        print(f"lightly epoch {epoch + 1}/{args.epochs} loss {total / len(loader):.4f} "
              f"({time.time() - t_epoch:.0f} s)", flush=True)
    save_features(os.path.join(out, "features.pt"), backbone, split, args, normalize=(IMAGENET_MEAN, IMAGENET_STD),
                  train_seconds=round(time.time() - t, 1), lightly=lightly.__version__)


# ----------------------------------------------------------------------------

def main():
    args = get_args()
    split = write_split(args)
    if args.train_lightly is not None:
        return train_lightly(int(args.train_lightly), split, args)
    print(f"split: {args.train_size} train / {args.test_size} test images of {args.dataset} in {split}; "
          f"budget: {args.arch} width {args.width}, {args.image_size} px, batch {args.batch_size}, "
          f"{args.epochs} epochs; seeds {args.seeds}; CPU capability {torch.backends.cpu.get_cpu_capability()}",
          flush=True)
    runs = {} if args.no_lightly else {"lightly": [run_lightly(s, split, args) for s in args.seeds]}
    for name, flags in args.ours:
        runs[name] = [run_ours(name, flags, s, split, args) for s in args.seeds]

    results = {}
    train_x, train_y = eval_images(os.path.join(split, "train"), args.image_size)
    test_x, test_y = eval_images(os.path.join(split, "val"), args.image_size)
    results["raw pixels"] = [scores(train_x.flatten(1), train_y, test_x.flatten(1), test_y)]
    results["random init"] = []  # the encoder pretrain.py starts from (its defaults, seed s), untrained
    for s in args.seeds:
        torch.manual_seed(s)
        encoder = build_encoder(args.arch, args.width, cifar_stem=args.image_size <= 32)
        results["random init"].append(scores(encode(encoder, train_x), train_y, encode(encoder, test_x), test_y))
    for name, paths in runs.items():
        results[name] = []
        for path in paths:
            f = torch.load(path, weights_only=True)
            results[name].append({**scores(*f["train"], *f["test"]), **f["info"]})
    print("\n| method | seeds | kNN (k=200, t=0.1) | linear (logistic) | per seed kNN / linear |\n|---|---|---|---|---|")
    for name, rows in results.items():
        knn, lin = (np.array([r[k] for r in rows]) for k in ("knn", "linear"))
        spread = lambda v: f" ± {v.std(ddof=1):.1f}" if len(v) > 1 else ""  # noqa: E731
        print(f"| {name} | {len(rows)} | {knn.mean():.1f}%{spread(knn)} | {lin.mean():.1f}%{spread(lin)} | "
              f"{', '.join(f'{a:.1f} / {b:.1f}' for a, b in zip(knn, lin))} |")
    with open(os.path.join(args.work, "results.json"), "w") as f:
        json.dump({"args": {k: v for k, v in vars(args).items() if k != "train_lightly"}, "results": results}, f,
                  indent=1)


if __name__ == "__main__":
    try:
        main()
    except data.DataError as e:
        sys.exit(f"compare_lightly.py: error: {e}")
    except subprocess.CalledProcessError as e:
        sys.exit(f"compare_lightly.py: error: {shlex.join(map(str, e.cmd))} exited {e.returncode}")
