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

Also the two optimizers of the fine-tuning stages (fine_tuning_optimizer): LARS with the
official fine-tuning's exclusions, or Nesterov SGD (the SimCLR v1 paper's protocol); and
backward_step, their backward pass and step, under fp16 loss scaling without making the host wait.
"""
import inspect
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
    def step(self, closure=None, update=None):
        """One LARS update of every parameter with a gradient.

        update: optional 0-d bool tensor on the parameters' device. Where it holds False
        the weights and momentum buffers stay exactly as they are: a training loop can
        skip a step with a non-finite loss without the host waiting for the device.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("LARS does not support sparse gradients")
            if params:
                _update = _update_foreach if _same_device(params) else _update_loop
                _update(params, [self._momentum_buffer(p) for p in params], group, update)
        return loss

    def _momentum_buffer(self, p):
        buf = self.state[p].get("momentum_buffer")
        if buf is None:
            buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        elif buf.device != p.device or buf.stride() != p.stride():
            # Loaded from a checkpoint before the model moved to the GPU, or into a channels_last
            # model: laid out like p once, so that the fused (foreach) update applies.
            buf = self.state[p]["momentum_buffer"] = torch.empty_like(p).copy_(buf)
        return buf


def _same_device(params):
    return len({(p.device, p.dtype) for p in params}) == 1


def _adapted(p, group):
    """Whether p gets weight decay and the trust ratio (biases and BN parameters do not)."""
    return not (group["exclude_1d"] and p.ndim <= 1)


def _gradients(params, update):
    """The gradients; those of a skipped step read as 0, so that NaN cannot leak into
    the buffers (NaN * 0 is NaN, a select is not)."""
    if update is None:
        return [p.grad for p in params]
    return [torch.where(update, p.grad, 0.0) for p in params]


def _rates(group, update, dtype):
    """(lr, momentum, keep): the group's numbers, or on a skipped step (update False)
    0-d tensors that make it v = 1 * v + 0 and w = w - 0 * v, decided on the device."""
    if update is None:
        return group["lr"], group["momentum"], None
    keep = update.to(dtype)
    return keep * group["lr"], torch.where(update, group["momentum"], 1.0).to(dtype), keep


def _update_foreach(params, buffers, group, update):
    """The update of the module docstring for all tensors at once, with torch's
    multi-tensor (_foreach) kernels: the same operations in the same order as
    _update_loop, so the same numbers, in a handful of launches instead of ~10 per tensor."""
    lr, momentum, keep = _rates(group, update, params[0].dtype)
    wd = group["weight_decay"]
    grads = _gradients(params, update)
    adapted = [i for i, p in enumerate(params) if _adapted(p, group)]
    plain = [i for i, p in enumerate(params) if not _adapted(p, group)]
    steps = [None] * len(params)  # lr * trust * g, per tensor
    if adapted:
        ps, gs = [params[i] for i in adapted], [grads[i] for i in adapted]
        if wd != 0:
            gs = torch._foreach_add(gs, ps, alpha=wd)
        if group["trust_ratio"]:
            w_norm, g_norm = torch.stack(torch._foreach_norm(ps)), torch.stack(torch._foreach_norm(gs))
            trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, torch.ones_like(w_norm))
            scaled = torch._foreach_mul(gs, list((trust * lr).unbind()))  # per-tensor 0-d factors: no host sync
        else:
            scaled = torch._foreach_mul(gs, lr)
        for i, s in zip(adapted, scaled):
            steps[i] = s
    if plain:
        for i, s in zip(plain, torch._foreach_mul([grads[i] for i in plain], lr)):
            steps[i] = s
    torch._foreach_mul_(buffers, momentum)
    torch._foreach_add_(buffers, steps)
    torch._foreach_sub_(params, buffers if keep is None else torch._foreach_mul(buffers, keep))


def _update_loop(params, buffers, group, update):
    """The same update, one tensor at a time (parameters spread over devices or dtypes)."""
    for p, v, g in zip(params, buffers, _gradients(params, update)):
        lr, momentum, keep = _rates(group, update, p.dtype)
        adapt = _adapted(p, group)
        if adapt and group["weight_decay"] != 0:
            g = g.add(p, alpha=group["weight_decay"])
        scale = lr
        if adapt and group["trust_ratio"]:
            w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
            trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, torch.ones_like(w_norm))
            scale = trust * lr  # a 0-d tensor: no host sync
        v.mul_(momentum).add_(g * scale)
        p.sub_(v if keep is None else v * keep)


def scaled_lr(lr, batch_size, scaling="linear"):
    """The peak learning rate for a global batch, as the official code's learning_rate_scaling:
    lr x batch/256 ("linear") or lr x sqrt(batch) ("sqrt")."""
    return lr * (batch_size / 256 if scaling == "linear" else math.sqrt(batch_size))


def warmup_cosine(step, total_steps, peak_lr, warmup_steps=0):
    """The paper's schedule, per step: linear warmup from 0 over warmup_steps, then cosine
    decay to 0 at total_steps (official code). warmup_steps=0: plain cosine decay."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------
# Fine-tuning (finetune.py, distill.py)

def fine_tuning_optimizer(name, params, classifier_params, lr, momentum=0.9, weight_decay=0.0, eta=0.001,
                          fused=False):
    """The optimizer of a fine-tuning stage over `params` (the network) and `classifier_params`
    (its linear classifier: weight, bias).

    "lars": the official fine-tuning's LARS (model_util.get_optimizer: weight decay and the trust
    ratio exclude 'batch_normalization', 'bias' and 'head_supervised'): every 1-D tensor and the
    whole classifier take plain momentum steps; the classifier's weight still gets the weight decay
    (the official code adds it to the loss instead, the same gradient). "sgd": torch's SGD with
    Nesterov momentum and weight decay on every parameter (the v1 paper's fine-tuning); fused=True
    takes the fused kernel (see fused_sgd_available)."""
    network, classifier = [p for p in params if p.requires_grad], list(classifier_params)
    if name == "lars":  # (no classifier_params: every tensor of 2 and more dimensions adapted, as the colab's)
        groups = [{"params": network}] + ([{"params": classifier, "trust_ratio": False}] if classifier else [])
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta)
    if name == "sgd":
        return torch.optim.SGD(network + classifier, lr=lr, momentum=momentum, nesterov=True,
                               weight_decay=weight_decay, **({"fused": True} if fused else {}))
    raise ValueError(f"unknown optimizer {name!r}; choose lars or sgd")


def fused_sgd_available(device):
    """Whether torch's fused SGD runs on `device` (torch >= 2.3 on CUDA, later also on the CPU):
    under fp16 loss scaling it takes the scaler's overflow flag into its kernel, so GradScaler.step
    skips an overflowed step on the device; with the plain SGD GradScaler.step waits for the host
    every step (it reads found_inf with .item()). The same update, up to rounding."""
    if "fused" not in inspect.signature(torch.optim.SGD).parameters:
        return False
    w = torch.zeros(1, device=device, requires_grad=True)
    w.grad = torch.zeros_like(w)
    try:  # tried: which devices have the fused kernel differs between versions
        torch.optim.SGD([w], lr=0.1, momentum=0.9, nesterov=True, fused=True).step()
    except (RuntimeError, NotImplementedError):
        return False
    return True


def gradients_finite(optimizer):
    """A 0-d bool tensor: whether every gradient is finite. The max-norm of a tensor is
    finite exactly when all its elements are (it cannot overflow as a 2-norm could)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return torch.isfinite(torch.stack(torch._foreach_norm(grads, float("inf")))).all()


def backward_step(loss, optimizer, scaler=None):
    """loss.backward() and the optimizer's step. With fp16 dynamic loss scaling (scaler) the scaled
    loss is back-propagated and a step whose gradients overflowed is skipped and the scale lowered:
    LARS skips it on the device (update=); another optimizer goes through GradScaler.step, on the
    device too for torch's fused SGD."""
    if scaler is None:
        loss.backward()
        optimizer.step()
        return
    scaler.scale(loss).backward()
    if isinstance(optimizer, LARS):
        scaler.unscale_(optimizer)  # the gradients divided by the scale, in place
        optimizer.step(update=gradients_finite(optimizer))  # the same on every rank: DDP averaged them
    else:
        scaler.step(optimizer)
    scaler.update()
