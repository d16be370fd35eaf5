"""torch.hub entry points: the official SimCLR v1/v2 weights, downloaded, converted exactly and cached.

    model = torch.hub.load("path/to/this/clone", "simclr_v2", "r50_1x_sk0", bucket="finetuned_10pct",
                           source="local")
    h = model(x)                   # x: (B, 3, 224, 224) RGB in [0, 1], no mean/std normalisation
    logits = model.classifier(h)   # the released linear classifier, on projection-head layer model.head_layer
    z = model.projection_head(h)   # v2 only

From GitHub, torch.hub.load("OWNER/REPO", "simclr_v2", ...) works the same (without source="local").
The first call downloads the official TensorFlow files (torch.hub.download_url_to_file), converts
them with convert_official.py and keeps the converted encoder.pt in
torch.hub.get_dir()/checkpoints/simclr/; later calls read that file.
`python hubconf.py simclr_v2 r50_1x_sk0 --bucket pretrained` does the same and prints the file's
path (for linear_eval.py --checkpoint-classifier).
Docs: README "Official weights" and docs/official-checkpoints.md.
"""
import argparse
import glob
import http.client
import importlib
import os
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile

import torch
from torch import nn

dependencies = ["torch", "torchvision", "numpy"]  # numpy: convert_official.py reads the TF files with it

_HERE = os.path.dirname(os.path.abspath(__file__))


def _import_own(names):
    """This folder's modules `names`, even where a module of the same name (a user's own model.py)
    is already imported; sys.modules is left as it was found, so the user's imports are untouched."""
    def own(module):
        path = getattr(module, "__file__", None) or ""
        return os.path.realpath(path) == os.path.realpath(os.path.join(_HERE, module.__name__ + ".py"))
    found = {n: sys.modules.get(n) for n in names}
    for n, m in found.items():
        if m is not None and not own(m):
            del sys.modules[n]
    sys.path.insert(0, _HERE)
    try:
        return [importlib.import_module(n) for n in names]
    finally:
        sys.path.remove(_HERE)
        for n, m in found.items():
            if m is None:
                sys.modules.pop(n, None)
            elif not own(m):
                sys.modules[n] = m


_model, _convert = _import_own(["model", "convert_official"])

V1_MODELS = ("r50_1x", "r50_2x", "r50_4x")
V2_MODELS = ("r50_1x_sk0", "r50_1x_sk1", "r50_2x_sk0", "r50_2x_sk1", "r101_1x_sk0", "r101_1x_sk1", "r101_2x_sk0",
             "r101_2x_sk1", "r152_1x_sk0", "r152_1x_sk1", "r152_2x_sk0", "r152_2x_sk1", "r152_3x_sk1")
V2_BUCKETS = ("pretrained", "finetuned_1pct", "finetuned_10pct", "finetuned_100pct", "supervised")
# The distilled students: gs://simclr-checkpoints/simclrv2/distill_{1,10}pct/TEACHER/STUDENT/, every one
# distilled from the released r152_3x_sk1 (r152_3x_sk1/r152_3x_sk1 is the self-distilled one; the
# maintainers in google-research/simclr#130). MODEL names the student.
DISTILL_BUCKETS = ("distill_1pct", "distill_10pct")
DISTILL_TEACHER = "r152_3x_sk1"
V2_URL = "https://storage.googleapis.com/simclr-checkpoints"  # gs://simclr-checkpoints: simclrv2/BUCKET/MODEL/
V1_URL = "https://storage.googleapis.com/simclr-gcs"  # the official README's ResNet50_{1,2,4}x.zip: checkpoints/


class _HubError(RuntimeError):
    """A download or conversion that failed; the message is one line and says what to do."""


def simclr_v1(model="r50_1x", pretrained=True, checkpoint_dir=None, progress=True, head_layer=None):
    """SimCLR v1 ResNet-50 (model "r50_1x", "r50_2x" or "r50_4x") with its released linear classifier
    (official ImageNet top-1: 69.1, 74.2, 76.6), from the official README's ResNet50_{1,2,4}x.zip.

    Returns the encoder in eval mode: x (B, 3, H, W), RGB in [0, 1] without mean/std normalisation
    (the official input; at 224 px: augment.EvalTransform(224, train=False), then .float() / 255)
    -> h (B, 2048 x width). Attributes, not submodules (so .to(device) moves only the encoder):
    classifier (h -> 1000 logits, eval mode), projection_head (None: the v1 files have none),
    head_layer (0), checkpoint_path (the converted encoder.pt in the cache), meta.
    pretrained=False: the same architecture with random weights, nothing downloaded.
    checkpoint_dir: a folder holding the unzipped ResNet50_1x/ folder or the zip (or that folder
    itself) to convert instead of downloading; $SIMCLR_WEIGHTS_DIR is looked in the same way.
    head_layer: which projection-head layer the classifier reads (default: as converted, 0).
    """
    _choose(model, V1_MODELS, "simclr_v1 model")
    if not pretrained:
        return _random(model, v2=False, head_layer=head_layer or 0)
    return _from_cache(f"simclr_v1({model!r})", _v1_file(model, checkpoint_dir, progress), head_layer)


def simclr_v2(model="r50_1x_sk0", bucket="pretrained", pretrained=True, checkpoint_dir=None, progress=True,
              head_layer=None):
    """A released SimCLR v2 model (one of V2_MODELS, e.g. "r152_3x_sk1") from the official bucket
    gs://simclr-checkpoints/simclrv2/BUCKET/MODEL/, BUCKET one of "pretrained" (linear classifier
    on h), "finetuned_1pct", "finetuned_10pct" (classifier on projection-head layer 1),
    "finetuned_100pct" (on h), "supervised" (on h); or the student MODEL distilled from r152_3x_sk1,
    gs://simclr-checkpoints/simclrv2/BUCKET/r152_3x_sk1/MODEL/, BUCKET "distill_1pct" or
    "distill_10pct" (the classifier's head layer read from the checkpoint, as convert_official.py
    does: 1 if its first projection-head layer was trained, else 0).

    Returns the encoder in eval mode: x (B, 3, H, W), RGB in [0, 1] without mean/std normalisation
    (the official input; at 224 px: augment.EvalTransform(224, train=False), then .float() / 255)
    -> h (B, 2048 x width). Attributes, not submodules (so .to(device) moves only the encoder):
    projection_head (the 3-layer head, h -> z, eval mode), classifier (h -> 1000 logits through the
    head's first head_layer layers, eval mode), head_layer, checkpoint_path (the converted
    encoder.pt in the cache), meta.
    pretrained=False: the same architecture with random weights, nothing downloaded.
    checkpoint_dir: the official MODEL folder, or a folder holding simclrv2/BUCKET/MODEL/ or
    BUCKET/MODEL/, to convert instead of downloading; $SIMCLR_WEIGHTS_DIR is looked in the same way.
    head_layer: override the layer the classifier reads (e.g. 1 for finetuned_100pct).
    """
    _choose(model, V2_MODELS, "simclr_v2 model")
    _choose(bucket, V2_BUCKETS + DISTILL_BUCKETS, "simclr_v2 bucket")
    if not pretrained:
        default = _convert.default_head_layer(f"simclrv2/{bucket}/{model}")  # distill_*: 0, as no file says
        return _random(model, v2=True, head_layer=default if head_layer is None else head_layer)
    return _from_cache(f"simclr_v2({model!r}, bucket={bucket!r})", _v2_file(model, bucket, checkpoint_dir, progress),
                       head_layer)


def simclr_encoder(path, head_layer=None):
    """An encoder.pt or ckpt.pt of this project (pretrain.py's --out folder, convert_official.py,
    a lab's shared file), as simclr_v1/v2 return theirs: the encoder in eval mode with
    projection_head, classifier, head_layer (None where the file has none), checkpoint_path, meta."""
    return _from_file(os.path.abspath(os.path.expanduser(path)), head_layer)


# ----------------------------------------------------------------------------
# The converted file: from the cache, else from local official files, else downloaded.

def _v1_file(model, checkpoint_dir, progress):
    what, zip_name = f"simclr_v1({model!r})", f"ResNet50_{model.split('_')[1]}.zip"
    url = f"{_base(V1_URL)}/checkpoints/{zip_name}"
    folder = zip_name[:-len(".zip")]

    def places(root, itself):
        return ([root] if itself else []) + [os.path.join(root, folder), os.path.join(root, zip_name),
                                             os.path.join(root, "checkpoints", zip_name)]

    def download(tmp):
        _download(what, url, os.path.join(tmp, zip_name), progress, hint)
        return _unzip_checkpoint(os.path.join(tmp, zip_name), tmp), url

    hint = (f"without network, download {url} by hand, unzip it in a folder DIR and set SIMCLR_WEIGHTS_DIR=DIR "
            f"or pass checkpoint_dir=DIR")
    return _official_file(what, f"simclrv1-{model}.pt", model, "simclrv1/" + folder, places, checkpoint_dir, download,
                          hint, progress)


def _v2_file(model, bucket, checkpoint_dir, progress):
    folder = f"{bucket}/{DISTILL_TEACHER}/{model}" if bucket in DISTILL_BUCKETS else f"{bucket}/{model}"
    what, rel = f"simclr_v2({model!r}, bucket={bucket!r})", f"simclrv2/{folder}"
    url = f"{_base(V2_URL)}/{rel}"

    def places(root, itself):
        return ([root] if itself else []) + [os.path.join(root, *rel.split("/")), os.path.join(root, *folder.split("/"))]

    def download(tmp):
        dest = os.path.join(tmp, *rel.split("/"))
        os.makedirs(dest)
        _download(what, f"{url}/checkpoint", os.path.join(dest, "checkpoint"), progress, hint)
        name = _checkpoint_name(_read_text(os.path.join(dest, "checkpoint")), f"{url}/checkpoint")
        prefix = os.path.join(dest, name)
        _download(what, f"{url}/{name}.index", prefix + ".index", progress, hint)
        shards = _convert.TFCheckpoint(prefix).num_shards  # the index says how many data files there are
        for i in range(shards):
            suffix = f".data-{i:05d}-of-{shards:05d}"
            _download(what, f"{url}/{name}{suffix}", prefix + suffix, progress, hint)
        return prefix, f"{url}/{name}"

    hint = (f"without network, copy gs://simclr-checkpoints/{rel}/ (the files checkpoint, model.ckpt-N.index and "
            f"model.ckpt-N.data-00000-of-00001 under {V2_URL}/{rel}/) to DIR/{rel}/ and set SIMCLR_WEIGHTS_DIR=DIR "
            f"or pass checkpoint_dir=DIR")
    return _official_file(what, f"simclrv2-{bucket}-{model}.pt", model, rel, places, checkpoint_dir, download, hint,
                          progress)


def _official_file(what, file_name, model, rel, places, checkpoint_dir, download, hint, progress):
    """The cached converted file; made once, from checkpoint_dir, $SIMCLR_WEIGHTS_DIR or a download
    (once it is cached, later calls read it whatever checkpoint_dir says).
    Everything happens in a temporary folder beside the cache, removed at the end whatever happens;
    the converted file appears under its name only when it is complete and checked."""
    cache = os.path.join(torch.hub.get_dir(), "checkpoints", "simclr")
    path = os.path.join(cache, file_name)
    if os.path.isfile(path):
        return path
    if checkpoint_dir is not None:
        local = _first_present(places(os.path.abspath(os.path.expanduser(checkpoint_dir)), True))
        if local is None:
            raise _HubError(f"{what}: checkpoint_dir={checkpoint_dir} holds no official folder or zip (looked at "
                            f"{', '.join(places(checkpoint_dir, True))})")
    else:
        weights_dir = os.environ.get("SIMCLR_WEIGHTS_DIR")
        local = _first_present(places(os.path.expanduser(weights_dir), False)) if weights_dir else None
    os.makedirs(cache, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{file_name}.", suffix=".partial", dir=cache)
    try:
        if local is None:
            prefix, source = download(tmp)
        elif local.endswith(".zip"):
            prefix, source = _unzip_checkpoint(local, tmp), os.path.abspath(local)
        else:
            prefix = _prefix_in_folder(local)
            source = os.path.abspath(prefix)
        ckpt = _convert.TFCheckpoint(prefix)
        head_layer = _convert.release_head_layer(rel, ckpt)[0]  # from the bucket's name, not where it lies here
        config = _convert.plan(ckpt.shapes, head_layer)[0]
        _check_architecture(what, model, config, source)
        out = os.path.join(tmp, file_name)
        if progress:
            print(f"Converting {source} to {path}", file=sys.stderr, flush=True)
        _convert.convert(prefix, out, head_layer=head_layer, extra_meta={"tf_checkpoint": source, "hub": what})
        os.replace(out, path)
    except (_convert.ConvertError, _model.CheckpointError, OSError, zipfile.BadZipFile) as e:
        raise _HubError(f"{what}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _first_present(candidates):
    """The first candidate that is a zip file or a folder holding a TF checkpoint, or None."""
    for c in candidates:
        if c.endswith(".zip") and os.path.isfile(c):
            return c
        if os.path.isfile(os.path.join(c, "checkpoint")) or glob.glob(os.path.join(glob.escape(c), "*.index")):
            return c
    return None


def _prefix_in_folder(folder):
    """The checkpoint the folder's `checkpoint` file names, else the folder's only one."""
    state = os.path.join(folder, "checkpoint")
    if os.path.isfile(state):
        prefix = os.path.join(folder, _checkpoint_name(_read_text(state), state))
        if os.path.isfile(prefix + ".index"):
            return prefix
    return _convert.resolve_prefix(folder)


def _read_text(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _checkpoint_name(text, source):
    """The file name of the checkpoint a TF `checkpoint` state file names (model_checkpoint_path,
    which may be a full gs:// path: only its last part is used)."""
    found = re.search(r'^model_checkpoint_path:\s*"([^"]*)"', text, re.M)
    name = found.group(1).replace("\\", "/").rsplit("/", 1)[-1] if found else ""
    if not re.fullmatch(r"[\w.+-]+", name) or name in (".", ".."):
        raise _convert.ConvertError(f"{source} names no checkpoint (no model_checkpoint_path line with a file "
                                    "name): not the state file of an official folder")
    return name


def _unzip_checkpoint(zip_path, dest):
    """Extract the checkpoint (index and data files, nothing else: not the .meta graph, not hub/) of an
    official v1 zip (ResNet50_1x/checkpoint, model.ckpt-225206.*, hub/) into dest -> its prefix."""
    def outside_hub(n):
        return not {"hub", "variables"} & set(n.split("/")[:-1])

    with zipfile.ZipFile(zip_path) as zf:
        names = [n for n in zf.namelist() if not n.endswith("/") and outside_hub(n)]
        indexes = [n for n in names if n.endswith(".index")]
        for state in [n for n in names if n.rsplit("/", 1)[-1] == "checkpoint"]:
            name = _checkpoint_name(zf.read(state).decode("utf-8", "replace"), f"{zip_path}:{state}")
            indexes = [n for n in indexes if n == state[:-len("checkpoint")] + name + ".index"] or indexes
        if len(indexes) != 1:
            raise _convert.ConvertError(f"{zip_path} holds {len(indexes)} checkpoint indexes outside hub/: not an "
                                        "official SimCLR v1 zip")
        member_prefix = indexes[0][:-len(".index")]
        prefix = os.path.join(dest, member_prefix.rsplit("/", 1)[-1])
        for n in names:
            if n.startswith(member_prefix) and re.fullmatch(r"\.index|\.data-\d{5}-of-\d{5}", n[len(member_prefix):]):
                with zf.open(n) as src, open(prefix + n[len(member_prefix):], "wb") as f:
                    shutil.copyfileobj(src, f, 1 << 20)  # the zip's CRC is checked as it is read
    return prefix


def _download(what, url, dst, progress, hint):
    """torch.hub.download_url_to_file, and a one-line error naming the URL and the way round it.
    It accepts a body shorter than its Content-Length (http.client does not raise): the size the
    server announces for a HEAD request is checked after the download."""
    try:
        size = _remote_size(url)
        if progress:
            print(f'Downloading "{url}" to {os.path.dirname(dst)}', file=sys.stderr, flush=True)
        torch.hub.download_url_to_file(url, dst, progress=progress)
        got = os.path.getsize(dst)
        reason = None if size is None or got == size else f"the download ended after {got} of {size} bytes"
    except urllib.error.HTTPError as e:
        reason = f"HTTP {e.code} {e.reason}"
    except urllib.error.URLError as e:
        reason = str(e.reason)
    except (OSError, http.client.HTTPException, ValueError) as e:  # ValueError: a malformed SIMCLR_HUB_URL
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if reason is not None:
        if os.path.exists(dst):
            os.remove(dst)
        raise _HubError(f"{what}: cannot download {url} ({reason}); {hint}")


def _remote_size(url):
    """The byte count a HEAD request announces, or None (not given, compressed, or no HEAD)."""
    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "torch.hub"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            length, encoding = r.headers.get("Content-Length"), r.headers.get("Content-Encoding", "identity")
    except urllib.error.HTTPError as e:
        if e.code in (405, 501):  # the server does not answer HEAD: the download itself will say more
            return None
        raise
    return int(length) if length and length.isdigit() and encoding == "identity" else None


def _base(default):
    return os.environ.get("SIMCLR_HUB_URL", "").rstrip("/") or default


def _choose(value, choices, what):
    if value not in choices:
        raise ValueError(f"{what} {value!r} is not released; choose one of {', '.join(choices)}")


# ----------------------------------------------------------------------------
# The architecture a released name stands for, and the module that is returned.

def _architecture(name):
    """build_encoder's arguments for a released name, as convert_official.py infers them from
    the official files: r{depth}_{width}x[_sk0|_sk1]."""
    depth, width, sk = re.fullmatch(r"r(\d+)_(\d)x(?:_sk([01]))?", name).groups()
    config = {"arch": f"resnet{depth}", "width": int(width), "cifar_stem": False, "tf_same_pool": True}
    if sk == "1":
        config["sk_ratio"] = _convert.SK_RATIO
    return config


def _check_architecture(what, name, config, source):
    """Depth and selective kernels must be the name's; the width is read from the files as it is."""
    want = _architecture(name)
    if config["arch"] != want["arch"] or ("sk_ratio" in config) != ("sk_ratio" in want):
        raise _HubError(f"{what}: {source} holds a {config['arch']}{' SK' if 'sk_ratio' in config else ''} "
                        f"network, not {name}: the files are not that model's")


def _classifier(head, k, in_dim, state=None):
    """h -> logits: the first k projection-head layers, then the linear layer (state: its weights)."""
    if k and head is None:
        raise ValueError(f"head_layer={k}: there is no projection head")
    trunk = head.first_layers(k) if k else nn.Identity()  # first_layers raises past the last layer
    dim = in_dim if k == 0 else head.config["out_dim"] if k == head.config["num_layers"] else head.config["hidden_dim"]
    linear = nn.Linear(dim, 1000 if state is None else state["weight"].shape[0])
    if state is not None:
        if state["weight"].shape[1] != dim:
            raise ValueError(f"the stored classifier reads {state['weight'].shape[1]} features; head layer {k} "
                             f"gives {dim}")
        linear.load_state_dict({"weight": state["weight"], "bias": state["bias"]})
    return nn.Sequential(trunk, linear).eval()


def _attach(encoder, head, classifier, head_layer, path, meta):
    """The returned module: the encoder in eval mode; head and classifier as plain attributes (set
    in __dict__, not registered), so state_dict() and parameters() are the encoder's alone."""
    encoder.__dict__.update(projection_head=head.eval() if head is not None else None, classifier=classifier,
                            head_layer=head_layer if classifier is not None else None, checkpoint_path=path,
                            meta=meta)
    return encoder.eval()


def _from_cache(what, path, head_layer):
    try:
        return _from_file(path, head_layer)
    except _model.CheckpointError as e:
        raise _HubError(f"{what}: {e}; delete it to download and convert again") from None


def _from_file(path, head_layer=None):
    encoder, ckpt = _model.load_encoder(path)
    head = _model.load_head(path, ckpt)
    stored = ckpt.get("classifier")
    if stored is None:
        if head_layer is not None:
            raise ValueError(f"head_layer={head_layer}: {path} stores no classifier")
        return _attach(encoder, head, None, None, path, ckpt.get("meta") or {})
    k = stored["head_layer"] if head_layer is None else head_layer
    return _attach(encoder, head, _classifier(head, k, encoder.feature_dim, stored), k, path, ckpt.get("meta") or {})


def _random(name, v2, head_layer):
    encoder = _model.build_encoder(**_architecture(name))
    head = _model.ProjectionHead(encoder.feature_dim, num_layers=3) if v2 else None  # the v2 head; v1 files have none
    return _attach(encoder, head, _classifier(head, head_layer, encoder.feature_dim), head_layer, None, {})


def _main(argv=None):
    p = argparse.ArgumentParser(prog="hubconf.py", description="Download and convert an official SimCLR model "
                                "into torch.hub's cache, as the torch.hub entries do, and print the converted "
                                "encoder.pt's path (e.g. for linear_eval.py --checkpoint-classifier).")
    p.add_argument("entry", choices=["simclr_v1", "simclr_v2"])
    p.add_argument("model", help=f"v1: {', '.join(V1_MODELS)}; v2: {', '.join(V2_MODELS)}")
    p.add_argument("--bucket", default=None, help=f"simclr_v2 only: {', '.join(V2_BUCKETS + DISTILL_BUCKETS)} "
                                                   "(default: pretrained)")
    p.add_argument("--checkpoint-dir", default=None, help="official files downloaded by hand, converted instead of "
                                                          "downloading (see the entries' docstrings)")
    args = p.parse_args(argv)
    try:
        if args.entry == "simclr_v1":
            if args.bucket is not None:
                p.error("--bucket is for simclr_v2: the v1 zips hold one model each")
            _choose(args.model, V1_MODELS, "simclr_v1 model")
            path = _v1_file(args.model, args.checkpoint_dir, progress=True)
        else:
            bucket = args.bucket or "pretrained"
            _choose(args.model, V2_MODELS, "simclr_v2 model")
            _choose(bucket, V2_BUCKETS + DISTILL_BUCKETS, "simclr_v2 bucket")
            path = _v2_file(args.model, bucket, args.checkpoint_dir, progress=True)
    except (_HubError, ValueError) as e:
        sys.exit(f"hubconf.py: error: {e}")
    print(path)


if __name__ == "__main__":
    _main()
