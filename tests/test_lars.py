"""LARS against the official update computed by hand in numpy, with a changing
learning rate (which enters the momentum buffer) and the 1-D exclusions."""
import copy

import numpy as np
import pytest
import torch

from lars import LARS


def official_update(w, v, g, lr, momentum, wd, eta, adapt):
    """lars_optimizer.py (classic momentum), one tensor, float64."""
    if adapt:
        g = g + wd * w
        w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
        trust = eta * w_norm / g_norm if (w_norm > 0 and g_norm > 0) else 1.0
    else:
        trust = 1.0
    v = momentum * v + lr * trust * g
    return w - v, v


def _grads(step):
    rng = np.random.default_rng(100 + step)
    return rng.normal(size=(3, 4)), rng.normal(size=4)


def test_matches_official_update_with_changing_lr():
    rng = np.random.default_rng(0)
    w0, b0 = rng.normal(size=(3, 4)), rng.normal(size=4)
    weight = torch.nn.Parameter(torch.tensor(w0))
    bias = torch.nn.Parameter(torch.tensor(b0))
    opt = LARS([weight, bias], lr=0.0, momentum=0.9, weight_decay=0.1, eta=0.01)
    w, b, vw, vb = w0.copy(), b0.copy(), np.zeros_like(w0), np.zeros_like(b0)
    for step, lr in enumerate([0.5, 2.0, 0.1, 1.0]):
        gw, gb = _grads(step)
        weight.grad, bias.grad = torch.tensor(gw), torch.tensor(gb)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        w, vw = official_update(w, vw, gw, lr, 0.9, 0.1, 0.01, adapt=True)
        b, vb = official_update(b, vb, gb, lr, 0.9, 0.1, 0.01, adapt=False)  # 1-D: no decay, no trust
        np.testing.assert_allclose(weight.detach().numpy(), w, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(bias.detach().numpy(), b, rtol=1e-12, atol=1e-12)


def test_lr_inside_momentum_differs_from_sgd_convention():
    # torch.optim.SGD keeps v = m v + g and steps lr * v: with a changing lr the
    # two conventions part. Ours must follow the official one (checked above).
    p = torch.nn.Parameter(torch.tensor([1.0, 1.0], dtype=torch.float64))
    q = torch.nn.Parameter(p.detach().clone())
    ours = LARS([p], lr=1.0, weight_decay=0.0)
    sgd = torch.optim.SGD([q], lr=1.0, momentum=0.9)
    for lr in (1.0, 0.1):
        for opt in (ours, sgd):
            opt.param_groups[0]["lr"] = lr
        p.grad = torch.tensor([1.0, 2.0], dtype=torch.float64)
        q.grad = p.grad.clone()
        ours.step()
        sgd.step()
    # ours: v1 = g, v2 = 0.9 g + 0.1 g = g -> p = 1 - 2g ; sgd: 1 - g - 0.1 * 1.9 g
    np.testing.assert_allclose(p.detach().numpy(), [1 - 2 * 1.0, 1 - 2 * 2.0])
    assert not torch.allclose(p, q)


def test_zero_norm_gives_trust_one():
    p = torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    opt = LARS([p], lr=0.5, weight_decay=0.0, eta=0.001)
    p.grad = torch.ones(2, 2, dtype=torch.float64)
    opt.step()  # ||w|| = 0: trust 1, plain lr * g
    np.testing.assert_allclose(p.detach().numpy(), -0.5 * np.ones((2, 2)))
    p2 = torch.nn.Parameter(torch.ones(2, 2, dtype=torch.float64))
    opt2 = LARS([p2], lr=0.5, weight_decay=0.0)
    p2.grad = torch.zeros(2, 2, dtype=torch.float64)
    opt2.step()  # ||g|| = 0: nothing moves, no division by zero
    np.testing.assert_allclose(p2.detach().numpy(), np.ones((2, 2)))


def test_group_overrides():
    rng = np.random.default_rng(1)
    b0, w0 = rng.normal(size=3), rng.normal(size=(2, 3))
    bias = torch.nn.Parameter(torch.tensor(b0))
    head = torch.nn.Parameter(torch.tensor(w0))
    opt = LARS([{"params": [bias], "exclude_1d": False},          # 1-D, but adapted here
                {"params": [head], "trust_ratio": False, "weight_decay": 0.0}],  # plain momentum
               lr=0.3, weight_decay=0.05, eta=0.02)
    gb, gw = rng.normal(size=3), rng.normal(size=(2, 3))
    bias.grad, head.grad = torch.tensor(gb), torch.tensor(gw)
    opt.step()
    eb, _ = official_update(b0, 0.0, gb, 0.3, 0.9, 0.05, 0.02, adapt=True)
    np.testing.assert_allclose(bias.detach().numpy(), eb, rtol=1e-12)
    np.testing.assert_allclose(head.detach().numpy(), w0 - 0.3 * gw, rtol=1e-12)


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    x, target = torch.randn(8, 4), torch.randn(8, 3)

    def step(m, opt):
        opt.zero_grad()
        (m(x) - target).pow(2).sum().backward()
        opt.step()

    opt = LARS(model.parameters(), lr=0.1)
    step(model, opt)
    clone = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    clone.load_state_dict(model.state_dict())
    opt2 = LARS(clone.parameters(), lr=0.1)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if read from a file
    step(model, opt)
    step(clone, opt2)
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)


def test_rejects_bad_settings():
    with pytest.raises(ValueError):
        LARS([torch.nn.Parameter(torch.ones(2))], lr=-1.0)


def test_warmup_cosine_schedule():
    from lars import warmup_cosine
    assert warmup_cosine(0, 100, 4.8, warmup_steps=10) == 0.0  # from 0, as the official code
    assert warmup_cosine(5, 100, 4.8, warmup_steps=10) == pytest.approx(2.4)
    assert warmup_cosine(10, 100, 4.8, warmup_steps=10) == pytest.approx(4.8)
    assert warmup_cosine(55, 100, 4.8, warmup_steps=10) == pytest.approx(2.4)  # halfway down the cosine
    assert warmup_cosine(100, 100, 4.8, warmup_steps=10) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(25, 100, 1.0) == pytest.approx(0.5 * (1 + np.cos(np.pi / 4)))  # no warmup


def test_buffers_loaded_from_a_checkpoint_take_the_parameters_layout():
    """pretrain.py loads the optimizer state while the model is still on the CPU and contiguous,
    then moves it to the GPU in channels_last: the buffers follow the parameters (on CUDA a CPU
    buffer would break the update; here the layout is the visible part)."""
    model = _model_and_grads(0)
    opt = LARS(model.parameters(), lr=0.5)
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    for s in state["state"].values():  # as read from a file: contiguous
        s["momentum_buffer"] = s["momentum_buffer"].contiguous()
    assert not state["state"][0]["momentum_buffer"].is_contiguous(memory_format=torch.channels_last)
    clone = copy.deepcopy(model)
    for a, b in zip(model.parameters(), clone.parameters()):
        b.grad = a.grad.clone()
    opt2 = LARS(clone.parameters(), lr=0.5)
    opt2.load_state_dict(state)
    opt.step()
    opt2.step()
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b) and opt2.state[b]["momentum_buffer"].stride() == b.stride()
    assert clone[0].weight.is_contiguous(memory_format=torch.channels_last)


def _model_and_grads(seed):
    """A small conv net (4-D, 2-D and 1-D tensors, one channels_last) with random gradients."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
                                torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4))
    model[0].to(memory_format=torch.channels_last)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model


def test_multi_tensor_update_equals_the_loop_bitwise():
    from lars import _update_foreach, _update_loop
    fast, slow = _model_and_grads(0), _model_and_grads(0)
    opts = [LARS(m.parameters(), lr=0.7, weight_decay=0.01, eta=0.02) for m in (fast, slow)]
    for step, lr in enumerate([0.5, 2.0, 0.1]):
        for m, opt, update in ((fast, opts[0], _update_foreach), (slow, opts[1], _update_loop)):
            for p in m.parameters():
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step + p.numel()))
            group = opt.param_groups[0]
            group["lr"] = lr
            params = list(m.parameters())
            with torch.no_grad():
                update(params, [opt._momentum_buffer(p) for p in params], group, None)
        for a, b in zip(fast.parameters(), slow.parameters()):
            assert torch.equal(a, b)
    assert all(torch.equal(opts[0].state[a]["momentum_buffer"], opts[1].state[b]["momentum_buffer"])
               for a, b in zip(fast.parameters(), slow.parameters()))


@pytest.mark.parametrize("foreach", [True, False])
def test_a_skipped_step_changes_nothing_even_with_nan_gradients(monkeypatch, foreach):
    import lars
    if not foreach:
        monkeypatch.setattr(lars, "_same_device", lambda params: False)
    model, twin = _model_and_grads(1), _model_and_grads(1)
    opt, twin_opt = LARS(model.parameters(), lr=0.5), LARS(twin.parameters(), lr=0.5)
    opt.step(update=torch.tensor(True))  # as update=None, bitwise
    twin_opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b) and torch.equal(opt.state[a]["momentum_buffer"], twin_opt.state[b]["momentum_buffer"])
    before = [(p.detach().clone(), opt.state[p]["momentum_buffer"].clone()) for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    opt.step(update=torch.tensor(False))
    for p, (w, v) in zip(model.parameters(), before):
        assert torch.equal(p, w) and torch.equal(opt.state[p]["momentum_buffer"], v)
