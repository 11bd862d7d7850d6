"""EWC's penalty, consolidation and state, on tiny tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lifelong.errors import ResumeError
from lifelong.methods import EWC


class Holder(nn.Module):
    """Stands in for the LightningModule: EWC only reads ``named_parameters``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)


def _rand_like(p: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.rand(p.shape, generator=torch.Generator().manual_seed(seed), dtype=p.dtype)


def _task_end(ewc: EWC, module: nn.Module, seed: int) -> tuple[dict, dict]:
    """Consolidate a random Fisher at the module's current weights, then move the weights."""
    params = dict(module.named_parameters())
    fisher = {n: _rand_like(p, seed + i) for i, (n, p) in enumerate(params.items())}
    anchor = {n: p.detach().clone() for n, p in params.items()}
    ewc.consolidate(fisher, params)
    with torch.no_grad():
        for i, p in enumerate(module.parameters()):
            p.add_(_rand_like(p, 100 + seed + i) - 0.5)
    return fisher, anchor


def _quadratic(module: nn.Module, terms: list[tuple[dict, dict]]) -> torch.Tensor:
    params = dict(module.named_parameters())
    return sum(((f[n] * (params[n] - a[n]).square()).sum() for f, a in terms for n in params), torch.zeros(()))


def test_no_penalty_before_the_first_task_end():
    ewc, module = EWC(), Holder()
    assert ewc.penalty_value(module) is None
    assert ewc.penalty(module, None, None) is None  # EWC never adds a loss term: it adds its gradient directly


def _penalty_grad(ewc: EWC, module: nn.Module, scale: float = 1.0) -> list[torch.Tensor]:
    module.zero_grad(set_to_none=True)
    ewc.add_penalty_grad(module, scale)
    return [p.grad.clone() for p in module.parameters()]


def test_separate_penalty_value_and_gradient_match_the_sum_over_tasks():
    torch.manual_seed(0)
    module, lam = Holder(), 7.0
    ewc = EWC(ewc_lambda=lam, mode="separate")
    terms = [_task_end(ewc, module, seed=10 * k) for k in range(3)]
    expected = lam / 2 * _quadratic(module, terms)  # the paper's lambda/2 convention
    torch.testing.assert_close(ewc.penalty_value(module), expected.detach(), rtol=1e-6, atol=1e-7)
    g_exp = torch.autograd.grad(expected, list(module.parameters()))
    for a, b in zip(_penalty_grad(ewc, module), g_exp, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # added to what backward left (scaled, e.g. by 1/accumulate_grad_batches), not written over it
    module.zero_grad(set_to_none=True)
    for p in module.parameters():
        p.grad = torch.ones_like(p)
    ewc.add_penalty_grad(module, scale=0.25)
    for p, b in zip(module.parameters(), g_exp, strict=True):
        torch.testing.assert_close(p.grad, 1 + 0.25 * b, rtol=1e-5, atol=1e-6)


def test_penalty_is_zero_at_a_single_anchor():
    """Exactly zero, not zero up to round-off: Adam scales each parameter's gradient by its own running size,
    so round-off where the true gradient is zero (``Omega * theta - Omega * theta-bar``) becomes full steps
    away from the anchor. With that form EWC lost 1.4 points on permuted Fashion-MNIST (docs/experiments.md)."""
    module = Holder()
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(37.0)
    ewc = EWC(ewc_lambda=5.0)
    params = dict(module.named_parameters())
    ewc.consolidate({n: 10 ** (4 * torch.rand(p.shape)) for n, p in params.items()}, params)
    assert ewc.penalty_value(module).item() == 0.0
    for g in _penalty_grad(ewc, module):
        assert torch.equal(g, torch.zeros_like(g))


def test_online_decay_over_three_task_ends():
    module, lam, gamma = Holder(), 3.0, 0.5
    ewc = EWC(ewc_lambda=lam, mode="online", decay=gamma)
    (f1, _), (f2, _), (f3, a3) = (_task_end(ewc, module, seed=s) for s in (1, 2, 3))
    omega = {n: gamma**2 * f1[n] + gamma * f2[n] + f3[n] for n in f1}
    expected = lam / 2 * _quadratic(module, [(omega, a3)])  # anchored at the latest task only
    torch.testing.assert_close(ewc.penalty_value(module), expected.detach(), rtol=1e-6, atol=1e-7)
    g_exp = torch.autograd.grad(expected, list(module.parameters()))
    for a, b in zip(_penalty_grad(ewc, module), g_exp, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ewc.state_dict()["importance"]["lin.weight"], omega["lin.weight"])


def test_state_does_not_grow_with_tasks():
    module = Holder()
    ewc = EWC()
    _task_end(ewc, module, 0)
    size = sum(t.numel() for d in (ewc._importance, ewc._anchor) for t in d.values())
    for k in range(1, 50):
        _task_end(ewc, module, k)
    assert sum(t.numel() for d in (ewc._importance, ewc._anchor) for t in d.values()) == size
    assert ewc._num_consolidated == 50


def test_state_dict_round_trip():
    module = Holder()
    ewc = EWC(ewc_lambda=2.0)
    for s in range(2):
        _task_end(ewc, module, s)
    state = ewc.state_dict()
    assert all(t.device.type == "cpu" for t in state["importance"].values())
    fresh = EWC(ewc_lambda=2.0)
    fresh.load_state_dict(state)
    assert fresh._num_consolidated == 2
    torch.testing.assert_close(fresh.penalty_value(module), ewc.penalty_value(module))
    for a, b in zip(_penalty_grad(fresh, module), _penalty_grad(ewc, module), strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ResumeError, match="mode"):
        EWC(mode="online").load_state_dict(state)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ewc_lambda": -1.0}, "ewc_lambda"),
        ({"ewc_lambda": float("nan")}, "ewc_lambda"),
        ({"fisher_type": "true"}, "fisher_type"),
        ({"mode": "merged"}, "mode"),
        ({"decay": 1.5}, "decay"),
        ({"num_samples": 0}, "num_samples"),
    ],
)
def test_refuses_impossible_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EWC(**kwargs)
