"""DWA's hard protection (``method.protection=hard``, lifelong's extension): what a finished task's masks use is held.

The paper protects earlier tasks softly (a Fisher-weighted loss on the masks), and its processor and generators,
shared by every task, move freely: docs/methods.md ("DWA: what lifelong implements") measures the masks of an
earlier task changing as much as the weights do, and the forgetting going through them. Held masks borrow
HAT's mechanics for DWA's per-sample masks: the masks are binary at test and a sigmoid of an annealed slope while
training, and once a task ends, every weight its training samples' binary masks use (and every output unit, for
the biases) gets no more gradient; with ``context=task`` its processor and generators are its own, so its masks
are exactly what they were; the stem, unmasked and shared, is held once the first task ends.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from lifelong.data.streams import stream_of
from lifelong.methods.base import ContinualModule
from lifelong.methods.dwa.net import DWANet
from lifelong.methods.quadratic import all_reduce_mean


class HeldMasks:
    """The union of the weights the finished tasks' masks use, and the gradient block that holds them.

    Args:
        s_max: the gate's largest slope (annealed from ``1 / s_max`` to ``s_max`` within each epoch, as HAT's).
    """

    def __init__(self, s_max: float = 400.0) -> None:
        if not s_max > 1:
            raise ValueError(f"method.s_max must be > 1, got {s_max}")
        self.s_max = float(s_max)
        self.used: list[Tensor] = []  # per masked layer, 0/1 over its weight: used by a finished task
        self.used_out: list[Tensor] = []  # per masked layer, 0/1 over its outputs (their biases)
        self.finished = 0  # tasks whose usage is recorded

    def slope(self, batch_idx: int, num_batches: float) -> float:
        """The gate's slope at batch ``batch_idx`` of an epoch of ``num_batches``."""
        n = max(int(num_batches), 2)
        return 1 / self.s_max + (self.s_max - 1 / self.s_max) * min(batch_idx, n - 1) / (n - 1)

    @torch.no_grad()
    def record(self, trainer: L.Trainer, module: ContinualModule, net: DWANet, task: int) -> float:
        """Add what ``task``'s training samples' binary masks use (every rank's shard); returns the fraction of
        the masked weights used so far."""
        stream = stream_of(trainer)
        sums: dict[str, Tensor] = {}
        count = 0
        was = module.training
        module.eval()  # binary masks
        try:
            for batch in stream.loader(stream.train_data(task), train=False):
                module(batch.x, batch.task)
                assert net.embedding is not None
                for i, layer in enumerate(net.masked):
                    used, used_out = layer.usage(net.embedding, net.context.task)
                    for key, value in ((f"w{i}", used), (f"o{i}", used_out)):
                        sums[key] = torch.maximum(sums[key], value) if key in sums else value
                count += batch.x.shape[0]
        finally:
            module.train(was)
        union = {k: v.gt(0).to(v.dtype) for k, v in all_reduce_mean(trainer, sums, count).items()}
        if not self.used:
            self.used = [torch.zeros_like(layer.weight) for layer in net.masked]
            self.used_out = [torch.zeros(layer.weight.shape[0], device=layer.weight.device) for layer in net.masked]
        self.used = [torch.maximum(u, union[f"w{i}"]) for i, u in enumerate(self.used)]
        self.used_out = [torch.maximum(u, union[f"o{i}"]) for i, u in enumerate(self.used_out)]
        self.finished += 1
        return float(sum(u.sum() for u in self.used) / sum(u.numel() for u in self.used))

    @torch.no_grad()
    def block(self, net: DWANet) -> None:
        """Zero the gradients of what the finished tasks use (before the optimizer's step)."""
        if not self.finished:
            return
        for layer, used, used_out in zip(net.masked, self.used, self.used_out, strict=True):
            if layer.weight.grad is not None:
                layer.weight.grad.mul_(1 - used)
            if layer.bias is not None and layer.bias.grad is not None:
                layer.bias.grad.mul_(1 - used_out)
        for p in net.components()["stem"]:
            if p.grad is not None:
                p.grad.zero_()

    def to(self, device: torch.device) -> None:
        self.used = [u.to(device) for u in self.used]
        self.used_out = [u.to(device) for u in self.used_out]

    def state_dict(self) -> dict[str, Any]:
        return {
            "used": [u.cpu() for u in self.used],
            "used_out": [u.cpu() for u in self.used_out],
            "finished": self.finished,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.used = list(state["used"])
        self.used_out = list(state["used_out"])
        self.finished = int(state["finished"])
