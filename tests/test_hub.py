"""hubconf.py: the torch.hub entries download the official files, convert them and cache the result.

A threaded http.server on 127.0.0.1 serves the TF-written fixtures (tests/fixtures/, narrow
ResNet-50s made with the official code, with TensorFlow's outputs stored) under released names,
laid out as the official buckets: simclrv2/BUCKET/MODEL/{checkpoint, model.ckpt-N.index,
model.ckpt-N.data-00000-of-00001} and checkpoints/ResNet50_1x.zip. SIMCLR_HUB_URL points the
entries at it; TORCH_HOME at a temporary cache. No internet."""
import functools
import gzip
import http.server
import importlib.util
import json
import os
import shutil
import sys
import threading
import types
import zipfile

import numpy as np
import pytest
import torch

import convert_official
import hubconf
from conftest import ROOT, free_port, run_script
from model import ProjectionHead, build_encoder, load_encoder, save_encoder

FIXTURES = os.path.join(ROOT, "tests", "fixtures")
R50 = os.path.join(FIXTURES, "official_r50_w0125", "model.ckpt-0")  # ResNet-50 at width 1/8, v2 heads
SK1 = os.path.join(FIXTURES, "official_r50_sk1_w00625", "model.ckpt-0")  # ResNet-50 SK at width 1/16
DATA = ".data-00000-of-00001"


def _state(name):
    return f'model_checkpoint_path: "{name}"\nall_model_checkpoint_paths: "{name}"\n'


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """The fixtures under released names, at their paths in the public buckets. The steps differ
    from the fixtures' file names (model.ckpt-0): the entries must read them from `checkpoint`."""
    root = tmp_path_factory.mktemp("mirror")
    for rel, source, step in [("simclrv2/pretrained/r50_1x_sk0", R50, 250228),
                              ("simclrv2/finetuned_10pct/r50_1x_sk1", SK1, 37535),
                              ("simclrv2/distill_1pct/r152_3x_sk1/r50_1x_sk0", R50, 100092)]:
        folder = root / rel
        folder.mkdir(parents=True)
        (folder / "checkpoint").write_text(_state(f"gs://simclr-checkpoints/{rel}/model.ckpt-{step}"))
        for suffix in (".index", DATA):
            shutil.copy(source + suffix, folder / f"model.ckpt-{step}{suffix}")
    (root / "checkpoints").mkdir()
    with zipfile.ZipFile(root / "checkpoints" / "ResNet50_1x.zip", "w") as zf:  # as the official v1 zips
        zf.writestr("ResNet50_1x/checkpoint", _state("model.ckpt-225206"))
        for suffix in (".index", DATA):
            zf.write(R50 + suffix, f"ResNet50_1x/model.ckpt-225206{suffix}")
        zf.writestr("ResNet50_1x/model.ckpt-225206.meta", b"graph")
        for suffix in (".index", DATA):  # the TF-Hub module beside it: other weights, never to be read
            zf.write(SK1 + suffix, f"ResNet50_1x/hub/variables/variables{suffix}")
        zf.writestr("ResNet50_1x/hub/tfhub_module.pb", b"module")
    return root


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.server.requests.append(("HEAD", self.path))
        super().do_HEAD()

    def do_GET(self):
        self.server.requests.append(("GET", self.path))
        if self.path not in self.server.truncated:
            return super().do_GET()
        body = open(self.translate_path(self.path), "rb").read()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))  # announces all of it, sends half, closes
        self.end_headers()
        self.wfile.write(body[:len(body) // 2])
        self.close_connection = True


@pytest.fixture
def server(mirror, monkeypatch):
    """The mirror over HTTP on 127.0.0.1; SIMCLR_HUB_URL points at it."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(mirror)))
    httpd.daemon_threads, httpd.requests, httpd.truncated = True, [], set()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    monkeypatch.setenv("SIMCLR_HUB_URL", httpd.url)
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """torch.hub's folder under a temporary TORCH_HOME -> the folder the entries cache in."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("SIMCLR_WEIGHTS_DIR", raising=False)
    assert torch.hub.get_dir() == str(tmp_path / "torch_home" / "hub")  # no torch.hub.set_dir in force
    return tmp_path / "torch_home" / "hub" / "checkpoints" / "simclr"


def files_under(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def load(entry, *args, **kwargs):
    return torch.hub.load(ROOT, entry, *args, source="local", progress=False, **kwargs)


def outputs(model, npz):
    ref = dict(np.load(npz + ".outputs.npz"))
    x = torch.from_numpy(ref["images_nhwc"]).permute(0, 3, 1, 2)  # TF NHWC -> NCHW, RGB in [0, 1]
    with torch.no_grad():
        h = model(x)
        ours = {"h": h, "logits": model.classifier(h)}
        if model.projection_head is not None:
            ours["z"] = model.projection_head(h)
    return {k: v.numpy() for k, v in ours.items()}, ref


def assert_equal_to_tf(ours, ref, head_layer):
    ref = dict(ref, logits=ref[f"logits_from_{head_layer}"])
    for k, v in ours.items():  # float32 rounding: TF and PyTorch sum in different orders
        diff = float(np.abs(v - ref[k]).max())
        assert diff < 1e-5 * max(1.0, np.abs(ref[k]).max()), (k, diff)


def test_v2_downloads_converts_caches_and_computes_what_tensorflow_computes(server, cache):
    model = load("simclr_v2", "r50_1x_sk0", bucket="pretrained")
    ours, ref = outputs(model, R50)
    assert_equal_to_tf(ours, ref, head_layer=0)
    assert not model.training and not model.projection_head.training and model.head_layer == 0
    folder = "/simclrv2/pretrained/r50_1x_sk0/"
    assert [p for m, p in server.requests if m == "GET"] == [  # the step comes from the `checkpoint` file
        folder + "checkpoint", folder + "model.ckpt-250228.index", folder + "model.ckpt-250228" + DATA]
    assert files_under(cache) == ["simclrv2-pretrained-r50_1x_sk0.pt"]  # nothing else left behind
    assert model.checkpoint_path == str(cache / "simclrv2-pretrained-r50_1x_sk0.pt")
    assert model.meta["tf_checkpoint"] == server.url + folder + "model.ckpt-250228"
    encoder, ckpt = load_encoder(model.checkpoint_path)  # the project's encoder.pt: the scripts read it
    assert model.state_dict().keys() == encoder.state_dict().keys()  # head and classifier are not submodules
    assert ckpt["classifier"]["head_layer"] == 0 and ckpt["encoder_config"]["width"] == 0.125

    server.shutdown()
    server.server_close()
    again = load("simclr_v2", "r50_1x_sk0", bucket="pretrained")  # from the cache, the server gone
    assert np.array_equal(outputs(again, R50)[0]["h"], ours["h"]) and len(server.requests) == 6


def test_v2_finetuned_classifier_reads_projection_head_layer_1(server, cache):
    model = load("simclr_v2", "r50_1x_sk1", bucket="finetuned_10pct")  # selective kernels, ResNet-D
    assert model.head_layer == 1 and model.config["sk_ratio"] == 0.0625
    assert_equal_to_tf(*outputs(model, SK1), head_layer=1)
    requests = len(server.requests)
    model = load("simclr_v2", "r50_1x_sk1", bucket="finetuned_10pct", head_layer=0)  # the other reading
    assert model.head_layer == 0 and len(server.requests) == requests
    assert_equal_to_tf(*outputs(model, SK1), head_layer=0)


def test_v2_distilled_student_is_read_from_its_teachers_folder(server, cache):
    """distill_1pct/r152_3x_sk1/STUDENT/, the release's nesting; the classifier's head layer from the
    checkpoint (the fixture's head is trained: layer 1), not from the bucket name."""
    model = load("simclr_v2", "r50_1x_sk0", bucket="distill_1pct")
    folder = "/simclrv2/distill_1pct/r152_3x_sk1/r50_1x_sk0/"
    assert [p for m, p in server.requests if m == "GET"] == [
        folder + "checkpoint", folder + "model.ckpt-100092.index", folder + "model.ckpt-100092" + DATA]
    assert model.head_layer == 1 and files_under(cache) == ["simclrv2-distill_1pct-r50_1x_sk0.pt"]
    assert_equal_to_tf(*outputs(model, R50), head_layer=1)
    with pytest.raises(RuntimeError) as e:  # a student the mirror does not hold: the 404, in one line
        load("simclr_v2", "r50_1x_sk0", bucket="distill_10pct")
    msg = str(e.value)
    assert "\n" not in msg and "HTTP 404" in msg and "/simclrv2/distill_10pct/r152_3x_sk1/r50_1x_sk0/checkpoint" in msg
    assert files_under(cache) == ["simclrv2-distill_1pct-r50_1x_sk0.pt"]


def test_the_head_layer_comes_from_the_bucket_not_from_the_working_folder(server, cache, tmp_path, monkeypatch):
    """Folders named like releases around the working folder do not change what a bucket's classifier
    reads (the fixture's head is trained: the finetuned rule and the distilled one would both say 1)."""
    here = tmp_path / "finetuned_10pct" / "distill_1pct"
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    model = load("simclr_v2", "r50_1x_sk0", bucket="pretrained")
    assert model.head_layer == 0
    assert_equal_to_tf(*outputs(model, R50), head_layer=0)


def test_v1_zip_is_downloaded_and_its_checkpoint_converted(server, cache):
    model = load("simclr_v1", "r50_1x")
    assert_equal_to_tf(*outputs(model, R50), head_layer=0)  # not the hub/ module's weights (the SK1 fixture)
    assert [p for m, p in server.requests if m == "GET"] == ["/checkpoints/ResNet50_1x.zip"]
    assert files_under(cache) == ["simclrv1-r50_1x.pt"]
    assert model.meta["tf_checkpoint"] == server.url + "/checkpoints/ResNet50_1x.zip"


@pytest.mark.parametrize("failure", ["404", "truncated", "unreachable"])
def test_failed_download_is_one_line_and_leaves_the_cache_clean(server, cache, monkeypatch, failure):
    model, url = "r50_1x_sk0", "/simclrv2/pretrained/r50_1x_sk0/model.ckpt-250228" + DATA
    if failure == "404":
        model, url = "r101_1x_sk0", "/simclrv2/pretrained/r101_1x_sk0/checkpoint"
    elif failure == "truncated":
        server.truncated.add(url)
    else:
        monkeypatch.setenv("SIMCLR_HUB_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
        url = "/simclrv2/pretrained/r50_1x_sk0/checkpoint"
    with pytest.raises(RuntimeError) as raised:
        load("simclr_v2", model)
    message = str(raised.value)
    assert "\n" not in message and raised.value.__cause__ is None  # and no chained traceback:
    assert raised.value.__context__ is None or raised.value.__suppress_context__
    assert message.startswith(f"simclr_v2('{model}', bucket='pretrained'): cannot download http://127.0.0.1:")
    assert url + " (" in message and "SIMCLR_WEIGHTS_DIR=DIR" in message and "checkpoint_dir=DIR" in message
    assert {"404": "(HTTP 404 ", "truncated": "the download ended after", "unreachable": "refused"}[failure] \
        in message
    assert files_under(cache.parent.parent) == []  # no partial download, no temporary folder
    if failure == "truncated":  # the next try, with the whole file, works
        server.truncated.clear()
        assert_equal_to_tf(*outputs(load("simclr_v2", model), R50), head_layer=0)


def test_command_line_prints_the_converted_file_or_one_error_line(server, cache, tmp_path):
    result = run_script(["hubconf.py", "simclr_v2", "r50_1x_sk0"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == str(cache / "simclrv2-pretrained-r50_1x_sk0.pt")
    assert "Downloading" in result.stderr and "Converting" in result.stderr  # progress: on stderr
    scored = run_script(["linear_eval.py", result.stdout.strip(), "--dataset", "synthetic", "--image-size", "64",
                         "--synthetic-size", "64", "--workers", "0", "--checkpoint-classifier", "--out", "r.json"],
                        tmp_path)  # the documented line that scores the released classifier, on generated images
    assert scored.returncode == 0 and json.loads((tmp_path / "r.json").read_text())["head_layer"] == 0, scored.stderr
    with pytest.raises(SystemExit) as exited:  # in this process: what sys.exit prints, as the only line
        hubconf._main(["simclr_v2", "r152_3x_sk1", "--bucket", "supervised"])
    error = str(exited.value.code)
    assert error.startswith("hubconf.py: error: simclr_v2('r152_3x_sk1', bucket='supervised'): cannot download ")
    assert "\n" not in error and "(HTTP 404" in error and "/simclrv2/supervised/r152_3x_sk1/checkpoint" in error


def test_official_files_placed_by_hand_are_converted_without_network(mirror, cache, monkeypatch, tmp_path):
    monkeypatch.setenv("SIMCLR_HUB_URL", f"http://127.0.0.1:{free_port()}")  # a download would fail
    folder = mirror / "simclrv2" / "pretrained" / "r50_1x_sk0"
    model = load("simclr_v2", "r50_1x_sk0", checkpoint_dir=str(folder))  # the model's folder itself
    assert_equal_to_tf(*outputs(model, R50), head_layer=0)
    assert model.meta["tf_checkpoint"] == str(folder / "model.ckpt-250228")
    monkeypatch.setenv("SIMCLR_WEIGHTS_DIR", str(mirror))  # a root: simclrv2/BUCKET/MODEL/, checkpoints/*.zip
    assert_equal_to_tf(*outputs(load("simclr_v2", "r50_1x_sk1", bucket="finetuned_10pct"), SK1), head_layer=1)
    assert_equal_to_tf(*outputs(load("simclr_v1", "r50_1x"), R50), head_layer=0)
    assert files_under(cache) == ["simclrv1-r50_1x.pt", "simclrv2-finetuned_10pct-r50_1x_sk1.pt",
                                  "simclrv2-pretrained-r50_1x_sk0.pt"]
    with pytest.raises(RuntimeError, match=r"checkpoint_dir=\S+ holds no official folder or zip \(looked at"):
        load("simclr_v2", "r50_2x_sk0", checkpoint_dir=str(tmp_path))


def test_files_of_another_model_are_refused_and_not_cached(cache):
    with pytest.raises(RuntimeError, match=r"holds a resnet50 SK network, not r50_1x_sk0"):
        load("simclr_v2", "r50_1x_sk0", checkpoint_dir=os.path.dirname(SK1))
    assert files_under(cache.parent.parent) == []


def test_interrupted_conversion_leaves_nothing_behind(cache, monkeypatch):
    read, calls = convert_official.TFCheckpoint.read, []

    def interrupted(self, name):
        calls.append(name)
        if len(calls) == 100:
            raise KeyboardInterrupt
        return read(self, name)

    monkeypatch.setattr(convert_official.TFCheckpoint, "read", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load("simclr_v2", "r50_1x_sk0", checkpoint_dir=os.path.dirname(R50))
    assert files_under(cache.parent.parent) == []
    monkeypatch.setattr(convert_official.TFCheckpoint, "read", read)
    assert_equal_to_tf(*outputs(load("simclr_v2", "r50_1x_sk0", checkpoint_dir=os.path.dirname(R50)), R50), 0)


@functools.lru_cache(maxsize=1)
def layouts():
    with gzip.open(os.path.join(FIXTURES, "official_layouts.json.gz"), "rt") as f:
        return {name: {n: tuple(s) for n, s in variables} for name, variables in json.load(f).items()}


def test_entries_cover_every_released_model():
    entries = [f for f in dir(hubconf) if callable(getattr(hubconf, f)) and not f.startswith("_")]  # torch.hub.list
    assert entries == ["simclr_encoder", "simclr_v1", "simclr_v2"]
    # the layouts file also lists sk0 at 3x, which is not released (13 v2 models: the official README)
    released = {n for n in layouts() if n.startswith(("v1_", "v2_")) and not n.endswith("_3x_sk0")}
    assert {f"v1_{m}" for m in hubconf.V1_MODELS} | {f"v2_{m}" for m in hubconf.V2_MODELS} == released
    assert len(hubconf.V2_MODELS) == 13 and hubconf.V2_BUCKETS == (
        "pretrained", "finetuned_1pct", "finetuned_10pct", "finetuned_100pct", "supervised")
    assert hubconf.DISTILL_BUCKETS == ("distill_1pct", "distill_10pct") and hubconf.DISTILL_TEACHER in hubconf.V2_MODELS
    assert all(importlib.util.find_spec(d) for d in hubconf.dependencies)
    with pytest.raises(ValueError, match="'r50_3x_sk0' is not released; choose one of r50_1x_sk0, r50_1x_sk1"):
        hubconf.simclr_v2("r50_3x_sk0")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_pretrained_false_builds_each_released_architecture_without_network(server, cache, version):
    """The architecture a name stands for is the one the converter reads from that model's layout
    (built on the meta device: shapes only, even for ResNet-152 3x)."""
    names = hubconf.V1_MODELS if version == "v1" else hubconf.V2_MODELS
    for name in names:
        shapes = layouts()[f"{version}_{name}"]
        config = convert_official.encoder_config({n: s for n, s in shapes.items() if n.startswith("base_model/")})
        head = [shapes[f"head_contrastive/nl_{j}/dense/kernel"] for j in range(3) if version == "v2"]
        head_config = head and {"in_dim": head[0][0], "hidden_dim": head[0][1], "out_dim": head[-1][1], "num_layers": 3}
        classes = shapes["head_supervised/linear_layer/dense/kernel"][1]
        with torch.device("meta"):
            model = hubconf.simclr_v1(name, pretrained=False) if version == "v1" else hubconf.simclr_v2(
                name, bucket="finetuned_1pct" if name == "r50_1x_sk0" else "pretrained", pretrained=False)
        assert model.config == config and not model.training and model.checkpoint_path is None
        if version == "v2":
            assert model.projection_head.config == head_config
        assert model.head_layer == (1 if version == "v2" and name == "r50_1x_sk0" else 0)  # 1%: head layer 1
        assert model.classifier[1].weight.shape == (classes, model.feature_dim)
    model = load(f"simclr_{version}", names[0], pretrained=False)  # a real module, through torch.hub
    with torch.no_grad():
        assert model.classifier(model(torch.rand(1, 3, 64, 64))).shape == (1, 1000)
    assert server.requests == [] and not os.path.exists(cache.parent.parent)


def test_simclr_encoder_loads_this_projects_files(tmp_path):
    encoder, head = build_encoder("resnet18", width=0.25), ProjectionHead(128, hidden_dim=64, num_layers=2)
    classifier = {"weight": torch.randn(10, 64), "bias": torch.randn(10), "head_layer": 1}
    save_encoder(tmp_path / "encoder.pt", encoder, head=head, classifier=classifier, dataset="synthetic")
    model = torch.hub.load(ROOT, "simclr_encoder", str(tmp_path / "encoder.pt"), source="local")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        h = encoder.eval()(x)
        assert torch.equal(model(x), h) and not model.training and model.head_layer == 1
        expected = head.eval().first_layers(1)(h) @ classifier["weight"].T + classifier["bias"]
        assert torch.allclose(model.classifier(h), expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"checkpoint \S+missing.pt does not exist"):
        torch.hub.load(ROOT, "simclr_encoder", str(tmp_path / "missing.pt"), source="local")


def test_a_users_own_model_module_does_not_shadow_the_projects(monkeypatch):
    """torch.hub.load imports hubconf.py with the repository first on sys.path, but `import model`
    returns whatever module of that name the user's program has already imported."""
    users = types.ModuleType("model")
    users.__file__ = "/elsewhere/model.py"
    monkeypatch.setitem(sys.modules, "model", users)
    monkeypatch.delitem(sys.modules, "convert_official")
    model = load("simclr_v1", "r50_1x", pretrained=False)
    assert model.config["arch"] == "resnet50"
    assert sys.modules["model"] is users and "convert_official" not in sys.modules  # left as found
