"""The names and shapes of detectron2's ResNet backbone, from detectron2's own code.

Builds the backbone with detectron2's build_resnet_backbone (detectron2/modeling/backbone/resnet.py:
BasicStem's conv1 and its norm, stages res2-res5 of BasicBlock or BottleneckBlock, convK.norm and
shortcut.norm, FrozenBN by default) for each layout below, and writes every state-dict name with
its shape to detectron2_resnet_names.json beside this file; tests/test_export.py checks
export.py --to detectron2 against it. detectron2 is not a dependency of this project: run this in a
throwaway environment with detectron2 installed (it builds from source), e.g.

    python -m venv /tmp/d2 && /tmp/d2/bin/pip install torch torchvision
    /tmp/d2/bin/pip install 'git+https://github.com/facebookresearch/detectron2.git'
    /tmp/d2/bin/python tests/reference/make_detectron2_names.py [DETECTRON2_COMMIT]

With --check PKL ENCODER_PT it instead loads an export.py --to detectron2 pickle into that backbone
through DetectionCheckpointer (the path a detectron2 training run takes with MODEL.WEIGHTS) and prints
how far the pooled res5 output is from this project's encoder on random images.
"""
import json
import os
import sys

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone.resnet import build_resnet_backbone

# name: (depth, stem channels = width per group, res2 output channels); the 2x layout is ResNet-50 2x.
LAYOUTS = {"resnet18": (18, 64, 64), "resnet50": (50, 64, 256), "resnet50_2x": (50, 128, 512),
           "resnet152": (152, 64, 256)}


def backbone(depth, stem, res2):
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = stem
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = stem
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = res2
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False  # torchvision's (and this project's) stride placement
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    return build_resnet_backbone(cfg, ShapeSpec(channels=3))


def main():
    if sys.argv[1:2] == ["--check"]:
        pkl, encoder_path = sys.argv[2:4]
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
        from model import load_encoder
        encoder, _ = load_encoder(encoder_path)
        config = encoder.config
        stem = encoder.conv1.out_channels
        res2 = encoder.layer1[0].conv3.out_channels if hasattr(encoder.layer1[0], "conv3") else stem
        net = backbone(int(config["arch"][len("resnet"):]), stem, res2).eval()
        DetectionCheckpointer(net).load(pkl)
        x = torch.rand(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            h = encoder.eval()(x)
            h2 = net(x)["res5"].mean(dim=(2, 3))  # (x * 255 - 0) / 255 = x: PIXEL_MEAN 0, PIXEL_STD 255
        print(f"{config}: max |h - h_detectron2| = {(h - h2).abs().max().item():.3g} of max |h| {h.abs().max().item():.3g}")
        return
    out = {"source": "facebookresearch/detectron2 " + (sys.argv[1] if len(sys.argv) > 1 else "(commit not given)")
                     + ", detectron2/modeling/backbone/resnet.py build_resnet_backbone, STRIDE_IN_1X1 False",
           "layouts": {}}
    for name, (depth, stem, res2) in LAYOUTS.items():
        out["layouts"][name] = {k: list(v.shape) for k, v in backbone(depth, stem, res2).state_dict().items()}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "detectron2_resnet_names.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=0)
    print(f"wrote {path}: " + ", ".join(f"{k} {len(v)} names" for k, v in out["layouts"].items()))


if __name__ == "__main__":
    main()
