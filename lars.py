"""LARS optimizer, the variant of the official SimCLR code (lars_optimizer.py,
'classic momentum'), used for pretraining (Chen et al. 2020, Sec. B.1).

Per tensor w with gradient g:
    g     = g + weight_decay * w                          (unless excluded)
    trust = eta * ||w|| / ||g||  (1 if either norm is 0)  (unless excluded)
    v     = momentum * v + lr * trust * g
    w     = w - v
The learning rate sits inside the momentum buffer (not outside, as in
torch.optim.SGD), so a changing learning rate acts as in the official code.
Tensors with one dimension (biases, BN gammas and betas) are excluded from
weight decay and from the trust ratio by default, as the official code
excludes 'bias' and 'batch_normalization' variables. A parameter group can
override this with its own "exclude_1d", "weight_decay" or "trust_ratio" keys.

    optimizer = LARS(model.parameters(), lr=4.8, weight_decay=1e-6)
    lr = warmup_cosine(step, total_steps, peak_lr=4.8, warmup_steps=10 * steps_per_epoch)
"""
import math

import torch
from torch.optim import Optimizer


class LARS(Optimizer):
    """LARS with the official SimCLR update (see module docstring).

    Group options: lr, momentum, weight_decay, eta; exclude_1d (default True:
    1-D tensors get neither weight decay nor trust ratio); trust_ratio
    (default True: False turns the group into momentum SGD with the same
    buffer convention, e.g. for a linear classifier).
    """

    def __init__(self, params, lr, momentum=0.9, weight_decay=1e-6, eta=0.001,
                 exclude_1d=True, trust_ratio=True):
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"invalid LARS setting: lr={lr} momentum={momentum} "
                             f"weight_decay={weight_decay} eta={eta}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                        exclude_1d=exclude_1d, trust_ratio=trust_ratio)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                g = p.grad
                adapt = not (group["exclude_1d"] and p.ndim <= 1)
                if adapt and group["weight_decay"] != 0:
                    g = g.add(p, alpha=group["weight_decay"])
                scale = group["lr"]
                if adapt and group["trust_ratio"]:
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    trust = torch.where((w_norm > 0) & (g_norm > 0),
                                        group["eta"] * w_norm / g_norm, torch.ones_like(w_norm))
                    scale = trust * group["lr"]  # a 0-d tensor: no host sync
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                v = state["momentum_buffer"]
                v.mul_(group["momentum"]).add_(g * scale)
                p.sub_(v)
        return loss


def warmup_cosine(step, total_steps, peak_lr, warmup_steps=0):
    """The paper's schedule, per step: linear warmup from 0 over warmup_steps, then cosine
    decay to 0 at total_steps (official code). warmup_steps=0: plain cosine decay."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
