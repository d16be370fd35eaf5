"""What only a CUDA machine can check (skipped elsewhere): the pretraining step never
waits for the GPU. torch.cuda.set_sync_debug_mode("error") turns every device-to-host
synchronisation into an exception."""
import argparse

import pytest
import torch

from distributed import Context
from lars import LARS
from model import ProjectionHead, SimCLR, build_encoder
from pretrain import to_device_views, train_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_training_step_never_waits_for_the_gpu(checkpointing):
    device = torch.device("cuda")
    torch.manual_seed(0)
    encoder = build_encoder("resnet18", activation_checkpointing=checkpointing)
    model = SimCLR(encoder, ProjectionHead(encoder.feature_dim)).to(device, memory_format=torch.channels_last)
    optimizer = LARS([p for p in model.parameters() if p.requires_grad], lr=0.1)
    settings = argparse.Namespace(distort_on="device", strength=1.0, blur=True, channels_last=True)
    ctx = Context(ddp=False, rank=0, world=1, local_rank=0, device=device)
    nonfinite = torch.tensor([-1.0, 0.0], device=device)
    generator = torch.Generator()
    # uint8 crops in pinned memory, as the data workers hand them over on the device path
    crops = [torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8).pin_memory() for _ in range(2)]
    for step in range(2):  # warm-up: cuDNN autotuning, lazy initialisation
        stats, nonfinite = train_step(model, optimizer, to_device_views(*crops, settings, device, generator, step),
                                      0.1, True, ctx, nonfinite, step)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(2, 6):
            x = to_device_views(*crops, settings, device, generator, seed=step)
            stats, nonfinite = train_step(model, optimizer, x, 0.1, True, ctx, nonfinite, step)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(stats).all() and nonfinite[0].item() == -1
