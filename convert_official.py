"""Convert the official SimCLR v1/v2 TensorFlow checkpoints to this project's encoder.pt.

    python convert_official.py r50_1x/model.ckpt-225206 r50_1x.pt
    python linear_eval.py r50_1x.pt --dataset imagefolder --data-dir /data/imagenet --checkpoint-classifier
    python convert_official.py finetuned_10pct/r152_3x_sk1/model.ckpt-NNNN r152_3x_sk1_ft10.pt  # --head-layer 1 implied
    python convert_official.py my_run/model.ckpt-NNNN my_run.pt --ema  # a run that kept EMA copies of its weights
    python convert_official.py distill_1pct/r152_3x_sk1/r152_3x_sk1 r152_3x_sk1_distill1.pt  # a distilled student

Reads the `.index` + `.data-*` files of a checkpoint written by the official TF1 code
(google-research/simclr, root folder), without TensorFlow: the v1 ResNet-50 1x/2x/4x, the v2
`pretrained`, `finetuned_*` and `supervised` folders (ResNet-50/101/152, 1x/2x/3x, sk0 and sk1), and
the official ResNet-18/34. The index is a LevelDB table of BundleEntryProto records, parsed below
with numpy and the standard library; layers are matched in the order the official resnet.py creates
them, and every shape is checked against the rebuilt module. The encoder is rebuilt exactly (TF's
'SAME' stem max-pool, SK, the official ResNet-18/34 shortcuts); the projection head and the
supervised head (as "classifier", reading h or projection-head layer 1) are carried over.

The released models, the head layer each classifier reads, and equality with TF:
docs/official-checkpoints.md. The distilled students (distill_1pct / distill_10pct, folders
TEACHER/STUDENT: the student's folder may be given) are read the same way; their classifier reads
projection-head layer 1 when the checkpoint shows that layer trained, else h.
"""
import argparse
import glob
import os
import sys

import numpy as np
import torch

import flags
import output
from model import ARCHS, BasicBlock, ProjectionHead, build_encoder, save_encoder, tensor_bytes


class ConvertError(ValueError):
    """Input this converter cannot read or does not support; printed as one line."""


# ----------------------------------------------------------------------------
# Reading a TensorFlow checkpoint: the index is a LevelDB-format table (blocks of
# prefix-compressed key/value entries, an index block, a 48-byte footer) whose
# values are BundleEntryProto messages; tensors are raw bytes in the data shards.

TABLE_MAGIC = 0xdb4775248b80fb57
DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8, 9: np.int64,
          10: np.bool_, 19: np.float16}  # TF DataType enum values


def _varint(buf, pos):
    """-> (unsigned value, next position)."""
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ConvertError("truncated varint in checkpoint index")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7


def _proto_fields(buf):
    """Protocol-buffer wire format -> {field number: [values]} (ints, or bytes for length-delimited)."""
    fields, pos = {}, 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = bytes(buf[pos:pos + n]), pos + n
        elif wire == 5:
            value, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        else:
            raise ConvertError(f"unsupported protobuf wire type {wire} in checkpoint index")
        fields.setdefault(number, []).append(value)
    return fields


def _block(data, handle):
    """One table block (offset, size) -> its (key, value) entries."""
    offset, size = handle
    if offset + size + 5 > len(data):
        raise ConvertError("checkpoint index is truncated (a block lies past its end)")
    if data[offset + size] != 0:  # trailer: compression type, then a crc32c
        raise ConvertError("checkpoint index uses a compressed block (snappy); only uncompressed tables are read")
    block = data[offset:offset + size]
    num_restarts = int.from_bytes(block[-4:], "little")
    end = len(block) - 4 * (num_restarts + 1)  # entries stop where the restart array begins
    entries, pos, key = [], 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        value_len, pos = _varint(block, pos)
        key = key[:shared] + bytes(block[pos:pos + unshared])
        pos += unshared
        entries.append((key, bytes(block[pos:pos + value_len])))
        pos += value_len
    return entries


def _handle(buf, pos=0):
    offset, pos = _varint(buf, pos)
    size, pos = _varint(buf, pos)
    return (offset, size), pos


class TFCheckpoint:
    """The tensors of a TF checkpoint `prefix` (prefix.index, prefix.data-*), read lazily.

    .shapes: {name: shape}; .read(name) -> numpy array. Sizes are checked
    (dtype x shape against the stored byte count); crc32c is not.
    """

    def __init__(self, prefix):
        index = prefix + ".index"
        if not os.path.isfile(index):
            raise ConvertError(f"no TensorFlow checkpoint at {prefix} (expected {index} and {prefix}.data-*)")
        with open(index, "rb") as f:
            data = f.read()
        if len(data) < 48 or int.from_bytes(data[-8:], "little") != TABLE_MAGIC:
            raise ConvertError(f"{index} is not a TensorFlow checkpoint index (bad table footer)")
        _, pos = _handle(data[-48:])  # the metaindex block: unused by TF
        index_handle, _ = _handle(data[-48:], pos)
        self.prefix, self.entries, header = prefix, {}, None
        for _, block_handle in _block(data, index_handle):
            for key, value in _block(data, _handle(block_handle)[0]):
                if key == b"":
                    header = _proto_fields(value)  # BundleHeaderProto: num_shards, endianness, version
                else:
                    self.entries[key.decode()] = self._entry(key.decode(), value)
        if header is None:
            raise ConvertError(f"{index} has no bundle header: not a TF2-era (V2) checkpoint index")
        if header.get(2, [0])[0] != 0:
            raise ConvertError(f"{index} stores big-endian tensors; only little-endian is read")
        self.num_shards = header.get(1, [1])[0]
        self.shapes = {name: e["shape"] for name, e in self.entries.items()}

    @staticmethod
    def _entry(name, value):
        """BundleEntryProto: dtype 1, shape 2, shard_id 3, offset 4, size 5, crc32c 6, slices 7."""
        f = _proto_fields(value)
        if 7 in f:
            raise ConvertError(f"tensor {name} is stored in slices (partitioned variable); not supported")
        shape = []
        if 2 in f:
            for dim in _proto_fields(f[2][0]).get(2, []):
                shape.append(_proto_fields(dim).get(1, [0])[0])
        return {"dtype": f.get(1, [0])[0], "shape": tuple(shape), "shard": f.get(3, [0])[0],
                "offset": f.get(4, [0])[0], "size": f.get(5, [0])[0]}

    def read(self, name):
        e = self.entries[name]
        if e["dtype"] not in DTYPES:
            raise ConvertError(f"tensor {name} has TF dtype {e['dtype']}, which this reader does not handle")
        dtype = np.dtype(DTYPES[e["dtype"]]).newbyteorder("<")
        count = int(np.prod(e["shape"], dtype=np.int64))
        if count * dtype.itemsize != e["size"]:
            raise ConvertError(f"tensor {name}: {e['size']} bytes stored for shape {e['shape']} of {dtype}")
        path = f"{self.prefix}.data-{e['shard']:05d}-of-{self.num_shards:05d}"
        if not os.path.isfile(path):
            raise ConvertError(f"missing data file {path}")
        if os.path.getsize(path) < e["offset"] + e["size"]:
            raise ConvertError(f"{path} is truncated: tensor {name} lies past its end")
        array = np.fromfile(path, dtype=dtype, count=count, offset=e["offset"])
        return array.reshape(e["shape"]).astype(dtype.newbyteorder("="))


# ----------------------------------------------------------------------------
# The official layout. Names are the TF1 ones under the scopes of the official
# model.py: base_model/ (resnet.py), head_contrastive/ and head_supervised/ (model_util.py).

SKIPPED_PARTS = {"Momentum", "ExponentialMovingAverage", "Adam", "Adam_1", "RMSProp", "RMSProp_1", "LARSOptimizer"}
MODEL_SCOPES = ("base_model/", "head_contrastive/", "head_supervised/")
SK_RATIO = 0.0625  # every released sk1 model; it only sets the attention widths, which are checked below
BN_PARAMS = (("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"), ("moving_variance", "running_var"))


def skipped(name):
    """Optimizer slots, EMA copies and counters: not part of the model."""
    parts = name.split("/")
    return (name == "global_step" or parts[0] in ("beta1_power", "beta2_power")
            or any(p in SKIPPED_PARTS or p.endswith("ExponentialMovingAverage") for p in parts))


def _tf_name(kind, i):  # the i-th layer of a kind: conv2d, conv2d_1, conv2d_2, ...
    return kind if i == 0 else f"{kind}_{i}"


def official_convs(arch, sk, resnet_d_stem):
    """How many convolutions the official resnet.py creates: the stem (3 in the ResNet-D one),
    per block 2 (basic), 3 (bottleneck) or 5 (SK bottleneck: conv1, the 2f conv, two attention
    1x1s, conv3), and one projection shortcut in the first block of each of the 4 groups."""
    block, layers = ARCHS[arch]
    per_block = 2 if block is BasicBlock else 5 if sk else 3
    return (3 if resnet_d_stem else 1) + per_block * sum(layers) + 4


def _convs_and_bns(module, prefix):
    return [f"{prefix}.{n}".rstrip(".") for n, m in module.named_modules()
            if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d))]


def creation_order(encoder):
    """Our conv and BN module names in the order the official resnet.py creates its layers:
    the stem, then per block the projection shortcut first (ours registers it last), then
    the block's layers in the order model.py registers them, which is the official one
    (an SK block: conv1, bn1, the 2f conv, its BN, attention conv, BN, conv, then conv3, bn3)."""
    order = _convs_and_bns(encoder.conv1, "conv1") + ["bn1"]
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for j, block in enumerate(getattr(encoder, stage)):
            prefix = f"{stage}.{j}"
            if block.downsample is not None:
                order += _convs_and_bns(block.downsample, prefix + ".downsample")
            order += [n for n in _convs_and_bns(block, prefix) if ".downsample" not in n]
    convs = [n for n in order if isinstance(encoder.get_submodule(n), torch.nn.Conv2d)]
    return convs, [n for n in order if n not in convs]


def encoder_config(base):
    """The encoder config of an official base_model layout {name: shape}: stem kind and width
    from the first convolution(s), depth and SK from the number of convolutions."""
    stem = base.get("base_model/conv2d/kernel")
    if stem is None or len(stem) != 4:
        raise ConvertError("no base_model/conv2d/kernel: not a checkpoint of the official SimCLR (TF1) code")
    if any(n.startswith("base_model/conv2d") and n.endswith("/bias") for n in base):  # se_layer's convs have biases
        raise ConvertError("this checkpoint has squeeze-and-excitation layers (se_ratio > 0, convolutions with "
                           "biases), which this converter does not support; no official release uses them")
    if stem[:3] not in ((7, 7, 3), (3, 3, 3)):
        raise ConvertError(f"unexpected stem kernel {stem}: not an official SimCLR ResNet")
    second = base.get("base_model/conv2d_1/kernel")
    # ResNet-D stem: 3x3 (3 -> 32w), 3x3 (32w -> 32w), 3x3 (32w -> 64w). The CIFAR stem is one 3x3
    # conv to 64w, followed by the first block's 1x1 projection shortcut (official: always one).
    resnet_d_stem = stem[:3] == (3, 3, 3) and second is not None and second == (3, 3, stem[3], stem[3])
    width = stem[3] / (32 if resnet_d_stem else 64)
    n_convs = sum(n.endswith("/kernel") and n.startswith("base_model/conv2d") for n in base)
    found = [(arch, sk) for arch in ARCHS for sk in (False, True)
             if (not sk or ARCHS[arch][0] is not BasicBlock) and (sk or not resnet_d_stem)
             and official_convs(arch, sk, resnet_d_stem) == n_convs]
    if not found:
        raise ConvertError(f"{n_convs} convolutions in base_model: not an official ResNet-18/34/50/101/152 "
                           f"(sk0 or sk1) layout with a {'ResNet-D' if resnet_d_stem else stem[0]}x"
                           f"{'' if resnet_d_stem else stem[1]} stem")
    (arch, sk), = found
    config = {"arch": arch, "width": int(width) if width == int(width) else width, "cifar_stem": stem[0] == 3
              and not resnet_d_stem}
    if not config["cifar_stem"]:
        config["tf_same_pool"] = True
    if sk:
        config["sk_ratio"] = SK_RATIO
    if ARCHS[arch][0] is BasicBlock:  # the official ResNet-18/34 project in the first group too
        config["first_group_projection"] = True
    return config


def plan(shapes, head_layer=0):
    """Map a checkpoint's {name: shape} onto our modules.

    -> (encoder_config, head_config or None, classes or None, [(tf name, target, key, transpose)])
    with target "encoder", "head" or "classifier". Raises ConvertError for layouts
    other than the official ResNet-18/34/50/101/152 (sk0, and sk1 for 50/101/152) with its heads.
    """
    model = {n: s for n, s in shapes.items() if not skipped(n)}
    base = {n: s for n, s in model.items() if n.startswith("base_model/")}
    config = encoder_config(base)
    name = f"{config['arch']} {config['width']}x{' SK' if 'sk_ratio' in config else ''}"
    with torch.device("meta"):  # shapes only, no memory, even for ResNet-152 3x
        encoder = build_encoder(**config)
    ours = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}

    mapping, used = [], set()

    def take(tf_name, target, key, expected, transpose):
        shape = model.get(tf_name)
        if shape is None:
            raise ConvertError(f"missing variable {tf_name} for a {name} layout")
        if transpose == "conv":
            shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape
        elif transpose == "dense":
            shape = tuple(reversed(shape))
        if shape != expected:
            raise ConvertError(f"variable {tf_name} has shape {model[tf_name]}, expected {expected} "
                               f"(as {key}) for a {name} layout")
        mapping.append((tf_name, target, key, transpose))
        used.add(tf_name)

    convs, bns = creation_order(encoder)
    for i, m in enumerate(convs):
        take(f"base_model/{_tf_name('conv2d', i)}/kernel", "encoder", m + ".weight", ours[m + ".weight"], "conv")
    for i, m in enumerate(bns):
        for tf_param, param in BN_PARAMS:
            take(f"base_model/{_tf_name('batch_normalization', i)}/{tf_param}", "encoder", f"{m}.{param}",
                 ours[f"{m}.{param}"], None)

    head_config = None
    scope = "head_contrastive/nl_{}"  # the official nonlinear head (proj_head_mode 'nonlinear', as released)
    num_layers = 0
    while f"{scope.format(num_layers)}/dense/kernel" in model:
        num_layers += 1
    if num_layers:
        first, last = model[f"{scope.format(0)}/dense/kernel"], model[f"{scope.format(num_layers - 1)}/dense/kernel"]
        head_config = {"in_dim": encoder.feature_dim, "hidden_dim": first[1], "out_dim": last[1],
                       "num_layers": num_layers}
        with torch.device("meta"):
            head = {k: tuple(v.shape) for k, v in ProjectionHead(**head_config).state_dict().items()}
        for j in range(num_layers):
            layer = scope.format(j)
            take(f"{layer}/dense/kernel", "head", f"net.{3 * j}.weight", head[f"net.{3 * j}.weight"], "dense")
            for tf_param, param in BN_PARAMS:
                if tf_param == "beta" and j == num_layers - 1:
                    continue  # the output BN has no shift (center=False); ours stays 0
                key = f"net.{3 * j + 1}.{param}"
                take(f"{layer}/batch_normalization/{tf_param}", "head", key, head[key], None)

    classes = None
    kernel = model.get("head_supervised/linear_layer/dense/kernel")
    if kernel is not None:
        classes = kernel[1]
        if not 0 <= head_layer <= num_layers:
            raise ConvertError(f"--head-layer {head_layer}: the checkpoint's projection head has {num_layers} layers")
        in_dim = (encoder.feature_dim if head_layer == 0 else
                  head_config["out_dim"] if head_layer == num_layers else head_config["hidden_dim"])
        take("head_supervised/linear_layer/dense/kernel", "classifier", "weight", (classes, in_dim), "dense")
        take("head_supervised/linear_layer/dense/bias", "classifier", "bias", (classes,), None)

    unknown = sorted(n for n in model if n not in used and n.startswith(MODEL_SCOPES))
    if unknown:
        raise ConvertError(f"{len(unknown)} variables of an unknown layout, e.g. {', '.join(unknown[:3])}: "
                           "only the official ResNet with its heads is supported")
    return config, head_config, classes, mapping


def _to_torch(array, transpose):
    if transpose == "conv":  # TF (H, W, in, out) -> PyTorch (out, in, H, W)
        array = array.transpose(3, 2, 0, 1)
    elif transpose == "dense":  # TF (in, out) -> PyTorch (out, in)
        array = array.T
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def with_averages(mapping, shapes):
    """The mapping with every trained variable read from its ExponentialMovingAverage copy
    (tf.train.ExponentialMovingAverage names it VARIABLE/ExponentialMovingAverage); BN moving
    statistics, which are not trained, stay as they are. Every trained variable must have one."""
    out, missing = [], []
    for tf_name, target, key, transpose in mapping:
        if not tf_name.endswith(("moving_mean", "moving_variance")):
            average = f"{tf_name}/ExponentialMovingAverage"
            if shapes.get(average) != shapes[tf_name]:
                missing.append(tf_name)
            tf_name = average
        out.append((tf_name, target, key, transpose))
    if missing:
        raise ConvertError(f"--ema: {len(missing)} of the trained variables have no ExponentialMovingAverage copy "
                           f"of their shape (e.g. {', '.join(missing[:3])}); convert without --ema")
    return out


# The folders of the official release (gs://simclr-checkpoints/simclrv2/...) and the projection-head
# layer each one's stored classifier reads. SimCLRv2 paper (Appendix, fine-tuning): "by default we
# fine-tune from the first layer of the projection head for 1%/10% of labeled examples, but from the
# input of the projection head when 100% labels are present"; pretrained (linear eval on h),
# supervised and v1 read h. The distill_* students are decided by their own values (distilled_head_layer).
RELEASE_FOLDERS = {"pretrained": 0, "supervised": 0, "finetuned_100pct": 0, "finetuned_1pct": 1, "finetuned_10pct": 1,
                   "distill_1pct": None, "distill_10pct": None}


def release_folder(path):
    """The release folder (a RELEASE_FOLDERS name) nearest the file in `path` (as given), or None:
    a copy kept under /data/finetuned_10pct/simclrv2/pretrained/ is a pretrained checkpoint."""
    parts = os.path.normpath(path).split(os.sep)
    return next((part for part in reversed(parts) if part in RELEASE_FOLDERS), None)


def default_head_layer(path):
    """The projection-head layer the stored classifier reads, from the release folder in `path`
    (as given: convert() gives the absolute path, hubconf.py the path inside the bucket): 1 for
    finetuned_1pct/10pct, else 0 (RELEASE_FOLDERS). A path that names no release folder is read by
    its folder names: 1 if one contains "finetuned" but not "finetuned_100pct" (a renamed copy such
    as finetuned_10pct_r50), else 0. See docs/official-checkpoints.md."""
    folder = release_folder(path)
    if folder is not None:
        return RELEASE_FOLDERS[folder] or 0
    parts = os.path.normpath(path).split(os.sep)
    return int(any("finetuned" in part and "finetuned_100pct" not in part for part in parts))


def distilled(path):
    """Whether `path` (as given) lies in one of the released distill_1pct / distill_10pct folders
    (the release folder nearest the file)."""
    return (release_folder(path) or "").startswith("distill_")


def release_head_layer(path, ckpt):
    """The head layer the stored classifier of the release checkpoint at `path` reads -> (layer, why):
    a distilled student's from its own values (distilled_head_layer), else the release folder's rule
    (default_head_layer; why None)."""
    if distilled(path):
        return distilled_head_layer(ckpt)
    return default_head_layer(path), None


def distilled_head_layer(ckpt):
    """The projection-head layer the classifier of a released distilled student reads -> (layer, why).

    The official code has no distillation (a colab only) and records no ft_proj_selector, so the
    checkpoint's own values decide: a student whose classifier read h never trained its projection
    head (the official model builds the whole head anyway, for checkpoint compatibility), so the
    first head layer's BN is still at its initial gamma = 1, beta = 0; a trained first layer was
    in the student's path, as in the fine-tuned networks it learns from (layer 1)."""
    gamma, beta = "head_contrastive/nl_0/batch_normalization/gamma", "head_contrastive/nl_0/batch_normalization/beta"
    if gamma not in ckpt.shapes:
        return 0, "no projection head"
    untrained = np.all(ckpt.read(gamma) == 1) and (beta not in ckpt.shapes or np.all(ckpt.read(beta) == 0))
    return (0, "its projection head was never trained (BN at gamma 1, beta 0)") if untrained else \
        (1, "its first projection-head layer was trained")


def convert(prefix, out, head_layer=None, ema=False, extra_meta=None):
    """Convert checkpoint `prefix` to encoder.pt `out`; returns a one-line summary.
    ema=True takes the trained variables from their ExponentialMovingAverage copies;
    extra_meta: entries added to (or replacing) the recorded meta, e.g. the source URL."""
    ckpt = TFCheckpoint(prefix)
    why = None
    if head_layer is None:
        head_layer, why = release_head_layer(os.path.abspath(prefix), ckpt)
    config, head_config, classes, mapping = plan(ckpt.shapes, head_layer)
    if ema:
        mapping = with_averages(mapping, ckpt.shapes)
    encoder = build_encoder(**config)
    head = ProjectionHead(**head_config) if head_config else None
    states = {"encoder": encoder.state_dict(), "head": head.state_dict() if head else None}
    classifier = {"head_layer": head_layer} if classes else None
    for tf_name, target, key, transpose in mapping:
        value = _to_torch(ckpt.read(tf_name), transpose)
        if target == "classifier":
            classifier[key] = value
        else:
            states[target][key].copy_(value)  # state_dict tensors share storage with the module
    step = int(ckpt.read("global_step")) if "global_step" in ckpt.shapes else None
    meta = {"source": "google-research/simclr TF1 checkpoint", "tf_checkpoint": os.path.abspath(prefix),
            "tf_global_step": step, "ema": bool(ema)}
    if not config["cifar_stem"]:
        meta.update(dataset="imagefolder", image_size=224)
    meta.update(extra_meta or {})
    output.check_file(str(out), "OUT")  # the folder made, a probe written there
    with output.writing(str(out), "OUT", needed=tensor_bytes(encoder.state_dict()) + tensor_bytes(classifier or {})
                        + (tensor_bytes(head.state_dict()) if head else 0)):
        save_encoder(out, encoder, head=head, classifier=classifier, **meta)
    read = {m[0] for m in mapping}
    skipped_names = [n for n in ckpt.shapes if skipped(n) and n not in read]
    other = [n for n in ckpt.shapes
             if not skipped(n) and n not in read and not (ema and f"{n}/ExponentialMovingAverage" in read)]
    return (f"{config['arch']} {config['width']}x ({encoder.feature_dim}-d features, config {config}); "
            + (f"projection head {head_config['num_layers']} layers; " if head else "no projection head; ")
            + (f"classifier {classes} classes on head layer {head_layer}{f' ({why})' if why else ''}; "
               if classes else "no classifier; ")
            + f"{len(mapping)} tensors converted{' (EMA copies of the trained ones)' if ema else ''}, "
            + f"{len(skipped_names)} optimizer/EMA/step entries skipped"
            + (f", {len(other)} others ignored ({', '.join(other[:3])})" if other else "") + f"; wrote {out}")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="TF checkpoint prefix, e.g. r50_1x/model.ckpt-225206 (or its .index file, "
                                      "or the folder holding one)")
    p.add_argument("out", help="encoder.pt to write")
    p.add_argument("--head-layer", type=int, default=None,
                   help="projection-head layer the stored classifier reads (official ft_proj_selector): 0 = h "
                        "(v1, v2 pretrained, supervised, finetuned_100pct), 1 = v2 finetuned_1pct/10pct (SimCLRv2 "
                        "paper); default: from the release folder nearest the file (1 for finetuned_1pct/10pct, else 0; a "
                        "path naming none: 1 if a folder contains 'finetuned' but not 'finetuned_100pct'); "
                        "distill_* students: 1 if their first head layer was trained, else 0")
    p.add_argument("--ema", action="store_true",
                   help="take every trained variable from its ExponentialMovingAverage copy (checkpoints of runs "
                        "that kept one); BN moving statistics as stored")
    args = p.parse_args(argv)
    flags.check(p.error, args, {"head_layer": "[0, inf)"})
    return args


def resolve_prefix(path):
    """Accept the prefix, its .index / .data-* file, or a folder with one checkpoint (in it, or in
    its only subfolder that holds one: the distill_* releases nest TEACHER/STUDENT folders)."""
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "*.index")))
        if not found:
            below = sorted(glob.glob(os.path.join(path, "*", "*.index")))
            folders = sorted({os.path.dirname(p) for p in below})
            if len(folders) > 1:
                raise ConvertError(f"{path} holds no checkpoint index, but its folders {', '.join(map(os.path.basename, folders))} "
                                   "do; give one of them")
            found = below
        if len(found) != 1:
            raise ConvertError(f"{path} holds {len(found)} checkpoint indexes; give the prefix (model.ckpt-NNNN)")
        path = found[0]
    for suffix in (".index", ".meta"):
        if path.endswith(suffix):
            return path[:-len(suffix)]
    return path.split(".data-")[0] if ".data-" in path else path


def main(argv=None):
    args = get_args(argv)
    try:
        output.check_file(args.out, "OUT", create_folder=False)  # before the long read: nothing made yet
        print(convert(resolve_prefix(args.checkpoint), args.out, args.head_layer, args.ema), flush=True)
    except (ConvertError, output.WriteError, OSError) as e:
        sys.exit(f"convert_official.py: error: {e}")


if __name__ == "__main__":
    main()
