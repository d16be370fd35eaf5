"""convert_official.py against TensorFlow: a checkpoint TensorFlow wrote from the official
SimCLR code (narrow ResNet-50 with the v2 heads) and TensorFlow's own outputs on it, plus
the variable lists of the released layouts at full size. No TensorFlow needed here:
tests/fixtures/make_official_fixture.py made the files."""
import functools
import glob
import gzip
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import ROOT, run_script
from convert_official import (ConvertError, TFCheckpoint, convert, default_head_layer, distilled, distilled_head_layer,
                              plan, resolve_prefix)
from model import build_encoder, load_encoder, load_head

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "official_r50_w0125", "model.ckpt-0")
LAYOUTS = os.path.join(ROOT, "tests", "fixtures", "official_layouts.json.gz")


@pytest.fixture(scope="module")
def tf_outputs():
    return dict(np.load(FIXTURE + ".outputs.npz"))


@functools.lru_cache(maxsize=1)
def manifests():
    with gzip.open(LAYOUTS, "rt") as f:
        return {name: {n: tuple(s) for n, s in variables} for name, variables in json.load(f).items()}


def torch_outputs(path, images_nhwc, encoder_config=None):
    """h, z, head layer 1 and the stored classifier's logits of a converted checkpoint, eval mode."""
    encoder, ckpt = load_encoder(path)
    if encoder_config is not None:  # same weights, another architecture variant
        state = encoder.state_dict()
        encoder = build_encoder(**encoder_config)
        encoder.load_state_dict(state)
    head = load_head(path, ckpt).eval()
    x = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)  # TF NHWC -> NCHW
    c = ckpt["classifier"]
    with torch.no_grad():
        h = encoder.eval()(x)
        out = {"h": h, "z": head(h), "head1": head.first_layers(1)(h)}
        out["logits"] = head.first_layers(c["head_layer"])(h) @ c["weight"].T + c["bias"]
    return {k: v.numpy() for k, v in out.items()}


def max_diff(a, b):
    return float(np.abs(a - b).max())


def test_index_reader_lists_what_tensorflow_saved(tf_outputs):
    ckpt = TFCheckpoint(FIXTURE)
    saved = {n: tuple(s) for n, s in json.loads(str(tf_outputs["variables"])).items()}  # from tf.global_variables()
    assert ckpt.shapes == saved and len(saved) == 288
    assert ckpt.read("global_step").dtype == np.int64 and int(ckpt.read("global_step")) == 0
    kernel = ckpt.read("base_model/conv2d/kernel")
    assert kernel.shape == (7, 7, 3, 8) and kernel.dtype == np.float32 and np.abs(kernel).max() > 0


@pytest.mark.parametrize("head_layer", [0, 1])
def test_converted_network_computes_what_tensorflow_computes(tmp_path, tf_outputs, head_layer):
    result = run_script(["convert_official.py", FIXTURE, "out.pt", "--head-layer", str(head_layer)], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "7 optimizer/EMA/step entries skipped" in result.stdout  # Momentum, EMA copies, global_step
    ours = torch_outputs(tmp_path / "out.pt", tf_outputs["images_nhwc"])
    ref = dict(tf_outputs, logits=tf_outputs[f"logits_from_{head_layer}"])
    for k in ("h", "z", "head1", "logits"):  # float32 rounding: TF and PyTorch sum in different orders
        assert max_diff(ours[k], ref[k]) < 1e-5 * max(1.0, np.abs(ref[k]).max()), (k, max_diff(ours[k], ref[k]))
    _, ckpt = load_encoder(tmp_path / "out.pt")
    assert ckpt["encoder_config"] == {"arch": "resnet50", "width": 0.125, "cifar_stem": False, "tf_same_pool": True}
    assert ckpt["head_config"] == {"in_dim": 256, "hidden_dim": 256, "out_dim": 128, "num_layers": 3}
    assert ckpt["classifier"]["weight"].shape == (10, 256) and ckpt["classifier"]["head_layer"] == head_layer
    assert ckpt["meta"]["dataset"] == "imagefolder" and ckpt["meta"]["image_size"] == 224


SK1 = os.path.join(ROOT, "tests", "fixtures", "official_r50_sk1_w00625", "model.ckpt-0")
R18 = os.path.join(ROOT, "tests", "fixtures", "official_r18_w025_cifar", "model.ckpt-0")


def assert_equal_to_tf(ours, ref, head_layer, suffix=""):
    ref = dict(ref, logits=ref[f"logits_from_{head_layer}{suffix}"])
    for k in ("h", "z", "head1", "logits"):  # float32 rounding: TF and PyTorch sum in different orders
        want = ref[k + suffix] if k != "logits" else ref["logits"]
        assert max_diff(ours[k], want) < 1e-5 * max(1.0, np.abs(want).max()), (k, max_diff(ours[k], want))


@pytest.mark.parametrize("ema", [False, True])
def test_selective_kernel_network_computes_what_tensorflow_computes(tmp_path, ema):
    """ResNet-50 SK at width 1/16 on 74 px images: odd sizes (37, 19, 5) reach the 'SAME' max-pool
    and both ResNet-D pools; with --ema every trained variable comes from its EMA copy."""
    ref = dict(np.load(SK1 + ".outputs.npz"))
    for head_layer in (0, 1):
        if head_layer == 0:  # the command line once, then in this process (faster)
            result = run_script(["convert_official.py", SK1, "out.pt", "--head-layer", "0"] + ["--ema"] * ema, tmp_path)
            assert result.returncode == 0, result.stderr[-2000:]
        else:
            convert(SK1, tmp_path / "out.pt", head_layer=head_layer, ema=ema)
        ours = torch_outputs(tmp_path / "out.pt", ref["images_nhwc"])
        assert_equal_to_tf(ours, ref, head_layer, "_ema" if ema else "")
        if ema:  # the averages differ from the weights: the other outputs are far off
            assert max_diff(ours["h"], ref["h"]) > 1e-2
    _, ckpt = load_encoder(tmp_path / "out.pt")
    assert ckpt["encoder_config"] == {"arch": "resnet50", "width": 0.0625, "cifar_stem": False, "tf_same_pool": True,
                                      "sk_ratio": 0.0625}
    assert ckpt["head_config"]["in_dim"] == 128 and ckpt["meta"]["ema"] is ema


def test_zero_counting_resnet_d_pool_is_what_breaks_equality(tmp_path, monkeypatch):
    import model
    convert(SK1, tmp_path / "out.pt")
    ref = dict(np.load(SK1 + ".outputs.npz"))
    forward = model.ResNetDPool.forward
    monkeypatch.setattr(model.ResNetDPool, "forward", lambda self, x: forward(self, x) if self.stride == 2 else
                        torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (0, 1, 0, 1)), 2, stride=1))
    assert max_diff(torch_outputs(tmp_path / "out.pt", ref["images_nhwc"])["h"], ref["h"]) > 1e-3


def test_official_resnet18_computes_what_tensorflow_computes(tmp_path):
    """The official ResNet-18 (projection shortcut in the first group too), CIFAR stem, 2-layer head."""
    ref = dict(np.load(R18 + ".outputs.npz"))
    for head_layer in (0, 1):
        convert(R18, tmp_path / "out.pt", head_layer=head_layer)
        assert_equal_to_tf(torch_outputs(tmp_path / "out.pt", ref["images_nhwc"]), ref, head_layer)
    _, ckpt = load_encoder(tmp_path / "out.pt")
    assert ckpt["encoder_config"] == {"arch": "resnet18", "width": 0.25, "cifar_stem": True,
                                      "first_group_projection": True}
    assert ckpt["head_config"]["num_layers"] == 2 and "image_size" not in ckpt["meta"]


def test_ema_without_averages_of_every_weight_is_one_clear_line(tmp_path):
    result = run_script(["convert_official.py", FIXTURE, "out.pt", "--ema"], tmp_path)  # EMA of 3 variables only
    errors = [line for line in result.stderr.splitlines() if "convert_official.py: error:" in line]
    assert result.returncode != 0 and "Traceback" not in result.stderr and len(errors) == 1, result.stderr
    assert "have no ExponentialMovingAverage copy" in errors[0] and not (tmp_path / "out.pt").exists()


def test_torchvision_max_pool_padding_is_what_breaks_equality(tmp_path, tf_outputs):
    convert(FIXTURE, tmp_path / "out.pt")
    plain = {"arch": "resnet50", "width": 0.125, "cifar_stem": False}  # padding=1 on both sides
    ours = torch_outputs(tmp_path / "out.pt", tf_outputs["images_nhwc"], plain)
    assert max_diff(ours["h"], tf_outputs["h"]) > 1e-2


def test_layers_follow_the_official_creation_order_not_sorted_names():
    shapes = manifests()["v2_r50_1x_sk0"]
    _, _, _, mapping = plan(shapes)
    where = {tf_name: (target, key) for tf_name, target, key, _ in mapping}
    assert where["base_model/conv2d/kernel"] == ("encoder", "conv1.weight")
    assert where["base_model/conv2d_1/kernel"] == ("encoder", "layer1.0.downsample.0.weight")  # shortcut first
    assert where["base_model/conv2d_2/kernel"] == ("encoder", "layer1.0.conv1.weight")
    assert where["base_model/conv2d_10/kernel"] == ("encoder", "layer1.2.conv3.weight")  # sorts before conv2d_2
    assert where["base_model/batch_normalization_2/gamma"] == ("encoder", "layer1.0.bn1.weight")
    assert where["base_model/conv2d_52/kernel"] == ("encoder", "layer4.2.conv3.weight")
    assert where["head_contrastive/nl_2/batch_normalization/gamma"] == ("head", "net.7.weight")
    assert where["head_supervised/linear_layer/dense/bias"] == ("classifier", "bias")


RELEASED_V2_SK1 = [f"v2_r{d}_{w}x_sk1" for d in (50, 101, 152) for w in (1, 2)] + ["v2_r152_3x_sk1"]


@pytest.mark.parametrize("name", ["v1_r50_1x", "v1_r50_2x", "v1_r50_4x"] + [
    f"v2_r{d}_{w}x_sk0" for d in (50, 101, 152) for w in (1, 2, 3)] + RELEASED_V2_SK1)
def test_every_released_layout_maps_completely_at_full_size(name):
    shapes = manifests()[name]
    config, head_config, classes, mapping = plan(shapes)
    depth, width = name.split("_")[1][1:], int(name.split("_")[2][0])
    expected_config = {"arch": f"resnet{depth}", "width": width, "cifar_stem": False, "tf_same_pool": True}
    if name.endswith("sk1"):
        expected_config["sk_ratio"] = 0.0625
    assert config == expected_config
    assert classes == 1000 and len(mapping) == len(shapes)  # every variable used, each once
    assert len({(t, k) for _, t, k, _ in mapping}) == len(mapping)
    if name.startswith("v1"):
        assert head_config is None  # the v1 zips carry no projection head
    else:
        assert head_config == {"in_dim": 2048 * width, "hidden_dim": 2048 * width, "out_dim": 128, "num_layers": 3}
    with torch.device("meta"):
        encoder = build_encoder(**config)
    expected = {k for k in encoder.state_dict() if not k.endswith("num_batches_tracked")}
    assert {k for _, t, k, _ in mapping if t == "encoder"} == expected
    # the official network's trained variables hold as many numbers as our parameters (the counts
    # tests/test_model.py checks against the official README)
    trained = [s for n, s in shapes.items() if n.startswith("base_model/") and not n.endswith("moving_variance")
               and not n.endswith("moving_mean")]
    assert sum(math.prod(s) for s in trained) == sum(p.numel() for p in encoder.parameters())


def test_selective_kernel_layers_follow_the_official_creation_order():
    shapes = manifests()["v2_r50_2x_sk1"]
    _, _, _, mapping = plan(shapes)
    where = {tf_name: key for tf_name, _, key, _ in mapping}
    stem = [where[f"base_model/{c}/kernel"] for c in ("conv2d", "conv2d_1", "conv2d_2")]
    assert stem == ["conv1.0.weight", "conv1.3.weight", "conv1.6.weight"] and shapes["base_model/conv2d/kernel"][3] == 64
    assert where["base_model/batch_normalization_2/gamma"] == "bn1.weight"  # the stem's third BN
    first_block = [where[f"base_model/conv2d_{i}/kernel"] for i in range(3, 9)]
    assert first_block == ["layer1.0.downsample.1.weight", "layer1.0.conv1.weight", "layer1.0.conv2.conv.weight",
                           "layer1.0.conv2.fc1.weight", "layer1.0.conv2.fc2.weight", "layer1.0.conv3.weight"]
    assert where["base_model/batch_normalization_6/moving_mean"] == "layer1.0.conv2.fc_bn.running_mean"
    assert where["base_model/conv2d_9/kernel"] == "layer1.1.conv1.weight"  # no shortcut in the second block
    # layer4 at 2x: f = 1024, attention width int(1024 * 0.0625) = 64 (above the minimum of 32)
    assert shapes["base_model/conv2d_84/kernel"] == (1, 1, 1024, 64) and where["base_model/conv2d_84/kernel"] == \
        "layer4.2.conv2.fc1.weight"


@pytest.mark.parametrize("name,arch,cifar", [("official_r18_1x", "resnet18", False), ("official_r34_1x", "resnet34", False),
                                             ("official_r18_1x_cifar", "resnet18", True)])
def test_official_resnet18_and_34_layouts_map_completely(name, arch, cifar):
    shapes = manifests()[name]
    config, head_config, classes, mapping = plan(shapes)
    assert config == {"arch": arch, "width": 1, "cifar_stem": cifar, "first_group_projection": True,
                      **({} if cifar else {"tf_same_pool": True})}
    assert len(mapping) == len(shapes) and head_config["in_dim"] == 512
    where = {tf_name: key for tf_name, _, key, _ in mapping}
    assert where["base_model/conv2d_1/kernel"] == "layer1.0.downsample.0.weight"  # 64 -> 64, stride 1
    assert shapes["base_model/conv2d_1/kernel"] == (1, 1, 64, 64)


@pytest.mark.parametrize("path,layer", [
    ("simclrv2/finetuned_1pct/r50_1x_sk1/model.ckpt-1", 1), ("simclrv2/finetuned_10pct/r152_3x_sk1/model.ckpt-1", 1),
    ("simclrv2/finetuned_100pct/r50_1x_sk1/model.ckpt-1", 0), ("simclrv2/pretrained/r50_1x_sk1/model.ckpt-1", 0),
    ("simclrv2/supervised/r50_1x_sk1/model.ckpt-1", 0), ("ResNet50_1x/model.ckpt-225206", 0),
    # the release folder nearest the file decides, whatever the user's own folders are called
    ("/data/my_finetuned_runs/simclrv2/pretrained/r50_1x_sk1/model.ckpt-1", 0),
    ("/data/finetuned_10pct/simclrv2/finetuned_100pct/r50_1x_sk1/model.ckpt-1", 0),
    ("/data/pretrained/simclrv2/finetuned_1pct/r50_1x_sk1/model.ckpt-1", 1),
    # no release folder named: a renamed copy of a fine-tuned one still reads layer 1
    ("/data/finetuned_10pct_r50/model.ckpt-1", 1), ("/data/r50_1x_sk1/model.ckpt-1", 0)])
def test_default_head_layer_follows_the_release_folder(path, layer):
    assert default_head_layer(path) == layer  # SimCLRv2 paper: layer 1 for 1% and 10%, h for 100%


@pytest.mark.parametrize("path,student", [
    ("simclrv2/distill_1pct/r152_3x_sk1/r50_1x_sk0/model.ckpt-1", True),
    ("/data/distill_runs/simclrv2/pretrained/r50_1x_sk0/model.ckpt-1", False),
    ("/data/distill_10pct/simclrv2/finetuned_10pct/r50_1x_sk0/model.ckpt-1", False)])
def test_a_distilled_student_is_recognised_by_its_release_folder(path, student):
    assert distilled(path) == student


def test_squeeze_excitation_and_unknown_layouts_are_refused():
    layouts = manifests()
    with pytest.raises(ConvertError, match="squeeze-and-excitation"):
        plan(layouts["se_r50_1x"])
    shapes = dict(layouts["v2_r50_1x_sk0"])
    shapes["head_contrastive/nl_0/dense/bias"] = (2048,)
    with pytest.raises(ConvertError, match="unknown layout.*nl_0/dense/bias"):
        plan(shapes)
    shapes = dict(layouts["v2_r50_1x_sk0"])
    shapes["base_model/conv2d_7/kernel"] = (3, 3, 64, 65)
    with pytest.raises(ConvertError, match="conv2d_7/kernel has shape"):
        plan(shapes)
    shapes = dict(layouts["v2_r50_1x_sk1"])
    shapes["base_model/conv2d_6/kernel"] = (1, 1, 64, 48)  # attention of another sk_ratio
    with pytest.raises(ConvertError, match=r"conv2d_6/kernel has shape.*resnet50 1x SK"):
        plan(shapes)
    shapes = {n: s for n, s in layouts["v2_r50_1x_sk1"].items() if "conv2d_86" not in n}  # one conv fewer
    with pytest.raises(ConvertError, match="86 convolutions in base_model: not an official"):
        plan(shapes)
    with pytest.raises(ConvertError, match="head has 3 layers"):
        plan(layouts["v2_r50_1x_sk0"], head_layer=4)
    with pytest.raises(ConvertError, match="not a checkpoint of the official"):
        plan({"foo/kernel": (3, 3)})


@pytest.mark.parametrize("damage,text", [
    ("missing", "no TensorFlow checkpoint at"),
    ("garbage_index", "not a TensorFlow checkpoint index"),
    ("truncated_data", "is truncated"),
    ("missing_data", "missing data file"),
])
def test_bad_input_is_one_clear_line(tmp_path, damage, text):
    prefix = tmp_path / "model.ckpt-0"
    if damage != "missing":
        for suffix in (".index", ".data-00000-of-00001"):
            shutil.copy(FIXTURE + suffix, str(prefix) + suffix)
    data = str(prefix) + ".data-00000-of-00001"
    if damage == "garbage_index":
        (tmp_path / "model.ckpt-0.index").write_bytes(b"\0" * 100)
    elif damage == "truncated_data":
        with open(data, "r+b") as f:
            f.truncate(os.path.getsize(data) // 2)
    elif damage == "missing_data":
        os.remove(data)
    result = run_script(["convert_official.py", prefix, "out.pt"], tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "convert_official.py: error:" in line]
    assert len(errors) == 1 and text in errors[0], result.stderr
    assert not (tmp_path / "out.pt").exists()


SYNTHETIC = ["--dataset", "synthetic", "--image-size", "64", "--synthetic-size", "64", "--workers", "0",
             "--batch-size", "16"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The fixture converted twice: classifier on h, and on head layer 1 (as v2 fine-tuned)."""
    folder = tmp_path_factory.mktemp("converted")
    convert(FIXTURE, folder / "h.pt", head_layer=0)
    convert(FIXTURE, folder / "layer1.pt", head_layer=1)
    return folder


@pytest.mark.parametrize("name", ["h.pt", "layer1.pt"])
def test_linear_eval_scores_the_stored_classifier_without_training(converted, tmp_path, name):
    import data
    from augment import EvalTransform
    result = run_script(["linear_eval.py", converted / name, *SYNTHETIC, "--checkpoint-classifier",
                         "--out", "r.json"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1].startswith("top-1 accuracy: ")
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["protocol"] == "checkpoint_classifier" and res["test_images"] == 16 and res["amp"] == "off"
    # the same top-1, computed here from the stored weights
    test = data.build_dataset("synthetic", "data", "test", 64, 64)
    x = torch.stack([EvalTransform(64, train=False)(test[i][0]) for i in range(len(test))]).float() / 255
    y = torch.as_tensor(data.labels_of(test))
    encoder, ckpt = load_encoder(converted / name)
    c = ckpt["classifier"]
    with torch.no_grad():
        feats = load_head(converted / name, ckpt).eval().first_layers(c["head_layer"])(encoder.eval()(x))
        pred = (feats @ c["weight"].T + c["bias"]).argmax(1)
    assert res["top1"] == pytest.approx(100 * (pred == y).float().mean().item())
    assert res["head_layer"] == c["head_layer"]


def test_finetune_from_the_first_head_layer(converted, tmp_path):
    import finetune
    from model import Classifier
    args = finetune.get_args([str(converted / "h.pt"), "--from-head-layer", "1"])
    encoder, ckpt = load_encoder(converted / "h.pt")
    head = load_head(converted / "h.pt", ckpt)
    kept = finetune.kept_head(args, head)
    assert kept is head  # kept from the checkpoint, trained with the rest
    net = Classifier(encoder, torch.nn.Linear(256, 10), kept, 1)
    assert [type(m) for m in head.first_layers(1)] == [torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.ReLU]
    trained = {n for n, p in net.named_parameters() if p.requires_grad}
    assert {"head.net.0.weight", "head.net.1.weight", "head.net.1.bias"} <= trained
    assert not any(n.startswith(("head.net.3", "head.net.4", "head.net.6", "head.net.7")) for n in trained)  # layers 2, 3
    result = run_script(["finetune.py", converted / "h.pt", *SYNTHETIC, "--label-fraction", "0.5", "--epochs", "1",
                         "--from-head-layer", "1", "--out", "f.json"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    res = json.loads((tmp_path / "f.json").read_text())
    assert res["from_head_layer"] == 1 and 0 <= res["top1"] <= 100


@pytest.mark.parametrize("script,args,text", [
    ("linear_eval.py", ["PLAIN", *SYNTHETIC, "--checkpoint-classifier"], "stores no classifier"),
    ("finetune.py", ["PLAIN", *SYNTHETIC, "--from-head-layer", "1"], "carries no projection head"),
    ("finetune.py", ["CONVERTED", *SYNTHETIC, "--from-head-layer", "4"], "has 3 layers"),
])
def test_missing_classifier_or_head_is_one_clear_line(converted, tmp_path, script, args, text):
    from model import save_encoder
    save_encoder(tmp_path / "plain.pt", build_encoder("resnet18", width=0.25), dataset="synthetic")
    paths = {"PLAIN": tmp_path / "plain.pt", "CONVERTED": converted / "h.pt"}
    result = run_script([script, *[paths.get(a, a) for a in args]], tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if f"{script}: error:" in line]
    assert len(errors) == 1 and text in errors[0], result.stderr


# ----------------------------------------------------------------------------
# The released distilled students: distill_1pct/TEACHER/STUDENT/model.ckpt-N, the official layout

def distill_release(root, students=("r50_1x_sk0", "r152_3x_sk1")):
    """The fixture checkpoint laid out as the distill_1pct release nests it: distill_1pct/r152_3x_sk1/STUDENT/."""
    for student in students:
        folder = root / "distill_1pct" / "r152_3x_sk1" / student
        folder.mkdir(parents=True)
        for path in glob.glob(FIXTURE + ".*"):
            if not path.endswith(".npz"):
                os.symlink(path, folder / os.path.basename(path))
    return root / "distill_1pct" / "r152_3x_sk1"


def test_distilled_student_folders_and_the_head_layer_they_show(tmp_path, tf_outputs):
    teacher_folder = distill_release(tmp_path)
    with pytest.raises(ConvertError, match="its folders r152_3x_sk1, r50_1x_sk0 do; give one of them"):
        resolve_prefix(str(teacher_folder))
    prefix = resolve_prefix(str(teacher_folder / "r152_3x_sk1"))  # the self-distilled one, by its folder
    assert prefix == str(teacher_folder / "r152_3x_sk1" / "model.ckpt-0")
    summary = convert(prefix, tmp_path / "student.pt")  # the fixture's head has trained (random) values
    assert "classifier 10 classes on head layer 1 (its first projection-head layer was trained)" in summary
    ours = torch_outputs(tmp_path / "student.pt", tf_outputs["images_nhwc"])
    ref = tf_outputs["logits_from_1"]
    assert max_diff(ours["logits"], ref) < 1e-5 * max(1.0, np.abs(ref).max())


def test_a_student_whose_head_never_trained_reads_h(tmp_path, tf_outputs, monkeypatch):
    """The official model builds the whole projection head even when the classifier reads h; a student
    trained that way keeps the head's BN at its initial gamma 1, beta 0."""
    prefix = str(distill_release(tmp_path, ("r50_1x_sk0",)) / "r50_1x_sk0" / "model.ckpt-0")
    read = TFCheckpoint.read

    def untrained(self, name):
        value = read(self, name)
        if name.startswith("head_contrastive/") and name.endswith(("/gamma", "/beta")):
            return np.full_like(value, 1.0 if name.endswith("gamma") else 0.0)
        return value
    monkeypatch.setattr(TFCheckpoint, "read", untrained)
    summary = convert(prefix, tmp_path / "student.pt")
    assert "on head layer 0 (its projection head was never trained (BN at gamma 1, beta 0))" in summary
    ours = torch_outputs(tmp_path / "student.pt", tf_outputs["images_nhwc"])
    ref = tf_outputs["logits_from_0"]  # reads h: the head's values do not enter
    assert max_diff(ours["logits"], ref) < 1e-5 * max(1.0, np.abs(ref).max())
    assert convert(prefix, tmp_path / "forced.pt", head_layer=1).count("head layer 1;") == 1  # --head-layer decides


def test_a_student_without_projection_head_reads_h():
    shapes = {n: s for n, s in manifests()["v2_r50_1x_sk0"].items() if not n.startswith("head_contrastive/")}

    class Shapes:
        def __init__(self):
            self.shapes = shapes
    assert distilled_head_layer(Shapes()) == (0, "no projection head")
    config, head_config, classes, _ = plan(shapes, head_layer=0)
    assert head_config is None and classes == 1000
