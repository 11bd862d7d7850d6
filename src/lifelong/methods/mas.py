"""Memory Aware Synapses (Aljundi et al., 2018): importance from the sensitivity of the network's output."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from lifelong.data.tensors import TaskData
from lifelong.methods.base import ContinualModule
from lifelong.methods.fisher import Batches, FisherSums, PerSampleSums, call_model, per_sample_grad_powers
from lifelong.methods.quadratic import QuadraticRegularizer, all_reduce_mean, check_strength


def _output_sq_norm(logits: Tensor) -> Tensor:
    """Per-sample squared L2 norm of the outputs, ``(B,)``, over the outputs the sample's head has.

    Logits outside the head (the task scenario masks them to the dtype's lowest value, see
    [`ContinualClassifier`][lifelong.models.module.ContinualClassifier]) are not outputs of the function and are left
    out.
    """
    valid = logits > torch.finfo(logits.dtype).min
    out = torch.where(valid, logits, 0)
    if out.dtype in (torch.float16, torch.bfloat16):
        out = out.float()
    return out.square().sum(-1)


def mas_sums(model: nn.Module, batches: Batches, *, params: Mapping[str, nn.Parameter] | None = None) -> FisherSums:
    """Sums over samples of ``|d ||f(x_n)||^2 / d theta|``, per sample and vectorised (as the Fisher is).

    For ``nn.Linear`` the magnitude of sample n's weight gradient ``g_n a_n^T`` is ``|g_n| |a_n|^T``, so the
    sum over a batch is one matmul ``|g|.T @ |a|``; ``nn.Conv2d`` uses per-sample gradients from grouped
    convolutions, anything else ``torch.func``. The model is in eval mode for the estimate.
    """
    if params is None:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with PerSampleSums(model, params) as est:
        for x, _, task, *_ in batches:
            est.start()
            with torch.enable_grad():
                objective = _output_sq_norm(call_model(model, x, task)).sum()
            used = est.used()
            if used:
                grads = torch.autograd.grad(objective, [out for _, _, out in used], allow_unused=True)
                for (module, a, _), g in zip(used, grads, strict=True):
                    if g is None:
                        continue
                    g = g.detach()
                    if isinstance(module, nn.Linear) and a.ndim == 2:
                        est.add_linear(module, g.abs(), a.abs())
                        continue
                    ones = torch.ones(a.shape[0], dtype=g.dtype, device=g.device)
                    est.add(module, per_sample_grad_powers(module, a, g, ones, power=1))
            if est.fallback:
                sub = {n: params[n].detach() for n in est.fallback}

                def one(p: dict[str, Tensor], xi: Tensor, ti: Tensor) -> Tensor:
                    args = (xi[None], ti[None]) if getattr(model, "takes_task", False) else (xi[None],)
                    return _output_sq_norm(functional_call(model, p, args, strict=False))[0]

                for n, gn in vmap(grad(one), in_dims=(None, 0, 0))(sub, x, task).items():
                    est.result.sums[n] += gn.abs().sum(0)
            est.result.count += int(x.shape[0])
    return est.result


def per_sample_loop_mas(
    model: nn.Module, batches: Batches, *, params: Mapping[str, nn.Parameter] | None = None
) -> FisherSums:
    """The same sums by one backward pass per sample: the reference `mas_sums` is tested against."""
    if params is None:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    names, tensors = list(params), list(params.values())
    result = FisherSums({n: torch.zeros_like(p) for n, p in params.items()})
    was_training = model.training
    model.eval()
    try:
        for x, _, task, *_ in batches:
            for n in range(x.shape[0]):
                with torch.enable_grad():
                    objective = _output_sq_norm(call_model(model, x[n : n + 1], task[n : n + 1]))[0]
                    for name, g in zip(names, torch.autograd.grad(objective, tensors), strict=True):
                        result.sums[name] += g.abs()
            result.count += int(x.shape[0])
    finally:
        model.train(was_training)
    return result


class MAS(QuadraticRegularizer):
    r"""Memory Aware Synapses (Aljundi et al., 2018).

    The importance of a parameter is the mean over the task's samples of $|\partial \|f(x)\|_2^2 /
    \partial\theta_i|$, where $f(x)$ are the outputs of the sample's head: it needs no labels, and is
    computed per sample in the same vectorised way as EWC's Fisher. As in the paper, importances add up over
    tasks and the anchor is the latest task's weights (``mode="online"``, ``decay=1``), and the loss is

    $$
    L(\theta) + \lambda \sum_i \Omega_i (\theta_i - \theta^*_i)^2
    $$

    (no 1/2: the paper's convention).

    Args:
        mas_lambda: strength $\lambda \geq 0$.
        num_samples: samples of the finished task to estimate on (random, seeded); ``None`` for all.
        mode: ``"online"`` (the paper) or ``"separate"``.
        decay: online mode's $\gamma$.
    """

    name = "mas"

    def __init__(
        self,
        mas_lambda: float = 1.0,
        num_samples: int | None = None,
        mode: str = "online",
        decay: float = 1.0,
        **trigger: Any,
    ) -> None:
        super().__init__(mode=mode, decay=decay, **trigger)
        if num_samples is not None and num_samples < 1:
            raise ValueError(f"method.num_samples must be a positive number or null, got {num_samples}")
        self.mas_lambda = check_strength("mas_lambda", mas_lambda)
        self.num_samples = num_samples

    @property
    def coefficient(self) -> float:
        return self.mas_lambda

    def importance_on(
        self, trainer: L.Trainer, module: ContinualModule, data: TaskData, params: Mapping[str, Tensor], key: int
    ) -> dict[str, Tensor]:
        dm = module.stream
        sums = mas_sums(module, dm.loader(data, train=False), params=params)  # type: ignore[arg-type]
        return all_reduce_mean(trainer, sums.sums, sums.count)
