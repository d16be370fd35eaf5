"""Two steps of distill.py's train_step under DDP with torchrun (gloo, CPU), each process on its
half of the global batch; rank 0 saves the losses and the student's weights for
tests/test_distill.py, whose reference() takes the same steps in one process.

    torchrun --standalone --nproc_per_node=2 tests/distill_worker.py OUT.pt
"""
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import distill  # noqa: E402
from distributed import teardown  # noqa: E402
from lars import fine_tuning_optimizer  # noqa: E402
from loss import distillation_loss  # noqa: E402
from model import Classifier, build_encoder  # noqa: E402

GLOBAL_BATCH, SIZE, CLASSES, TEMPERATURE, LABEL_WEIGHT = 8, 16, 5, 0.5, 0.7


def make_models():
    """Student and teacher (seeded), every parameter nudged so that gradients reach every layer."""
    torch.manual_seed(0)
    nets = []
    for width in (0.125, 0.25):  # student, teacher
        encoder = build_encoder("resnet18", width, cifar_stem=True)
        net = Classifier(encoder, nn.Linear(encoder.feature_dim, CLASSES))
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
        nets.append(net)
    student, teacher = nets
    return student, teacher.eval().requires_grad_(False)


def make_optimizer(student):
    return fine_tuning_optimizer("lars", student.parameters(), [], lr=0.5, weight_decay=1e-4)  # as distill.py's


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.rand(GLOBAL_BATCH, 3, SIZE, SIZE, generator=g), torch.tensor([0, -1, 3, -1, 2, -1, -1, 4]))
            for _ in range(2)]


JOB = SimpleNamespace(args=SimpleNamespace(channels_last=False, amp="off", temperature=TEMPERATURE,
                                           label_weight=LABEL_WEIGHT),
                      ctx=SimpleNamespace(device=torch.device("cpu")))


def reference(world):
    """One process, the whole batch; the student normalises each process's share on its own, as
    BatchNorm does under DDP on the CPU."""
    student, teacher = make_models()
    start = {k: v.clone() for k, v in student.named_parameters()}
    optimizer = make_optimizer(student)
    n, losses = GLOBAL_BATCH // world, []
    for x, labels in batches():
        logits = torch.cat([student(x[r * n:(r + 1) * n]) for r in range(world)])
        with torch.no_grad():
            teacher_logits = teacher(x)
        loss = distillation_loss(logits, teacher_logits, TEMPERATURE, labels, LABEL_WEIGHT)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return {"losses": losses, "start": start, "weights": {k: v.detach().clone() for k, v in student.named_parameters()}}


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    n = GLOBAL_BATCH // world
    student, teacher = make_models()
    model = DDP(student)
    optimizer = make_optimizer(student)
    losses = []
    for x, labels in batches():
        loss, _, _ = distill.train_step(JOB, model, teacher, optimizer, None, x[rank * n:(rank + 1) * n],
                                        labels[rank * n:(rank + 1) * n])
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    if rank == 0:
        torch.save({"losses": losses, "world": world,
                    "weights": {k: v.detach().clone() for k, v in student.named_parameters()}}, sys.argv[1])
    teardown(0)  # as the scripts end: gloo's destructor can abort or hang at interpreter exit


if __name__ == "__main__":
    main()
