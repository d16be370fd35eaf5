"""Encoder sizes, torchvision compatibility, initialisation, head, save/load."""
import pytest
import torch
import torchvision

from model import (CheckpointError, ProjectionHead, SimCLR, TFSameMaxPool, build_encoder, load_encoder, load_head,
                   read_checkpoint, save_atomic, save_encoder)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_resnet50_has_torchvision_parameter_count():
    assert n_params(build_encoder("resnet50")) == 23_508_032  # torchvision resnet50 minus fc


@pytest.mark.parametrize("width,params,dim", [(2, 93_907_072, 4096), (4, 375_378_176, 8192)])
def test_wide_resnet50_sizes(width, params, dim):
    with torch.device("meta"):  # count without allocating 1.5 GB
        encoder = build_encoder("resnet50", width=width)
    assert n_params(encoder) == params and encoder.feature_dim == dim  # paper: 94M, 375M


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_state_dict_loads_strictly_and_agrees(arch):
    tv = getattr(torchvision.models, arch)().eval()
    encoder = build_encoder(arch).eval()
    encoder.load_state_dict({k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}, strict=True)
    x = torch.rand(2, 3, 64, 64)
    tv.fc = torch.nn.Identity()
    torch.testing.assert_close(encoder(x), tv(x))


def test_shapes_and_cifar_stem():
    x = torch.rand(2, 3, 32, 32)
    enc = build_encoder("resnet18", cifar_stem=True)
    assert enc(x).shape == (2, 512) and enc.feature_dim == 512
    assert enc.conv1.kernel_size == (3, 3) and enc.conv1.stride == (1, 1)
    assert isinstance(enc.maxpool, torch.nn.Identity)
    assert enc.layer1(enc.relu(enc.bn1(enc.conv1(x)))).shape[-1] == 32  # full resolution into layer1
    std = build_encoder("resnet18")
    assert std.conv1.kernel_size == (7, 7) and std.conv1.stride == (2, 2)
    assert build_encoder("resnet50", width=0.25).feature_dim == 512


def test_last_bn_gamma_of_each_block_starts_at_zero():
    enc = build_encoder("resnet50")
    blocks = [b for layer in (enc.layer1, enc.layer2, enc.layer3, enc.layer4) for b in layer]
    assert len(blocks) == 16
    assert all(torch.count_nonzero(b.bn3.weight) == 0 for b in blocks)
    assert all(torch.all(b.bn1.weight == 1) for b in blocks)
    enc18 = build_encoder("resnet18")
    assert all(torch.count_nonzero(b.bn2.weight) == 0 for b in enc18.layer1)
    plain = build_encoder("resnet18", zero_init_residual=False)  # torchvision's and lightly's start
    assert all(torch.all(b.bn2.weight == 1) for layer in (plain.layer1, plain.layer4) for b in layer)


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown arch 'resnet51'"):
        build_encoder("resnet51")


def test_projection_head():
    head = ProjectionHead(64)
    z = head(torch.randn(8, 64))
    assert z.shape == (8, 128)
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 64), (64, 128)]
    out_bn = head.net[-1]
    assert isinstance(out_bn, torch.nn.BatchNorm1d) and not out_bn.bias.requires_grad
    assert len(ProjectionHead(64, hidden_dim=32, out_dim=16, num_layers=3).net) == 8  # 2 x (lin, bn, relu) + lin, bn
    h, z = SimCLR(build_encoder("resnet18", width=0.25), ProjectionHead(128))(torch.rand(4, 3, 32, 32))
    assert h.shape == (4, 128) and z.shape == (4, 128)


def test_save_and_load_encoder_round_trip(tmp_path):
    torch.manual_seed(0)
    enc = build_encoder("resnet18", width=0.5, cifar_stem=True)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / "encoder.pt"
    save_encoder(path, enc, dataset="synthetic", image_size=32)
    loaded, ckpt = load_encoder(path)
    assert ckpt["meta"] == {"dataset": "synthetic", "image_size": 32}
    assert loaded.config == {"arch": "resnet18", "width": 0.5, "cifar_stem": True}
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), enc.eval()(x), rtol=0, atol=0)
    assert torch.load(path, weights_only=True)["format"] == "simclr-encoder"  # plain dicts only
    assert not list(tmp_path.glob("*.tmp*"))


def test_load_encoder_from_full_checkpoint(tmp_path):
    enc = build_encoder("resnet18", width=0.25)
    model = SimCLR(enc, ProjectionHead(enc.feature_dim))
    save_atomic({"format": "simclr-encoder", "encoder_config": enc.config, "model": model.state_dict()},
                tmp_path / "ckpt.pt")
    loaded, _ = load_encoder(tmp_path / "ckpt.pt")
    for k, v in enc.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_bad_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        read_checkpoint(tmp_path / "text.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint written by"):
        read_checkpoint(tmp_path / "foreign.pt")
    save_encoder(tmp_path / "good.pt", build_encoder("resnet18", width=0.25))
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint(tmp_path / "truncated.pt")
    ckpt = torch.load(tmp_path / "good.pt", weights_only=True)
    ckpt["encoder_config"]["arch"] = "resnet34"  # weights of one arch, labelled as another
    torch.save(ckpt, tmp_path / "mislabelled.pt")
    with pytest.raises(CheckpointError, match="do not match"):
        load_encoder(tmp_path / "mislabelled.pt")


@pytest.mark.parametrize("size", [6, 7, 112, 113])
def test_tf_same_max_pool_pads_as_tensorflow(size):
    # TF 'SAME', 3x3 / stride 2: output ceil(n / 2); the padding that needs, odd pixel after
    # (even n: 0 before, 1 after; odd n: 1 and 1). Padded cells never win (-inf).
    x = torch.randn(2, 3, size, size)
    after = 1
    before = 0 if size % 2 == 0 else 1
    ref = torch.nn.functional.max_pool2d(
        torch.nn.functional.pad(x, (before, after, before, after), value=float("-inf")), 3, 2)
    out = TFSameMaxPool()(x)
    assert out.shape[-1] == (size + 1) // 2
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    if size % 2 == 0:  # where torchvision's padding=1 differs
        assert not torch.equal(out, torch.nn.MaxPool2d(3, 2, padding=1)(x))


def test_tf_same_pool_is_recorded_and_keeps_the_parameters(tmp_path):
    enc = build_encoder("resnet18", width=0.25, tf_same_pool=True)
    assert enc.config["tf_same_pool"] is True and isinstance(enc.maxpool, TFSameMaxPool)
    assert "tf_same_pool" not in build_encoder("resnet18", width=0.25).config  # default unchanged
    save_encoder(tmp_path / "tf.pt", enc)
    assert isinstance(load_encoder(tmp_path / "tf.pt")[0].maxpool, TFSameMaxPool)
    old = build_encoder("resnet18", width=0.25)  # same parameters, torchvision padding
    old.load_state_dict(enc.state_dict())


def test_head_and_classifier_round_trip(tmp_path):
    torch.manual_seed(0)
    enc = build_encoder("resnet18", width=0.25)
    head = ProjectionHead(enc.feature_dim, hidden_dim=32, out_dim=16, num_layers=3)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p))
    classifier = {"weight": torch.randn(5, 32), "bias": torch.randn(5), "head_layer": 1}
    save_encoder(tmp_path / "encoder.pt", enc, head=head, classifier=classifier)
    _, ckpt = load_encoder(tmp_path / "encoder.pt")
    loaded = load_head(tmp_path / "encoder.pt", ckpt).eval()
    h = torch.randn(4, enc.feature_dim)
    torch.testing.assert_close(loaded(h), head.eval()(h), rtol=0, atol=0)
    assert torch.equal(ckpt["classifier"]["weight"], classifier["weight"]) and ckpt["classifier"]["head_layer"] == 1
    # layer k's output: h at 0, after the hidden layer's ReLU at 1, z at num_layers
    assert torch.equal(loaded.first_layers(0)(h), h)
    assert torch.equal(loaded.first_layers(1)(h), torch.relu(head.net[1](head.net[0](h))))
    torch.testing.assert_close(loaded.first_layers(3)(h), head(h), rtol=0, atol=0)
    with pytest.raises(ValueError, match="has 3 layers"):
        loaded.first_layers(4)
    # without a head (older exports) there is none; ckpt.pt carries it in "model" + "args"
    save_encoder(tmp_path / "plain.pt", enc)
    assert load_head(tmp_path / "plain.pt", load_encoder(tmp_path / "plain.pt")[1]) is None
    model = SimCLR(enc, head)
    save_atomic({"format": "simclr-encoder", "encoder_config": enc.config, "model": model.state_dict(),
                 "args": {"proj_hidden_dim": 32, "proj_dim": 16, "proj_layers": 3}}, tmp_path / "ckpt.pt")
    from_full = load_head(tmp_path / "ckpt.pt", load_encoder(tmp_path / "ckpt.pt")[1]).eval()
    torch.testing.assert_close(from_full(h), head(h), rtol=0, atol=0)


# SimCLRv2: selective kernels (sk1), ResNet-D stem and shortcuts, the official ResNet-18/34 shortcuts.
# Trainable parameters of the 13 released v2 encoders as the official TF1 code builds them (the sums of
# the kernels, gammas and betas of base_model in tests/fixtures/official_layouts.json.gz, which
# tests/test_convert.py also checks), and the official README's "Param (M)" column, which the
# load_and_inference colab's count_params shows to count the BN moving statistics too.
RELEASED_V2 = [  # depth, width, sk, parameters, README Param (M)
    (50, 1, 0, 23_508_032, 24), (50, 1, 1, 35_215_584, 35), (50, 2, 0, 93_907_072, 94), (50, 2, 1, 140_306_048, 140),
    (101, 1, 0, 42_500_160, 43), (101, 1, 1, 64_662_304, 65), (101, 2, 0, 169_771_136, 170),
    (101, 2, 1, 257_132_224, 257), (152, 1, 0, 58_143_808, 58), (152, 1, 1, 88_940_896, 89),
    (152, 2, 0, 232_253_568, 233), (152, 2, 1, 353_398_528, 354), (152, 3, 1, 794_704_160, 795)]


@pytest.mark.parametrize("depth,width,sk,params,readme", RELEASED_V2)
def test_released_v2_encoders_have_the_official_parameter_counts(depth, width, sk, params, readme):
    with torch.device("meta"):  # shapes only: ResNet-152 3x SK would take 3.2 GB
        encoder = build_encoder(f"resnet{depth}", width=width, sk_ratio=0.0625 * sk)
    stats = sum(b.numel() for k, b in encoder.named_buffers() if k.endswith(("running_mean", "running_var")))
    assert n_params(encoder) == params and round((params + stats) / 1e6) == readme
    assert encoder.feature_dim == 2048 * width


def test_selective_kernel_encoder_layout_and_config(tmp_path):
    enc = build_encoder("resnet50", width=0.25, sk_ratio=0.0625)
    assert enc.config == {"arch": "resnet50", "width": 0.25, "cifar_stem": False, "sk_ratio": 0.0625}
    assert "sk_ratio" not in build_encoder("resnet50", width=0.25).config  # old configs stay as they were
    stem = [m for m in enc.conv1 if isinstance(m, torch.nn.Conv2d)]  # ResNet-D: 3x3 convs 32w, 32w, 64w
    assert [(m.in_channels, m.out_channels, m.stride) for m in stem] == [(3, 8, (2, 2)), (8, 8, (1, 1)), (8, 16, (1, 1))]
    sk = enc.layer4[0].conv2  # f = 128: 3x3 conv to 2f, attention 1x1 to max(int(f / 16), 32) = 32, 1x1 to 2f
    assert (sk.conv.out_channels, sk.conv.stride, sk.fc1.out_channels, sk.fc2.out_channels) == (256, (2, 2), 32, 256)
    assert [type(m).__name__ for m in enc.layer2[0].downsample] == ["ResNetDPool", "Conv2d", "BatchNorm2d"]
    assert enc.layer2[0].downsample[1].stride == (1, 1) and enc.layer1[0].downsample[0].stride == 1
    assert enc.layer1[1].downsample is None
    with torch.device("meta"):
        assert n_params(build_encoder("resnet50", width=2, sk_ratio=0.0625).layer4[0].conv2.fc1) == 1024 * 64
    torch.manual_seed(0)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_encoder(tmp_path / "sk.pt", enc)
    loaded, _ = load_encoder(tmp_path / "sk.pt")
    x = torch.rand(2, 3, 45, 45)  # odd sizes on the way down
    out = enc.eval()(x)
    assert out.shape == (2, 512) and torch.equal(loaded.eval()(x), out)
    with pytest.raises(ValueError, match="bottleneck ResNet"):
        build_encoder("resnet18", sk_ratio=0.0625)
    with pytest.raises(ValueError, match=r"sk_ratio must be in \[0, 1\)"):
        build_encoder("resnet50", sk_ratio=-1)


def test_selective_kernel_attention_weighs_the_two_branches():
    from model import SelectiveKernel
    torch.manual_seed(0)
    sk = SelectiveKernel(8, 8, 1, 0.0625).eval()
    with torch.no_grad():
        for p in sk.parameters():
            p.add_(0.3 * torch.randn_like(p))
        sk.bn.running_mean.normal_()
        sk.fc_bn.running_var.uniform_(0.5, 2)
    x = torch.randn(3, 8, 5, 5)
    with torch.no_grad():
        out = sk(x)
        # written out channel by channel: the weights of the two branches sum to 1 per (image, channel)
        u = torch.relu(sk.bn(sk.conv(x)))
        a, b = u[:, :8], u[:, 8:]
        s = (a + b).mean((2, 3))  # (3, 8)
        t = torch.relu(sk.fc_bn(torch.nn.functional.linear(s, sk.fc1.weight[:, :, 0, 0])[..., None, None]))
        logits = torch.nn.functional.linear(t[:, :, 0, 0], sk.fc2.weight[:, :, 0, 0])  # (3, 16)
        wa = 1 / (1 + torch.exp(logits[:, 8:] - logits[:, :8]))  # softmax of two = a logistic of the difference
        ref = a * wa[..., None, None] + b * (1 - wa)[..., None, None]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert 0.01 < wa.min() and wa.max() < 0.99 and wa.std() > 0.1  # both branches matter, weights differ


@pytest.mark.parametrize("size", [5, 6, 13])
def test_resnet_d_shortcut_pools_as_tensorflow(size):
    from model import ResNetDPool
    x = torch.randn(2, 3, size, size)
    # stride 1, TF 'SAME' 2x2: the mean of the real pixels in each window (one row/column padded after)
    ref = torch.empty_like(x)
    for i in range(size):
        for j in range(size):
            ref[..., i, j] = x[..., i:i + 2, j:j + 2].mean((-2, -1))  # slicing drops what lies outside
    torch.testing.assert_close(ResNetDPool(1)(x), ref, rtol=1e-6, atol=1e-6)
    # stride 2: a zero row and column after the input (official fixed_padding), then 'VALID' windows of 4
    padded = torch.zeros(2, 3, size + 1, size + 1)
    padded[..., :size, :size] = x
    n = size // 2 + (size % 2)  # (size + 1 - 2) // 2 + 1
    ref2 = torch.stack([torch.stack([padded[..., 2 * i:2 * i + 2, 2 * j:2 * j + 2].sum((-2, -1)) / 4
                                     for j in range(n)], -1) for i in range(n)], -2)
    torch.testing.assert_close(ResNetDPool(2)(x), ref2, rtol=1e-6, atol=1e-6)


def test_resnet_d_pool_runs_in_bf16_where_replicate_padding_has_no_bf16_kernel(monkeypatch):
    """torch 2.1 has no bf16 CUDA kernel for replicate padding (pytorch/pytorch#117961), and SK
    encoders run their stride-1 ResNet-D pool (layer1's first shortcut) under bf16 autocast. With
    F.pad refusing bf16 replicate padding as torch 2.1 on CUDA does, an SK encoder still runs under
    CPU bf16 autocast, its pool seeing bf16; and the pool equals the replicate-padded one element
    for element, in float32 and bf16, plain and channels_last."""
    import torch.nn.functional as F
    from model import ResNetDPool
    pad = F.pad

    def pad_as_torch_21_cuda(x, padding, mode="constant", value=None):
        if mode == "replicate" and x.dtype == torch.bfloat16:
            raise RuntimeError("\"replication_pad2d_cuda\" not implemented for 'BFloat16'")
        return pad(x, padding, mode=mode, value=value)

    monkeypatch.setattr(F, "pad", pad_as_torch_21_cuda)
    torch.manual_seed(0)
    encoder = build_encoder("resnet50", width=0.125, sk_ratio=0.0625).eval()
    seen = []
    for m in encoder.modules():
        if isinstance(m, ResNetDPool) and m.stride == 1:
            m.register_forward_hook(lambda module, args, out: seen.append((args[0].dtype, out.dtype)))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        h = encoder(x)
    assert seen == [(torch.bfloat16, torch.bfloat16)]  # layer1's first shortcut, in bf16
    assert h.shape == (2, encoder.feature_dim) and torch.isfinite(h).all()
    with torch.no_grad():
        torch.testing.assert_close(h.float(), encoder(x), rtol=0.1, atol=0.05)  # bf16's rounding, not a bug
    for dtype in (torch.float32, torch.bfloat16):
        for layout in (torch.contiguous_format, torch.channels_last):
            y = torch.randn(2, 8, 7, 5).to(dtype).contiguous(memory_format=layout)
            padded = pad(y, (0, 1, 0, 1), mode="replicate")  # the CPU has this kernel in both dtypes
            assert torch.equal(ResNetDPool(1)(y), F.avg_pool2d(padded, 2, stride=1)), (dtype, layout)


def test_official_resnet18_shortcuts():
    enc = build_encoder("resnet18", first_group_projection=True)
    assert enc.config["first_group_projection"] is True
    assert enc.layer1[0].downsample is not None and enc.layer1[1].downsample is None  # 64 -> 64 at stride 1
    assert n_params(enc) == 11_176_512 + 64 * 64 + 2 * 64  # torchvision's + the 1x1 conv and its BN
    assert "first_group_projection" not in build_encoder("resnet18").config
    assert build_encoder("resnet18").layer1[0].downsample is None  # torchvision's, still the default
    with torch.device("meta"):  # bottleneck ResNets project there anyway
        assert n_params(build_encoder("resnet50", first_group_projection=True)) == 23_508_032


def _sk_model(checkpointing):
    torch.manual_seed(0)
    encoder = build_encoder("resnet50", width=0.125, sk_ratio=0.0625, activation_checkpointing=checkpointing)
    model = SimCLR(encoder, ProjectionHead(encoder.feature_dim, out_dim=16))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("sync_bn", [False, True])
def test_activation_checkpointing_is_exact_with_selective_kernels(sync_bn):
    from checkpointing_worker import batches, two_steps
    from test_checkpointing import assert_same_steps
    views = batches(8)
    results = []
    for checkpointing in (False, True):
        model = _sk_model(checkpointing)
        if sync_bn:  # the class is what is tested: every SK and ResNet-D BN is converted
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            assert not any(type(m) is torch.nn.BatchNorm2d for m in model.modules())
        results.append(two_steps(model, views))
    buffers = results[0][0][1]["buffers"]
    # the ResNet-D stem's BNs live in conv1: updated once per step, not again in the recomputation
    assert buffers["encoder.conv1.1.num_batches_tracked"] == buffers["encoder.layer4.0.conv2.fc_bn.num_batches_tracked"] == 2
    assert_same_steps(*results)


def test_channels_last_gives_the_same_selective_kernel_network():
    model = _sk_model(False)
    x = torch.rand(4, 3, 40, 40)
    rh, rz = torch.randn(4, model.encoder.feature_dim), torch.randn(4, 16)  # (a plain sum would be ~0 after BN)
    h, z = model(x)
    ((h * rh).sum() + (z * rz).sum()).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    model = model.to(memory_format=torch.channels_last)
    h2, z2 = model(x.to(memory_format=torch.channels_last))
    ((h2 * rh).sum() + (z2 * rz).sum()).backward()
    torch.testing.assert_close(h2, h, rtol=1e-4, atol=1e-5)
    assert len(grads) > 200
    for k, p in model.named_parameters():
        if k in grads:  # float32 sums in another order: compare whole tensors
            assert (p.grad - grads[k]).norm() <= 1e-4 * grads[k].norm(), k


SK_TINY = ["--dataset", "synthetic", "--arch", "resnet50", "--width", "0.125", "--sk-ratio", "0.0625",
           "--no-cifar-stem", "--proj-layers", "3", "--synthetic-size", "32", "--batch-size", "16", "--log-every", "1",
           "--warmup-epochs", "1", "--workers", "0", "--knn-every", "0"]


def test_pretrain_with_selective_kernels_resumes_exactly_and_runs_under_torchrun(run, tmp_path, capsys):
    run("pretrain.py", *SK_TINY, "--epochs", "2", "--out", "straight")
    run("pretrain.py", *SK_TINY, "--epochs", "1", "--out", "resumed")  # warmup = epoch 1: the same learning rates
    result = run("pretrain.py", *SK_TINY, "--epochs", "2", "--out", "resumed", "--resume")
    assert "resumed from" in result.stdout
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)
    assert a["encoder_config"]["sk_ratio"] == 0.0625 and a["epoch"] == b["epoch"] == 2
    assert any(".conv2.fc1." in k for k in a["model"]) and any(k.startswith("encoder.conv1.3.") for k in a["model"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k  # bitwise
    encoder, _ = load_encoder(tmp_path / "resumed" / "encoder.pt")
    assert encoder.config == a["encoder_config"] and encoder.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 256)
    run("pretrain.py", *SK_TINY, "--epochs", "1", "--out", "ddp", torchrun=2)
    assert torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)["encoder_config"]["sk_ratio"] == 0.0625
    import pretrain
    with pytest.raises(SystemExit) as bad:
        pretrain.get_args([*SK_TINY[:2], "--arch", "resnet18", "--sk-ratio", "0.0625"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert bad.value.code == 2 and len(errors) == 1 and "bottleneck --arch (resnet50/101/152)" in errors[0]


def test_input_norm_is_imagenet_normalisation_inside_the_encoder(tmp_path):
    torch.manual_seed(0)
    enc = build_encoder("resnet18", width=0.25, cifar_stem=True, input_norm="imagenet").eval()
    plain = build_encoder("resnet18", width=0.25, cifar_stem=True).eval()
    plain.load_state_dict(enc.state_dict())  # the scaling holds no parameters or saved buffers
    x = torch.rand(3, 3, 32, 32)
    normalise = torchvision.transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    torch.testing.assert_close(enc(x), plain(normalise(x)))
    assert not torch.allclose(enc(x), plain(x))
    assert enc.config["input_norm"] == "imagenet" and "input_norm" not in plain.config
    save_encoder(tmp_path / "encoder.pt", enc)  # eval scripts rebuild it from config: the scaling comes back
    torch.testing.assert_close(load_encoder(tmp_path / "encoder.pt")[0].eval()(x), enc(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown input_norm 'cifar'"):
        build_encoder("resnet18", input_norm="cifar")


def test_conv_init_kaiming_and_pytorch_scales():
    torch.manual_seed(0)
    he = build_encoder("resnet18", cifar_stem=True)
    torch.manual_seed(0)
    pt = build_encoder("resnet18", cifar_stem=True, conv_init="pytorch")
    for a, b in ((he.layer3[0].conv2, pt.layer3[0].conv2), (he.layer4[1].conv1, pt.layer4[1].conv1)):
        fan_in = a.in_channels * 9
        fan_out = a.out_channels * 9
        assert abs(a.weight.std().item() / (2 / fan_out) ** 0.5 - 1) < 0.02  # He normal, fan_out
        bound = 1 / fan_in ** 0.5  # nn.Conv2d: kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert b.weight.abs().max().item() <= bound
        assert abs(b.weight.std().item() / (bound / 3 ** 0.5) - 1) < 0.02
    assert "conv_init" not in pt.config  # initialisation only: nothing to rebuild
    with pytest.raises(ValueError, match="unknown conv_init"):
        build_encoder("resnet18", conv_init="xavier")


def test_bn_per_view_forwards_each_half_on_its_own():
    torch.manual_seed(0)
    enc = build_encoder("resnet18", width=0.25, cifar_stem=True, zero_init_residual=False)
    head = ProjectionHead(enc.feature_dim)
    x = torch.rand(8, 3, 32, 32)
    per_view = SimCLR(enc, head, bn_chunks=2).train()
    h, z = per_view(x)
    joint = SimCLR(enc, head).train()  # the same modules, both views in one BN batch
    h1, z1 = joint(x[:4])
    h2, z2 = joint(x[4:])
    torch.testing.assert_close(h, torch.cat([h1, h2]), rtol=0, atol=0)
    torch.testing.assert_close(z, torch.cat([z1, z2]), rtol=0, atol=0)
    assert not torch.allclose(joint(x)[1], z, atol=1e-3)  # joint statistics are different numbers


def test_projection_head_without_output_bn(tmp_path):
    torch.manual_seed(0)
    head = ProjectionHead(64, out_bn=False)
    last = head.net[-1]
    assert isinstance(last, torch.nn.Linear) and last.bias is not None and len(head.net) == 4
    assert head.config["out_bn"] is False and "out_bn" not in ProjectionHead(64).config
    h = torch.randn(5, 64)
    torch.testing.assert_close(head(h), last(torch.relu(head.net[1](head.net[0](h)))))
    enc = build_encoder("resnet18", width=0.25)
    head = ProjectionHead(enc.feature_dim, out_bn=False)
    save_encoder(tmp_path / "encoder.pt", enc, head=head)
    from_export = load_head(tmp_path / "encoder.pt", load_encoder(tmp_path / "encoder.pt")[1])
    save_atomic({"format": "simclr-encoder", "encoder_config": enc.config, "model": SimCLR(enc, head).state_dict(),
                 "args": {"proj_hidden_dim": None, "proj_dim": 128, "proj_layers": 2, "proj_out_bn": False}},
                tmp_path / "ckpt.pt")
    from_full = load_head(tmp_path / "ckpt.pt", load_encoder(tmp_path / "ckpt.pt")[1])
    h = torch.randn(4, enc.feature_dim)
    for loaded in (from_export, from_full):
        torch.testing.assert_close(loaded.eval()(h), head.eval()(h), rtol=0, atol=0)
