"""NT-Xent, the SimCLR contrastive loss (Chen et al. 2020, eq. 1 and Algorithm 1),
in matrix form, with a cross-rank gather that carries gradients; and SimCLRv2's
distillation loss (Chen et al. 2020b, Sec. 2.3), at the end.

For a global batch of N images (2N views), anchor i with positive j scores
    l(i, j) = -log( exp(sim(z_i, z_j)/t) / sum_{k != i} exp(sim(z_i, z_k)/t) )
and the loss is the mean over all 2N anchors: every other view in the global
batch is a negative. The official code returns twice this (CE_a + CE_b).

Under torch.distributed with several processes, each rank scores its own 2n
anchors against the 2N embeddings of all ranks. The gather passes gradients
back to the rank that produced each embedding, so after DDP averages the
parameter gradients a step equals a one-process step on the global batch.
(Gathering with plain all_gather drops the gradient through the other ranks'
embeddings: the common bug.) Memory is O(n * N), never O(N^2 d).

    loss = nt_xent(z1, z2, temperature=0.1)   # z1, z2: (n, d) this rank's two views
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward returns this rank's slice of the
    gradient summed over every rank (each rank's loss depends on our rows)."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # sum over ranks of d(loss_r)/d(all rows)
        n = grad.shape[0] // dist.get_world_size()
        rank = dist.get_rank()
        return grad[rank * n:(rank + 1) * n]


def gather_with_grad(x):
    """Concatenate x (n, ...) from every rank -> (world * n, ...), rank order.
    Identity in a single process. Every rank must pass the same shape."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _GatherWithGrad.apply(x)
    return x


def _rank_and_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def contrastive_logits(z1, z2, temperature=0.1):
    """Logits and targets of NT-Xent for this rank's anchors.

    z1, z2: (n, d), the two views of this rank's n images (not necessarily
    normalised). Returns logits (2n, 2N) in float32, each anchor's own column
    set to -inf, and targets (2n,), the column of each anchor's positive.
    Columns are rank-major: rank r owns columns [2nr, 2n(r+1)), its z1 then its z2.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be (n, d), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    rank, _ = _rank_and_world()
    two_n = 2 * z1.shape[0]
    # Similarities in float32 even under bf16/fp16 autocast: exp(sim / 0.1) needs the range.
    with torch.autocast(device_type=z1.device.type, enabled=False):
        anchors = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2n, d), cosine similarity
        candidates = gather_with_grad(anchors)                     # (2N, d)
        logits = (anchors / temperature) @ candidates.T            # (2n, d) @ (d, 2N) -> (2n, 2N)
    k = torch.arange(two_n, device=z1.device)
    targets = rank * two_n + (k + two_n // 2) % two_n  # the other view of the same image
    # Anchor k's own column, rank * 2n + k, is not a candidate: those entries form the diagonal
    # at offset rank * 2n. Filled in place (the product is not needed for its backward, so no
    # (2n, 2N) copy is made) with a scalar (no host-to-device copy, which the host would wait for).
    logits.diagonal(offset=rank * two_n).fill_(float("-inf"))
    return logits, targets


def nt_xent(z1, z2, temperature=0.1):
    """NT-Xent (SimCLR eq. 1) for the local views z1, z2 of shape (n, d).

    Mean over all 2N anchors of the global batch; negatives come from every
    rank. In one process it is the plain loss. Returns a float32 scalar.
    """
    logits, targets = contrastive_logits(z1, z2, temperature)
    return F.cross_entropy(logits, targets)  # log-sum-exp inside: stable at small t


def contrast_accuracy(logits, targets):
    """Share of anchors whose positive scores highest among its 2N - 1 candidates."""
    return (logits.argmax(dim=1) == targets).float().mean()


def distillation_loss(student_logits, teacher_logits, temperature=1.0, labels=None, label_weight=0.0):
    """SimCLRv2's distillation loss (Chen et al. 2020b, Sec. 2.3, eqs. 2 and 3), mean over the batch:

        l_i = -sum_y P_T(y | x_i; t) log P_S(y | x_i; t)  +  label_weight * [x_i labelled] * -log P_S(y_i | x_i)

    with P(y | x; t) = softmax(logits / t) over the classes, the teacher's fixed (no gradient).
    Eq. 3 weighs the two sums (1 - a) and a: label_weight = (1 - a) / a gives the same loss up to
    the factor a. The labelled term is the plain cross-entropy (t = 1); as in eq. 3 it is a sum over
    the labelled images, so each counts in the batches it falls in, as every image does. Unlike the
    official colab (Hinton et al.'s t^2 factor), nothing multiplies the first term: at t = 1 they agree.

    student_logits, teacher_logits: (n, classes); labels: (n,) class indices, -1 where unknown.
    Computed in float32 whatever the autocast; under DDP the mean over each rank's batch, averaged
    by DDP's gradient averaging, is the mean over the global batch.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(f"student and teacher logits must both be (n, classes), got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        student, teacher = student_logits.float(), teacher_logits.detach().float()
        targets = F.softmax(teacher / temperature, dim=1)  # (n, C) soft labels
        loss = -(targets * F.log_softmax(student / temperature, dim=1)).sum(dim=1)  # (n,)
        if labels is not None and label_weight:
            known = labels >= 0
            labelled = F.cross_entropy(student, labels.clamp_min(0), reduction="none")  # (n,), 0 where unknown below
            loss = loss + label_weight * labelled * known
        return loss.mean()
