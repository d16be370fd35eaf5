"""Two steps of distill.py's train_step under DDP with torchrun, each process on its half of the
global batch; rank 0 saves the losses and the student's weights (and BN running statistics) for
tests/test_distill.py and tests/test_cuda.py, whose reference() takes the same steps in one process.

    torchrun --standalone --nproc_per_node=2 tests/distill_worker.py OUT.pt [--cuda]

The student is wrapped as distill.py wraps it (distributed.wrap_ddp). On the CPU (gloo) each process
normalises its own half. --cuda (tests/test_cuda.py): every process on cuda:0, TF32 off, so the student
gets SyncBatchNorm (BN over the whole global batch); the collectives go through gloo on CUDA tensors,
since NCCL refuses two ranks on one GPU (as tests/ddp_worker.py).
"""
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import distill  # noqa: E402
from distributed import Context, teardown, wrap_ddp  # noqa: E402
from lars import fine_tuning_optimizer  # noqa: E402
from loss import distillation_loss  # noqa: E402
from model import Classifier, build_encoder, unwrap  # noqa: E402

GLOBAL_BATCH, SIZE, CLASSES, TEMPERATURE, LABEL_WEIGHT = 8, 16, 5, 0.5, 0.7


def make_models(device="cpu"):
    """Student and teacher (seeded), every parameter nudged so that gradients reach every layer."""
    torch.manual_seed(0)
    nets = []
    for width in (0.125, 0.25):  # student, teacher
        encoder = build_encoder("resnet18", width, cifar_stem=True)
        net = Classifier(encoder, torch.nn.Linear(encoder.feature_dim, CLASSES))
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
        nets.append(net.to(device))
    student, teacher = nets
    return student, teacher.eval().requires_grad_(False)


def make_optimizer(student):
    return fine_tuning_optimizer("lars", student.parameters(), [], lr=0.5, weight_decay=1e-4)  # as distill.py's


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.rand(GLOBAL_BATCH, 3, SIZE, SIZE, generator=g), torch.tensor([0, -1, 3, -1, 2, -1, -1, 4]))
            for _ in range(2)]


def job(device):
    return SimpleNamespace(args=SimpleNamespace(channels_last=False, amp="off", temperature=TEMPERATURE,
                                                label_weight=LABEL_WEIGHT),
                           ctx=SimpleNamespace(device=torch.device(device)))


def bn_stats(student):
    return {k: v.detach().cpu().clone() for k, v in student.state_dict().items()
            if "running_" in k or "num_batches" in k}


def reference(world, device="cpu", sync_bn=False):
    """One process, the whole batch: the student normalises each process's share on its own, as
    BatchNorm does under DDP on the CPU, or with sync_bn the whole global batch at once, as
    SyncBatchNorm does on the GPU."""
    student, teacher = make_models(device)
    start = {k: v.detach().cpu().clone() for k, v in student.named_parameters()}
    optimizer = make_optimizer(student)
    n, losses = GLOBAL_BATCH // world, []
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for x, labels in batches():
            x, labels = x.to(device), labels.to(device)
            logits = student(x) if sync_bn else torch.cat([student(x[r * n:(r + 1) * n]) for r in range(world)])
            with torch.no_grad():
                teacher_logits = teacher(x)
            loss = distillation_loss(logits, teacher_logits, TEMPERATURE, labels, LABEL_WEIGHT)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return {"losses": losses, "start": start, "bn_stats": bn_stats(student),
            "weights": {k: v.detach().cpu().clone() for k, v in student.named_parameters()}}


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", 0) if "--cuda" in sys.argv else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # float32 to compare
    n = GLOBAL_BATCH // world
    student, teacher = make_models(device)
    ctx = Context(ddp=True, rank=rank, world=world, local_rank=int(os.environ["LOCAL_RANK"]), device=device)
    model = wrap_ddp(student, ctx)  # on the GPU: SyncBatchNorm, DDP on cuda:0
    student = unwrap(model)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in student.modules()) == (device.type == "cuda")
    optimizer = make_optimizer(student)
    losses = []
    for x, labels in batches():
        loss, _, _ = distill.train_step(job(device), model, teacher, optimizer, None, x[rank * n:(rank + 1) * n],
                                        labels[rank * n:(rank + 1) * n])
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    if rank == 0:
        torch.save({"losses": losses, "world": world, "bn_stats": bn_stats(student),
                    "weights": {k: v.detach().cpu().clone() for k, v in student.named_parameters()}}, sys.argv[1])
    teardown(0)  # as the scripts end: gloo's destructor can abort or hang at interpreter exit


if __name__ == "__main__":
    main()
