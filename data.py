"""Datasets and loaders shared by pretrain.py, linear_eval.py and finetune.py.

CIFAR-10/100, STL-10, MNIST and Fashion-MNIST come from torchvision (downloaded
into --data-dir when the network allows; the two grayscale sets are given as RGB
images of three equal channels), imagefolder is the ImageNet layout (DIR/train/CLASS/*,
DIR/val/CLASS/*), folder is every image under a folder in any layout, without
labels (pretraining only), and synthetic is a labelled set of generated images
(textures and shapes, no download) for trying the pipeline offline.
build_dataset returns (image, label) pairs, the image a PIL image, or for imagefolder
a uint8 (3, H, W) tensor (load_image: JPEGs decoded straight into a tensor; with encoded=True the
folders hand JPEGs over as their bytes, for views that decode them at the scale their crops need,
augment.SimCLRViews(scaled_decode=True)); SeededTransform applies a
transform whose randomness is fixed by (seed, epoch, index), so the views do
not depend on the number of workers or processes and a resumed run sees
exactly the views it would have seen. Unreadable images are skipped and
counted (or, strict, an error).
"""
import atexit
import itertools
import multiprocessing
import multiprocessing.util  # registers multiprocessing's exit hook before ours
import os
import signal
import sys

import numpy as np
import torch
from PIL import Image

import augment
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

DATASETS = ("cifar10", "cifar100", "stl10", "mnist", "fashionmnist", "imagefolder", "folder", "synthetic")
# The size the images come in (the default --image-size). MNIST and Fashion-MNIST are 28 px:
# by default the views are 28 px too (CIFAR stem, no resampling of the test images);
# --image-size 32 resizes them to CIFAR's size.
NATIVE_SIZE = {"cifar10": 32, "cifar100": 32, "stl10": 96, "mnist": 28, "fashionmnist": 28,
               "imagefolder": 224, "folder": 224, "synthetic": 32}

DOWNLOADS = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-batches-py"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "cifar-100-python"),
    "stl10": ("http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz", "stl10_binary"),
}
# MNIST and Fashion-MNIST: torchvision's class and folder, and the four idx files it reads
# from DATA_DIR/FOLDER/raw (each one also as .gz, which torchvision unpacks there).
IDX_DATASETS = {"mnist": "MNIST", "fashionmnist": "FashionMNIST"}
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class DataError(Exception):
    """A dataset that cannot be used; the message says what to do."""


def error_text(e):
    """The message of a DataError, also when a DataLoader worker raised it (PyTorch then
    re-raises it with the worker's traceback in the message; its last line is ours)."""
    last = str(e).strip().splitlines()[-1] if str(e).strip() else ""
    return last.split("DataError: ", 1)[-1]


# ----------------------------------------------------------------------------
# Synthetic images: 10 classes told apart by shape or texture (not colour,
# which colour jitter and grayscale remove), with random colours, scales,
# phases, positions and pixel noise. Deterministic given the seed.

SYNTHETIC_CLASSES = ("horizontal stripes", "vertical stripes", "diagonal stripes", "checkerboard",
                     "dots", "rings", "grid", "disc", "square", "triangle")


def synthetic_images(n, size, seed):
    """(n, size, size, 3) uint8 images and (n,) int64 labels, classes balanced."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(SYNTHETIC_CLASSES)
    rng.shuffle(labels)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size  # coordinates in [0, 1)
    images = np.empty((n, size, size, 3), np.uint8)
    for i, label in enumerate(labels):
        mask = _pattern(int(label), x, y, rng)
        bg, fg = rng.random(3), rng.random(3)
        while abs(_luma(bg) - _luma(fg)) < 0.3:  # keep the pattern visible in grayscale
            bg, fg = rng.random(3), rng.random(3)
        img = bg + (fg - bg) * mask[..., None] + rng.normal(0, 0.04, (size, size, 3))
        images[i] = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)


def _luma(rgb):
    return 0.2989 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _pattern(label, x, y, rng):
    """Foreground mask in {0, 1} of class `label` on the grid x, y."""
    freq = rng.uniform(3.0, 7.0)  # stripes per image side
    phase = rng.uniform(0, 2 * np.pi)
    cx, cy = rng.uniform(0.3, 0.7, size=2)

    def wave(t):
        return np.sin(2 * np.pi * freq * t + phase) > 0

    if label == 0:
        return wave(y)
    if label == 1:
        return wave(x)
    if label == 2:
        return wave((x + y if rng.random() < 0.5 else x - y) / np.sqrt(2))
    if label == 3:
        return wave(x) ^ wave(y)
    if label == 4:
        period = 1.0 / freq
        dx, dy = (x + phase) % period - period / 2, (y + phase) % period - period / 2
        return dx ** 2 + dy ** 2 < (0.3 * period) ** 2
    if label == 5:
        return wave(np.hypot(x - cx, y - cy))
    if label == 6:
        period = 1.0 / freq
        return ((x + phase) % period < 0.25 * period) | ((y + phase) % period < 0.25 * period)
    r = rng.uniform(0.18, 0.3)
    if label == 7:
        return np.hypot(x - cx, y - cy) < r
    if label == 8:
        return (np.abs(x - cx) < r) & (np.abs(y - cy) < r)
    # 9: upward triangle, apex at (cx, cy - r), base at y = cy + r
    return (y < cy + r) & (np.abs(x - cx) < (y - (cy - r)) / 2)


class SyntheticImages(Dataset):
    """Generated labelled images (see SYNTHETIC_CLASSES); train and test come from different seeds."""

    def __init__(self, n, size, train=True, seed=0):
        self.images, self.labels = synthetic_images(n, size, seed=2 * seed + (0 if train else 1))
        self.classes = list(SYNTHETIC_CLASSES)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return Image.fromarray(self.images[i]), int(self.labels[i])


# ----------------------------------------------------------------------------

def build_dataset(name, data_dir, split, image_size=32, synthetic_size=512, encoded=False):
    """(PIL image, label) pairs. split: 'pretrain' (STL-10: train+unlabeled), 'train', or 'test'.
    image_size and synthetic_size only concern the synthetic set; encoded only the folders
    (imagefolder, folder): their JPEGs come as the file's bytes, for views that decode them at the
    scale their crops need (augment.SimCLRViews(scaled_decode=True); see load_image)."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if split not in ("pretrain", "train", "test"):
        raise ValueError(f"unknown split {split!r}")
    train = split != "test"
    if name == "synthetic":
        n = synthetic_size if train else max(len(SYNTHETIC_CLASSES), synthetic_size // 4)
        return SyntheticImages(n, image_size, train=train)
    if name == "imagefolder":
        return _image_folder(data_dir, "train", encoded) if train else _validation_folder(data_dir, encoded)
    if name == "folder":
        if split != "pretrain":
            raise DataError("--dataset folder has no labels, so it cannot be evaluated on; evaluate on a labelled "
                            "folder: --dataset imagefolder --data-dir DIR (DIR/train/CLASS/*, DIR/val/CLASS/*)")
        return FolderImages(data_dir, encoded)

    from torchvision import datasets
    if name == "stl10":
        stl_split = {"pretrain": "train+unlabeled", "train": "train", "test": "test"}[split]
        make = lambda dl: datasets.STL10(data_dir, split=stl_split, download=dl)  # noqa: E731
    elif name in IDX_DATASETS:
        cls = getattr(datasets, IDX_DATASETS[name])
        _unpack_idx(os.path.join(data_dir, IDX_DATASETS[name], "raw"))
        make = lambda dl: GrayAsRGB(cls(data_dir, train=train, download=dl))  # noqa: E731
    else:
        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        make = lambda dl: cls(data_dir, train=train, download=dl)  # noqa: E731
    try:
        return make(False)
    except RuntimeError:
        pass  # not there yet
    try:
        return make(True)
    except Exception as e:  # no network, proxy, disk full, corrupt archive...
        reason = f"download failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        raise DataError(_missing_message(name, data_dir, reason)) from None


def _missing_message(name, data_dir, reason):
    if name in IDX_DATASETS:
        raw = os.path.join(data_dir, IDX_DATASETS[name], "raw")
        debian = (" (on Debian/Ubuntu: apt-get install dataset-fashion-mnist, then "
                  f"cp /usr/share/datasets/fashion-mnist/* {raw}/)" if name == "fashionmnist" else "")
        return (f"{name} is not in {data_dir!r} ({reason}). Put the four idx files {', '.join(IDX_FILES)} "
                f"(or the same names with .gz) into {raw}{debian}, and pass --data-dir {data_dir}")
    url, folder = DOWNLOADS[name]
    return (f"{name} is not in {data_dir!r} ({reason}). Fetch {url} where the network allows, "
            f"extract it so that {os.path.join(data_dir, folder)} exists, and pass --data-dir {data_dir}")


def _unpack_idx(raw):
    """Unpack each idx file that is in `raw` only as .gz. torchvision reads the unpacked files
    and unpacks a .gz only when its checksum is the one it downloads (Debian's differ)."""
    import gzip
    import shutil
    for name in IDX_FILES:
        path = os.path.join(raw, name)
        if not os.path.exists(path) and os.path.exists(path + ".gz"):
            tmp = f"{path}.tmp.{os.getpid()}"
            try:
                with gzip.open(path + ".gz", "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except (OSError, EOFError) as e:
                if os.path.exists(tmp):
                    os.remove(tmp)
                raise DataError(f"cannot unpack {path}.gz ({type(e).__name__}: {str(e)[:120]}); "
                                "replace it with a good copy") from None
            os.replace(tmp, path)


class GrayAsRGB(Dataset):
    """A torchvision MNIST-style dataset whose 'L' images are given as RGB (three equal
    channels), like every other dataset here; labels, classes and targets pass through."""

    def __init__(self, dataset):
        self.dataset, self.classes, self.targets = dataset, dataset.classes, dataset.targets

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        img, label = self.dataset[i]
        return img.convert("RGB"), label


def load_image(path, encoded=False):
    """An image file as uint8 (3, H, W) RGB (channels-last), what the views are made from.
    JPEGs are decoded by torchvision's libjpeg-turbo into a tensor directly (the same pixels as
    PIL's, and faster end to end: PIL's decode is about as fast, but its pixels then cost a
    copy out of PIL); other formats, and JPEGs that decoder refuses, by PIL, whose error (for
    a file neither can read) says why. encoded: a JPEG comes back as the file's bytes, undecoded,
    for views that decode it at the scale their crops need (a file that turns out unreadable then
    raises augment.DecodeError there, which SeededTransform counts as unreadable too)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:3] == augment.JPEG_MAGIC:
        return data if encoded else augment.decode(data)
    with Image.open(path) as img:
        return augment.pixels(img).permute(2, 0, 1)


def load_encoded(path):
    """load_image(path, encoded=True), a plain function (ImageFolder's loader crosses to the workers)."""
    return load_image(path, encoded=True)


def _image_folder(data_dir, sub, encoded=False):
    from torchvision.datasets import ImageFolder
    root = os.path.join(data_dir, sub)
    if not os.path.isdir(root):
        raise DataError(f"{root} is not a directory; --data-dir must hold the ImageNet layout "
                        f"{sub}/CLASS/IMAGE (e.g. {os.path.join(root, 'n01440764', 'x.JPEG')})")
    try:
        return ImageFolder(root, loader=load_encoded if encoded else load_image)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"{root}: {str(e).splitlines()[0]} (expected {sub}/CLASS/IMAGE files)") from None


def _validation_folder(data_dir, encoded=False):
    """DIR/val with the class indices of DIR/train: each split's ImageFolder numbers its own sorted
    class folders, so a val/ that lacks a class of train/ would shift every later class by one and
    score every image against the wrong class. DIR/train's folder names (only listed, not scanned)
    define the indices; a val/ class that train/ lacks is a DataError, a train/ class without
    val/ images is kept in `absent_classes` (class_note says so). Without DIR/train, val/'s own."""
    val = _image_folder(data_dir, "val", encoded)
    train_root = os.path.join(data_dir, "train")
    if os.path.isdir(train_root):
        from torchvision.datasets.folder import find_classes
        try:
            names = find_classes(train_root)[0]
        except (FileNotFoundError, RuntimeError):
            names = None  # no class folders: the training split's own error says so when it is built
        if names is not None:
            align_classes(val, names, os.path.join(data_dir, "val"), train_root)
    return val


def align_classes(test, train_classes, test_root, train_root):
    """Renumber an ImageFolder's labels (samples, imgs, targets, classes, class_to_idx) by the
    training split's class names `train_classes` (sorted, as ImageFolder numbers them)."""
    index = {c: i for i, c in enumerate(train_classes)}
    extra = [c for c in test.classes if c not in index]
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise DataError(f"{test_root} has class folder{'s' if len(extra) > 1 else ''} {', '.join(extra[:3])}{more} "
                        f"that {train_root} lacks; the training split's class names define the labels, so its images "
                        f"have none: remove or rename {'them' if len(extra) > 1 else 'it'}, or add "
                        f"{'them' if len(extra) > 1 else 'it'} to {train_root}")
    new = [index[c] for c in test.classes]
    test.samples = [(path, new[label]) for path, label in test.samples]
    test.imgs, test.targets = test.samples, [label for _, label in test.samples]
    present = set(test.classes)
    test.absent_classes = [c for c in train_classes if c not in present]
    test.classes, test.class_to_idx = list(train_classes), dict(index)
    test.root_label = test_root


def class_note(test):
    """A note when the test split has no images of some training classes (None otherwise)."""
    absent = getattr(test, "absent_classes", None) or getattr(getattr(test, "dataset", None), "absent_classes", None)
    if not absent:
        return None
    root = getattr(test, "root_label", None) or getattr(test.dataset, "root_label", "the test split")
    more = f" and {len(absent) - 5} more" if len(absent) > 5 else ""
    return (f"note: {root} has no images of {len(absent)} of the {len(test.classes)} training classes "
            f"({', '.join(absent[:5])}{more}); the test accuracy is over the classes it has")


# ----------------------------------------------------------------------------
# --dataset folder: every image under a folder, any layout, no labels.

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")


def list_images(root, left_out=None):
    """Paths of every image file under root, recursively, sorted as strings, so the
    order, and with it the seeds and a resume, does not depend on the file system's listing order.
    Images are recognised by their extension, in any case (IMAGE_EXTENSIONS); names starting with
    '.' (hidden files and folders) are left out. Symbolic links are followed, but every real folder
    is listed once: a link back up the tree (a loop) or a second link to the same folder adds nothing.
    left_out: a dict that counts what was passed over: "hidden" entries, "other files" (not an image
    extension), "unreadable" entries (a folder this user may not list, a dangling link)."""
    left_out = {} if left_out is None else left_out

    def count(what):
        left_out[what] = left_out.get(what, 0) + 1
    found, seen = [], set()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            entries = list(os.scandir(folder))
        except OSError:  # a dangling link, or a folder this user may not read
            count("unreadable")
            continue
        for entry in entries:
            if entry.name.startswith("."):
                count("hidden")
                continue
            try:
                if entry.is_dir():  # follows links
                    stack.append(entry.path)
                elif entry.name.lower().endswith(IMAGE_EXTENSIONS) and entry.is_file():
                    found.append(entry.path)
                elif entry.is_file():
                    count("other files")
                else:
                    count("unreadable")  # a dangling link
            except OSError:
                count("unreadable")
    return sorted(found)


class FolderImages(Dataset):
    """Every image under `root` in any layout, unlabeled: dataset[i] = (uint8 (3, H, W) RGB, -1),
    read by load_image as the ImageNet folders are (encoded: JPEGs as their bytes).
    `samples` holds (path, -1) pairs in list_images' sorted order."""

    def __init__(self, root, encoded=False):
        if not os.path.isdir(root):
            raise DataError(f"{root} is not a directory; --dataset folder reads every image under --data-dir")
        self.left_out = {}  # what the listing passed over (list_images)
        paths = list_images(root, self.left_out)
        if not paths:
            raise DataError(f"no images under {root} (looked for {', '.join(IMAGE_EXTENSIONS)} files in any case, "
                            "in every folder below it, hidden ones left out); is --data-dir the right folder?")
        self.root, self.samples, self.encoded = root, [(p, -1) for p in paths], encoded
        self.classes = []

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return load_image(self.samples[i][0], self.encoded), -1


def describe(dataset, name, data_dir, split="train"):
    """One line for the start of a run: how many images (and classes) a split ("train", "test", or
    None: no word for it) has, and for a folder what its listing left out."""
    classes = len(getattr(dataset, "classes", []) or [])
    left_out = getattr(dataset, "left_out", None) or getattr(getattr(dataset, "dataset", None), "left_out", None)
    where = {"imagefolder": f" under {os.path.join(data_dir, 'val' if split == 'test' else 'train')}",
             "folder": f" under {data_dir}"}.get(name, "")
    kind = {"test": "test ", "train": "training ", None: ""}[split]
    text = f"{name}: {len(dataset)} {kind}images{where}"
    text += f" in {classes} classes" if classes else ""
    if left_out:
        text += " (left out while listing: " + ", ".join(f"{n} {what}" for what, n in sorted(left_out.items())) + ")"
    return text


def num_classes(dataset):
    return len(dataset.classes)


def labels_of(dataset):
    """All labels of a dataset from build_dataset, without reading any image."""
    for name in ("targets", "labels"):  # ImageFolder/CIFAR: targets; STL-10/synthetic: labels
        if hasattr(dataset, name):
            return np.asarray(getattr(dataset, name), dtype=np.int64)
    raise TypeError(f"{type(dataset).__name__} does not expose its labels")


def balanced_subset(labels, fraction, seed=0):
    """Sorted indices of round(fraction * n_c) random images of every class c (at least one each)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        chosen.append(rng.choice(idx, size=max(1, int(round(fraction * len(idx)))), replace=False))
    return np.sort(np.concatenate(chosen))


def labelled_subset(dataset, subset_file, fraction, seed=0):
    """Indices of the labelled images fine-tuning trains on (and distillation's labelled term uses):
    those `subset_file` names (subset_from_file), else balanced_subset's `fraction` of every class,
    drawn by `seed` among the images that have a label (STL-10's unlabeled split has -1)."""
    if subset_file:
        return subset_from_file(dataset, subset_file)
    labels = labels_of(dataset)
    has = np.flatnonzero(labels >= 0)
    return has[balanced_subset(labels[has], fraction, seed)]


def fit_batch(n, batch_size, world, what, hint=""):
    """The global batch for training on n images: batch_size, or, when the set is smaller,
    the whole set (rounded down to a multiple of the processes) -> (batch, note or None).
    The caller scales the learning rate for the batch it gets, as for any batch."""
    if n >= batch_size:
        return batch_size, None
    if n < world:
        raise DataError(f"{what} has {n} images, fewer than the {world} processes{hint}")
    batch = n // world * world
    return batch, (f"note: {what} has {n} images, fewer than --batch-size {batch_size}: each step uses {batch} "
                   f"of them (batch {batch}, one step per epoch)")


def first_images(dataset, n):
    """The first n images of a dataset (all when n is None or larger), keeping its class
    names and file names: --max-images, a quick end-to-end check of a large dataset."""
    if n is None or n >= len(dataset):
        return dataset
    part = torch.utils.data.Subset(dataset, range(n))
    part.classes = dataset.classes
    if hasattr(dataset, "samples"):
        part.samples = dataset.samples[:n]
    return part


def subset_from_file(dataset, path):
    """Indices of the images a file names, one per line: file names for imagefolder
    (as the official ImageNet 1% / 10% lists: n01440764_10026.JPEG), indices otherwise."""
    if not os.path.isfile(path):
        raise DataError(f"subset file {path} does not exist")
    with open(path) as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise DataError(f"subset file {path} names no images")
    if hasattr(dataset, "samples"):
        where = {os.path.basename(p): i for i, (p, _) in enumerate(dataset.samples)}
        missing = [n for n in names if os.path.basename(n) not in where]
        if missing:
            raise DataError(f"{len(missing)} of {len(names)} names in {path} are not in the training set "
                            f"(first: {missing[0]}); is --data-dir the right dataset?")
        return np.array(sorted({where[os.path.basename(n)] for n in names}))
    try:
        indices = np.array(sorted({int(n) for n in names}))
    except ValueError:
        raise DataError(f"{path}: for {type(dataset).__name__} each line must be an image index") from None
    if indices.min() < 0 or indices.max() >= len(dataset):
        raise DataError(f"{path}: indices must lie in [0, {len(dataset)})")
    return indices


def defaults_from_checkpoint(settings, dataset=None, data_dir=None, image_size=None, synthetic_size=None):
    """Evaluation data settings: given values, else the pretraining ones a checkpoint
    records, else the dataset's. Returns (dataset, data_dir, image_size, synthetic_size)."""
    # the pretraining image size also for a labelled folder after pretraining on an unlabeled one
    same = dataset in (None, settings.get("dataset")) or (dataset, settings.get("dataset")) == ("imagefolder", "folder")
    dataset = dataset or settings.get("dataset")
    if dataset is None:
        raise DataError("the checkpoint records no pretraining dataset; pass --dataset")
    image_size = image_size or (settings.get("image_size") if same else None) or NATIVE_SIZE[dataset]
    return (dataset, data_dir or settings.get("data_dir", "data"), image_size,
            synthetic_size or settings.get("synthetic_size", 512))


def _sample_seed(seed, epoch, index):
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % (2 ** 63)


# What a strict SeededTransform's error adds (hint=): why this image had to be readable.
TRAIN_HINT = "without --strict-data unreadable training images are skipped"
TEST_HINT = "every test image must be readable"


class SeededTransform(Dataset):
    """dataset[i] = (transform(image, generator), label, unreadable), the generator
    seeded from (seed, epoch, i). Index it with (epoch, i) pairs, as make_loader does.

    An image that cannot be read (corrupt, truncated, not an image) is replaced by
    the next readable one, reported once per worker on stderr, and flagged in
    `unreadable` (1 for that sample); with strict=True it raises DataError instead, whose message
    ends with `hint` (e.g. TRAIN_HINT) when given. Unreadable means: reading it from the dataset
    fails, or the transform cannot decode what the dataset handed over undecoded
    (augment.DecodeError; JPEG bytes for the scaled decode).
    """

    def __init__(self, dataset, transform, seed=0, strict=False, hint=None):
        self.dataset, self.transform, self.seed, self.strict, self.hint = dataset, transform, seed, strict, hint
        self._reported = set()

    def __len__(self):
        return len(self.dataset)

    def _name(self, j):
        samples = getattr(self.dataset, "samples", None)
        return samples[j][0] if samples else f"image {j}"

    def __getitem__(self, key):
        epoch, i = key
        for attempt in range(len(self.dataset)):
            j = (i + attempt) % len(self.dataset)
            try:
                img, label = self.dataset[j]
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
                self._unreadable(j, f"{type(e).__name__}: {str(e)}")
                continue
            # seeded from i whichever image stands in: its draws do not depend on which one could be read
            generator = torch.Generator().manual_seed(_sample_seed(self.seed, epoch, i))
            try:
                out = self.transform(img, generator)
            except augment.DecodeError as e:  # the image came undecoded and its decode failed here
                self._unreadable(j, str(e))
                continue
            return out, label, int(attempt > 0)  # 1: image i itself was unreadable
        raise DataError(f"none of the {len(self.dataset)} images can be read")

    def _unreadable(self, j, error):
        reason = f"{self._name(j)} ({' '.join(error.split())[:160]})"
        if self.strict:
            raise DataError(f"cannot read {reason}; remove or replace the file"
                            + (f" ({self.hint})" if self.hint else "")) from None
        if j not in self._reported:
            self._reported.add(j)
            print(f"warning: skipping unreadable image {reason}", file=sys.stderr, flush=True)


class EpochTagged(Sampler):
    """Yields (epoch, index) from a DistributedSampler, so the workers (which
    hold their own copy of the dataset) know the epoch of every sample; can
    skip the start of an epoch (resuming in the middle of one)."""

    def __init__(self, sampler):
        self.sampler, self.skip = sampler, 0

    def set_epoch(self, epoch, skip=0):
        """skip: how many of this rank's samples of the epoch to leave out, from the start."""
        self.sampler.set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        epoch = self.sampler.epoch
        return ((epoch, i) for i in itertools.islice(iter(self.sampler), self.skip, None))

    def __len__(self):
        return len(self.sampler) - self.skip


def _worker_init(worker_id):
    # A SIGTERM or SIGINT sent to the whole process group (a scheduler, Ctrl-C) is the
    # training process's to handle: it finishes its step and saves. Without this the
    # workers would die at once and take the training process down mid-step.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _kill_leftover_workers():
    # At exit, multiprocessing terminates daemonic children with SIGTERM and waits for them;
    # workers that ignore SIGTERM would make it wait forever. A normal exit has already shut
    # the workers down; after an error they may still run, so they get SIGKILL first.
    leftover = [child for child in multiprocessing.active_children() if child.daemon]
    if leftover:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # PyTorch's handler would report them as failures
        for child in leftover:
            child.kill()


atexit.register(_kill_leftover_workers)  # after multiprocessing.util's exit hook (imported above): runs first


def default_workers():
    """Data loading processes per process: the CPUs this process may use (its affinity: a
    container's or scheduler's share, not the machine's count), shared among this node's
    processes, at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8, max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


SHM = "/dev/shm"
PREFETCH_FACTOR = 2  # batches each data worker prepares ahead (DataLoader's default, set by make_loader)


def batch_bytes(dataset, batch_size, collate_fn=None):
    """Bytes of one batch of `dataset` (a SeededTransform) as a data worker hands it over: one
    sample, made and collated as the loader does it, times batch_size (every tensor of it: the
    images as the transform makes them, uint8 crops or float views, the labels and flags)."""
    one = (collate_fn or collate)([dataset[(0, 0)]])
    return batch_size * sum(t.numel() * t.element_size() for t in _tensors(one))


def _tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    return []


def check_shared_memory(workers, batch_bytes, path=SHM, pinned=False):
    """Stop with one line when the shared memory that data workers hand batches through is
    too small, for every process of this node (LOCAL_WORLD_SIZE). A default Docker container
    has 64 MB in /dev/shm, and workers that outgrow it die with a bus error mid-epoch.

    A worker collates each batch into shared memory. DataLoader keeps PREFETCH_FACTOR batches
    per worker under way (torch/utils/data/dataloader.py, _MultiProcessingDataLoaderIter: it
    sends workers x prefetch_factor indices, and one more for each batch it returns). A pinned
    batch (pin_memory, on CUDA) leaves shared memory when the pin thread copies it; otherwise
    the training loop holds up to two more there: the batch it works on, still referenced while
    the loader returns the next one."""
    if workers == 0 or not os.path.isdir(path):
        return  # workers=0 hands batches over in-process; no /dev/shm off Linux
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    held = 0 if pinned else 2
    batches = workers * PREFETCH_FACTOR + held
    need = processes * batches * batch_bytes
    if free < need:
        fits = max(0, (free // (processes * batch_bytes) - held) // PREFETCH_FACTOR)
        raise DataError(f"{path} has {free / 2**20:.0f} MiB free, but {processes} process(es) x ({workers} data workers "
                        f"x {PREFETCH_FACTOR}{f' + {held} in use' if held else ''}) batches of "
                        f"{batch_bytes / 2**20:.1f} MiB need about {need / 2**20:.0f} MiB: the workers would die with "
                        f"a bus error. Give the container more (docker run --shm-size="
                        f"{max(1, -(-need * 2 // 2**30))}g, or --ipc=host), or use --workers {fits} or fewer")


def _is_image(x):
    return isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.dim() == 3 and x.shape[0] == 3


def _rows(sample):
    if isinstance(sample, (tuple, list)):
        return type(sample)(_rows(v) for v in sample)
    return sample.permute(1, 2, 0) if _is_image(sample) else sample


def _channels_first(batch, like):
    if isinstance(like, (tuple, list)):
        return type(batch)(_channels_first(b, v) for b, v in zip(batch, like))
    return batch.permute(0, 3, 1, 2) if _is_image(like) else batch


def collate(samples):
    """default_collate, except that uint8 images (3, H, W) are stacked as their (H, W, 3) pixels
    and come out as a channels_last (B, 3, H, W) batch: the views are channels-last already, so
    this is a plain copy (into shared memory in a worker), where stacking them as (B, 3, H, W)
    rows would transpose every image on the CPU. The device converts or transposes the batch."""
    return _channels_first(torch.utils.data.default_collate([_rows(s) for s in samples]), samples[0])


def make_loader(dataset, batch_size, train, workers, rank=0, world=1, seed=0, pin_memory=False):
    """DataLoader over this rank's share of a SeededTransform; batch_size is per rank.

    train: shuffled by (seed, epoch) (call loader.sampler.set_epoch(epoch) each
    epoch) and the last incomplete batch dropped, so every rank runs the same
    number of equal steps. Otherwise in order and nothing dropped; with several
    ranks DistributedSampler pads the last batch by repeating a few samples.
    Image batches are uint8 channels_last (collate). With workers, first checks that /dev/shm
    holds the batches they hand over (check_shared_memory; one sample made to measure them).
    """
    if workers > 0 and len(dataset):
        check_shared_memory(workers, batch_bytes(dataset, batch_size), path=SHM, pinned=pin_memory)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=train, seed=seed, drop_last=train)
    return DataLoader(dataset, batch_size=batch_size, sampler=EpochTagged(sampler), num_workers=workers,
                      collate_fn=collate, pin_memory=pin_memory, drop_last=train, persistent_workers=workers > 0,
                      worker_init_fn=_worker_init, prefetch_factor=PREFETCH_FACTOR if workers > 0 else None)
