"""export.py: the encoder for torchvision (its features exactly), for detectron2 (every backbone name of
detectron2's own build_resnet_backbone, with its shape), and the features of a folder of images."""
import json
import os
import pickle

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import augment
import data
import export
from augment import EvalTransform
from model import CheckpointError, build_encoder, save_encoder

REFERENCE = os.path.join(os.path.dirname(__file__), "reference", "detectron2_resnet_names.json")


def trained_looking(encoder, seed=0):
    """Random BN statistics, scales and shifts, so that no tensor is its initial constant and a
    mix-up of two BN tensors in an export would change the features."""
    g = torch.Generator().manual_seed(seed)
    for m in encoder.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            for t in (m.weight.data, m.bias.data, m.running_mean):
                t.copy_(torch.rand(t.shape, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return encoder.eval()


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_model_gives_the_encoders_features_exactly(arch):
    encoder = trained_looking(build_encoder(arch))
    net = getattr(torchvision.models, arch)()
    net.fc = torch.nn.Identity()
    net.load_state_dict(export.torchvision_state(encoder))  # strict
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(net.eval()(x), encoder(x))


def test_torchvision_export_end_to_end_and_refusals(run, tmp_path, capsys):
    encoder = trained_looking(build_encoder("resnet18"))
    save_encoder(tmp_path / "enc.pt", encoder)
    result = run("export.py", "enc.pt", "--to", "torchvision", "tv.pth")
    assert "warning" not in result.stderr and "net.fc = torch.nn.Identity()" in result.stdout
    net = torchvision.models.resnet18()
    missing, unexpected = net.load_state_dict(torch.load(tmp_path / "tv.pth", weights_only=True), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected

    for name, enc, text in (("wide", build_encoder("resnet18", width=2), "width 2"),
                            ("cifar", build_encoder("resnet18", cifar_stem=True), "CIFAR stem"),
                            ("sk", build_encoder("resnet50", width=0.25, sk_ratio=0.0625), "selective-kernel"),
                            ("official18", build_encoder("resnet18", first_group_projection=True), "official ResNet-18")):
        save_encoder(tmp_path / f"{name}.pt", enc)
        with pytest.raises(SystemExit) as e:  # in this process: fail()'s one line and exit status
            export.main([str(tmp_path / f"{name}.pt"), "--to", "torchvision", str(tmp_path / "x.pth")])
        lines = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(lines) == 1 and "error:" in lines[0] and text in lines[0], lines
    assert not (tmp_path / "x.pth").exists()


def test_tf_same_pool_is_exported_with_the_measured_shift(run, tmp_path):
    encoder = trained_looking(build_encoder("resnet18", tf_same_pool=True))
    save_encoder(tmp_path / "tf.pt", encoder)
    result = run("export.py", "tf.pt", "--to", "torchvision", "tv.pth")
    # the shift, computed here independently: torchvision's own model on the same 8 images
    net = torchvision.models.resnet18()
    net.fc = torch.nn.Identity()
    net.load_state_dict(torch.load(tmp_path / "tv.pth", weights_only=True))
    x = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False).clamp(0, 1)
    with torch.no_grad():
        diff = (encoder(x) - net.eval()(x)).abs().max().item()
    assert diff > 0
    warning = result.stderr.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("warning:") and f"= {diff:.4g} (of max |h|" in warning[0]


def reference():
    with open(REFERENCE) as f:
        return json.load(f)


@pytest.mark.parametrize("layout,arch,width", [("resnet18", "resnet18", 1), ("resnet50", "resnet50", 1),
                                               ("resnet50_2x", "resnet50", 2), ("resnet152", "resnet152", 1)])
def test_detectron2_names_and_shapes_are_those_of_its_backbone(layout, arch, width):
    expected = reference()["layouts"][layout]
    encoder = trained_looking(build_encoder(arch, width=width))
    checkpoint = export.detectron2_checkpoint(encoder)
    assert checkpoint["matching_heuristics"] is True and isinstance(checkpoint["__author__"], str)
    got = {k: list(v.shape) for k, v in checkpoint["model"].items()}
    assert got == expected  # every name of detectron2's backbone, nothing more, each with its shape
    state = encoder.state_dict()
    for ours, theirs in (("layer1.0.bn1.running_var", "res2.0.conv1.norm.running_var"),
                         ("layer2.0.downsample.1.bias", "res3.0.shortcut.norm.bias"),
                         ("bn1.weight", "stem.conv1.norm.weight")):
        assert np.array_equal(checkpoint["model"][theirs], state[ours].numpy())


def test_detectron2_export_writes_the_pickle_and_its_config(run, tmp_path):
    save_encoder(tmp_path / "enc.pt", trained_looking(build_encoder("resnet50", width=0.5)))
    result = run("export.py", "enc.pt", "--to", "detectron2", "d2.pkl")
    with open(tmp_path / "d2.pkl", "rb") as f:
        checkpoint = pickle.load(f)
    assert set(checkpoint) == {"model", "__author__", "matching_heuristics"}
    assert all(v.dtype == np.float32 for v in checkpoint["model"].values())
    for line in ("MODEL.RESNETS.STRIDE_IN_1X1 False", "MODEL.RESNETS.RES2_OUT_CHANNELS 128",
                 "MODEL.RESNETS.STEM_OUT_CHANNELS 32", "MODEL.RESNETS.WIDTH_PER_GROUP 32", "INPUT.FORMAT RGB"):
        assert line in result.stdout


def test_features_of_a_folder_with_their_paths(run, tmp_path):
    rng = np.random.default_rng(0)
    names = ["b/2.png", "a/x/1.JPG", "c.png"]
    for name in names:
        (tmp_path / "imgs" / os.path.dirname(name)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "imgs" / name, "PNG")
    (tmp_path / "imgs" / "notes.txt").write_text("x")
    encoder = trained_looking(build_encoder("resnet18", width=0.25, cifar_stem=True))
    save_encoder(tmp_path / "enc.pt", encoder, image_size=32)
    run("export.py", "enc.pt", "--to", "features", "--data-dir", "imgs", "f.npz", "--workers", "0")
    saved = np.load(tmp_path / "f.npz")
    assert list(saved["paths"]) == [os.path.join("imgs", n) for n in sorted(names)]
    transform = EvalTransform(32, train=False)  # the pretraining size the checkpoint records
    with torch.no_grad():
        x = torch.stack([transform(Image.open(tmp_path / p).convert("RGB")) for p in saved["paths"]])  # uint8
        expected = encoder(x.float() / 255)
    assert saved["features"].shape == (3, 128) and saved["features"].dtype == np.float32
    np.testing.assert_allclose(saved["features"], expected.numpy(), rtol=1e-5, atol=1e-6)
    # under torchrun each process embeds its share (3 images: one of 2 and one of 1 padded to 2) and
    # gets every row; rank 0 writes the file and prints, once
    result = run("export.py", "enc.pt", "--to", "features", "--data-dir", "imgs", "f2.npz", "--workers", "0",
                 torchrun=2)
    assert result.stdout.count("wrote f2.npz") == 1 and result.stdout.count("3 images under imgs") == 1, result.stdout
    shared = np.load(tmp_path / "f2.npz")
    assert list(shared["paths"]) == list(saved["paths"])
    np.testing.assert_allclose(shared["features"], saved["features"], rtol=1e-5, atol=1e-6)


def test_input_normalisation_travels_as_detectron2s_pixel_mean_and_std():
    """detectron2 feeds the backbone (x_255 - PIXEL_MEAN) / PIXEL_STD: with the printed values that is
    exactly the encoder's own input, [0, 1] RGB or its ImageNet-normalised form."""
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for input_norm in ("none", "imagenet"):
        encoder = build_encoder("resnet50", width=0.25, input_norm=input_norm)
        lines = dict(line.split(" ", 1) for line in export.detectron2_config(encoder, "w.pkl"))
        mean, std = (torch.tensor(json.loads(lines[k].split("#")[0])).view(1, 3, 1, 1)
                     for k in ("MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD"))
        own = (x - encoder.input_mean) / encoder.input_std if encoder.normalise_input else x
        torch.testing.assert_close((255 * x - mean) / std, own, rtol=1e-5, atol=1e-5)


def run_export(*argv):
    """export.py as the command line runs it (run(): one line for bad input), in this process -> exit status."""
    with pytest.raises(SystemExit) as e:
        export.run(lambda: export.main([str(a) for a in argv]), (data.DataError, CheckpointError), data.error_text)
    return e.value.code


def image_folder(root, n, seed=0, size=(40, 48)):
    """n PNG images under root (three families of colour, so some are alike), sorted names -> their paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        base = np.array([[255, 40, 40], [40, 200, 60], [50, 60, 230]][i % 3], np.float64)
        pixels = np.clip(base + rng.normal(0, 40, (*size, 3)), 0, 255).astype(np.uint8)
        path = root / f"sub{i % 2}" / f"img{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def own_features(encoder, paths, size=32):
    """h of image files through the evaluation transform, computed here."""
    transform = EvalTransform(size, train=False)
    with torch.no_grad():
        return encoder(torch.stack([transform(Image.open(p).convert("RGB")) for p in paths]).float() / 255)


def test_features_skip_unreadable_images_and_list_them(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = image_folder(tmp_path / "imgs", 4)
    (tmp_path / "imgs" / "sub0" / "broken.jpg").write_bytes(b"")
    cut = tmp_path / "imgs" / "sub1" / "cut.jpg"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(cut, quality=90)
    cut.write_bytes(cut.read_bytes()[:200])
    encoder = trained_looking(build_encoder("resnet18", width=0.25, cifar_stem=True))
    save_encoder(tmp_path / "enc.pt", encoder, image_size=32)
    assert run_export(*["enc.pt", "--to", "features", "--data-dir", "imgs", "f.npz", "--workers", "0"]) == 0
    out, err = capsys.readouterr()
    assert "skipped 2 unreadable images of 6" in out and "`unreadable`" in out
    assert "skipping unreadable image imgs/sub0/broken.jpg (" in err and "imgs/sub1/cut.jpg (" in err
    saved = np.load(tmp_path / "f.npz")
    expected_paths = sorted(os.path.relpath(p, tmp_path) for p in good)
    assert list(saved["paths"]) == expected_paths  # every row maps to its own image
    assert sorted(saved["unreadable"]) == ["imgs/sub0/broken.jpg", "imgs/sub1/cut.jpg"]
    assert int(saved["image_size"]) == 32 and json.loads(str(saved["encoder"])) == encoder.config
    np.testing.assert_allclose(saved["features"], own_features(encoder, saved["paths"]).numpy(), rtol=1e-5, atol=1e-6)

    status = run_export("enc.pt", "--to", "features", "--data-dir", "imgs", "g.npz", "--workers", "0", "--strict-data")
    lines = capsys.readouterr().err.strip().splitlines()  # --strict-data: as before, one line, nothing written
    assert status == 2 and "error: cannot read imgs/sub0/broken.jpg" in lines[-1], lines
    assert not (tmp_path / "g.npz").exists()


def tiles(picture, row, columns, tile, label):
    """The tiles of one row of the picture, (tile, tile, 3) each."""
    y = export.PAD + row * (tile + label + export.PAD)
    return [picture[y:y + tile, export.PAD + c * (tile + export.PAD):export.PAD + c * (tile + export.PAD) + tile]
            for c in range(columns)]


def test_neighbours_are_those_of_a_brute_force_search_and_the_picture_shows_them(tmp_path, capsys, monkeypatch):
    """On generated images: the queries --seed draws, their --k nearest by cosine similarity (the query itself
    left out) against the full similarity matrix computed here, the printed similarities, and the picture:
    its size, and each tile the centre crop of the image it should show. From a features file: the same
    picture; a query outside the folder is embedded with the checkpoint."""
    monkeypatch.chdir(tmp_path)
    paths = [os.path.relpath(p, tmp_path) for p in image_folder(tmp_path / "imgs", 13)]
    outside = image_folder(tmp_path / "elsewhere", 1, seed=5)[0]
    encoder = build_encoder("resnet18", width=0.25, cifar_stem=True).eval()  # (similarities 0.68-0.9999 here)
    save_encoder(tmp_path / "enc.pt", encoder, image_size=32)
    tile, k, queries = 24, 4, 3
    common = ["--workers", "0", "--tile", str(tile), "--k", str(k)]
    assert run_export(*["enc.pt", "--to", "neighbours", "--data-dir", "imgs", "n.png", "--queries", str(queries),
                 "--seed", "3"] + common) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("query ")]

    order = sorted(paths)
    h = torch.nn.functional.normalize(own_features(encoder, order), dim=1)
    sims = h @ h.T                                     # brute force: every pair
    assert sims.min() < 0.9  # images the encoder tells apart
    sims.fill_diagonal_(-float("inf"))
    drawn = np.random.default_rng(3).choice(len(order), size=queries, replace=False)
    picture = np.asarray(Image.open(tmp_path / "n.png").convert("RGB"))
    label = (picture.shape[0] - export.PAD) // queries - tile - export.PAD
    assert picture.shape[1] == export.PAD + (k + 1) * (tile + export.PAD) and 8 <= label <= 30
    assert picture.shape[0] == export.PAD + queries * (tile + label + export.PAD)
    for r, q in enumerate(drawn):
        best = sims[q].topk(k)
        listed = printed[r].split(": ", 1)[1].split(", ")
        assert printed[r].startswith(f"query {r + 1} {order[q]}: ")
        found = [order.index(item.rsplit(" ", 1)[0]) for item in listed]
        # the k best, best first (compared by similarity: two images as alike to 1e-5 may come in either order)
        assert sims[q, found].tolist() == pytest.approx(best.values.tolist(), abs=1e-5)
        assert [float(item.rsplit(" ", 1)[1]) for item in listed] == pytest.approx(best.values.tolist(), abs=6e-4)
        shown = tiles(picture, r, k + 1, tile, label)
        for c, j in enumerate([q] + found):
            expected = augment.center_crop_resize(Image.open(order[j]).convert("RGB"), tile, fraction=1.0)
            assert np.array_equal(shown[c], expected.permute(1, 2, 0).numpy())
        band = picture[export.PAD + r * (tile + label + export.PAD) + tile:][:label]
        assert (band < 128).any()  # the similarities are written under the tiles

    assert run_export(*["enc.pt", "--to", "features", "--data-dir", "imgs", "f.npz", "--workers", "0"]) == 0
    assert run_export(*["enc.pt", "--to", "neighbours", "--features", "f.npz", "m.png", "--queries", str(queries),
                 "--seed", "3"] + common) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "m.png").convert("RGB")), picture)

    capsys.readouterr()
    assert run_export(*["enc.pt", "--to", "neighbours", "--features", "f.npz", "o.png", "--query", str(outside),
                 "--query", order[5]] + common) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("query ")]
    q = torch.nn.functional.normalize(own_features(encoder, [outside]), dim=1)
    outside_sims = (q @ h.T)[0]
    found = [order.index(item.rsplit(" ", 1)[0]) for item in lines[0].split(": ", 1)[1].split(", ")]
    assert outside_sims[found].tolist() == pytest.approx(outside_sims.topk(k).values.tolist(), abs=1e-5)  # none left out
    assert order[5] not in lines[1].split(": ", 1)[1]  # in the set: not its own neighbour


def test_neighbours_refusals_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    image_folder(tmp_path / "imgs", 3)
    save_encoder(tmp_path / "enc.pt", build_encoder("resnet18", width=0.25, cifar_stem=True), image_size=32)
    save_encoder(tmp_path / "other.pt", build_encoder("resnet18", width=0.5, cifar_stem=True), image_size=32)
    assert run_export(*["other.pt", "--to", "features", "--data-dir", "imgs", "f.npz", "--workers", "0"]) == 0
    for argv, text in ((["n.png"], "needs the images"),
                       (["n.png", "--data-dir", "imgs", "--features", "f.npz"], "one of them"),
                       (["n.txt", "--data-dir", "imgs"], "image format"),
                       (["n.png", "--features", "f.npz"], "256-d features, this encoder gives 128-d"),
                       (["n.png", "--features", "missing.npz"], "cannot read features from missing.npz"),
                       (["n.png", "--data-dir", "imgs", "--query", "nowhere.png", "--workers", "0"],
                        "cannot read the query image nowhere.png")):
        status = run_export("enc.pt", "--to", "neighbours", *argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and text in lines[-1] and "Traceback" not in "".join(lines), (argv, lines)
    assert not (tmp_path / "n.png").exists()
