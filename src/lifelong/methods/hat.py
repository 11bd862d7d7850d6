"""Hard Attention to the Task (Serra et al., 2018): per-task masks over units that protect earlier tasks."""

from __future__ import annotations

import itertools
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lifelong.data.streams import TaskStream
from lifelong.data.tensors import Batch
from lifelong.methods.base import (
    ContinualMethod,
    ContinualModule,
    module_of,
    refuse_normalisation,
    require_task_scenario,
    wrapped_net,
)


class HATNet(nn.Module):
    """A network whose hidden units (Linear outputs, Conv2d channels) are gated by a mask of each task.

    Every hidden layer ``l`` (every Linear and Conv2d layer but the last, the output) gets a learnable
    embedding ``e_l[t]`` per task; its outputs are multiplied by ``sigmoid(s * e_l[t])`` while training (``s``
    annealed by `HAT`) and by the binary ``e_l[t] > 0`` in eval mode. Masking a layer's output before
    its ReLU, dropout or max-pool equals masking after it (the gates are non-negative), so the wrapped
    network is used unchanged. The layers must form a chain (each one's inputs are the previous one's
    outputs, possibly flattened), as in the MLP, the CNN and the AlexNet-style network; networks with
    normalisation layers (whose statistics all tasks would share) are refused.

    Args:
        net: the network.
        num_tasks: the number of tasks (rows of each embedding).
        s_max: the sigmoid's largest slope.
    """

    takes_task = True

    def __init__(self, net: nn.Module, num_tasks: int, s_max: float = 400.0) -> None:
        super().__init__()
        refuse_normalisation("hat", net)
        layers = [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        if len(layers) < 2:
            raise ValueError("method=hat needs a network with at least one hidden Linear or Conv2d layer")
        self.net = net
        self.hidden: list[nn.Linear | nn.Conv2d] = layers[:-1]
        self.output = layers[-1]
        self.s_max = float(s_max)
        self.s = float(s_max)
        self.embeddings = nn.ParameterList(
            nn.Parameter(torch.randn(num_tasks, _units(layer))) for layer in self.hidden
        )  # N(0, 1), as the paper's nn.Embedding
        feeds = [_check_chain(a, b) for a, b in itertools.pairwise(layers)]  # also checks the output layer's
        self.expand = [1, *feeds[:-1]]  # hidden layer i's inputs per unit of layer i - 1
        self._gates: list[Tensor] | None = None
        for i, layer in enumerate(self.hidden):
            layer.register_forward_hook(self._gate_hook(i))

    def _gate_hook(self, i: int):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
            if self._gates is None:
                return None
            gate = self._gates[i]
            return output * (gate.view(*gate.shape, 1, 1) if output.ndim == 4 else gate)

        return hook

    def masks(self, task: Tensor | int, s: float | None = None, binary: bool = False) -> list[Tensor]:
        """Each hidden layer's gates for ``task`` (an int, or one per sample): ``(units,)`` or ``(B, units)``."""
        index = torch.as_tensor(task, device=self.embeddings[0].device)
        if binary:
            return [(e[index] > 0).to(e.dtype) for e in self.embeddings]
        slope = self.s if s is None else s
        return [torch.sigmoid(slope * e[index]) for e in self.embeddings]

    def forward(self, x: Tensor, task: Tensor) -> Tensor:
        self._gates = self.masks(task, binary=not self.training)
        try:
            return self.net(x)
        finally:
            self._gates = None


def _units(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels  # type: ignore[return-value]


def _check_chain(a: nn.Module, b: nn.Module) -> int:
    """How many inputs of ``b`` each output unit of ``a`` feeds (1, or the spatial size after a flatten)."""
    units = _units(a)
    inputs = int(b.in_features if isinstance(b, nn.Linear) else b.in_channels)  # type: ignore[arg-type]
    if isinstance(a, nn.Conv2d) and isinstance(b, nn.Linear) and inputs % units == 0:
        return int(inputs // units)
    if inputs == units:
        return 1
    raise ValueError(
        f"method=hat needs the Linear/Conv2d layers to form a chain: {type(b).__name__} takes {inputs} inputs "
        f"after a {type(a).__name__} with {units} outputs"
    )


class HAT(ContinualMethod):
    r"""Hard Attention to the Task (Serra, Suris, Miron & Karatzoglou, 2018); the task scenario only.

    The network is wrapped in a `HATNet` (per-task unit masks). While task $t$ trains:

    * the masks' slope is annealed within every epoch, $s = 1/s_{max} + (s_{max} - 1/s_{max})
      \frac{b - 1}{B - 1}$ at batch $b$ of $B$;
    * the gradient of a weight between units used by earlier tasks is blocked: it is multiplied by
      $1 - \min(a^{<t}_{out}, a^{<t}_{in})$, where $a^{<t}$ is the union of the earlier tasks'
      binary masks (so the units an earlier task uses keep their incoming weights);
    * the embeddings' gradients are compensated for the annealing, $\times\, s_{max}(\cosh(s e) + 1) /
      (s(\cosh(e) + 1))$, and the embeddings are clamped to $\pm 6$;
    * the loss gains $c \sum_l \sum_i a^t_{l,i} (1 - a^{<t}_{l,i}) / \sum_l \sum_i (1 - a^{<t}_{l,i})$,
      which keeps the new task's mask small where units are still free.

    At test the masks are binary (the embeddings' signs), so an earlier task's function - its units, their
    incoming weights, its head - is exactly what it was: its accuracy does not move as later tasks train.
    That needs an optimizer that leaves parameters with zero gradients in place: Adam or SGD without weight
    decay, with their state cleared at each task start (``reset_optimizer=true``, checked).

    Args:
        s_max: the largest slope (400 in the paper).
        hat_c: the mask regulariser's strength $c$ (0.75 in the paper).
        clamp: the embeddings' bound (6).
    """

    name = "hat"

    def __init__(self, s_max: float = 400.0, hat_c: float = 0.75, clamp: float = 6.0) -> None:
        super().__init__()
        if not s_max > 1:
            raise ValueError(f"method.s_max must be > 1, got {s_max}")
        if not hat_c >= 0:
            raise ValueError(f"method.hat_c must be >= 0, got {hat_c}")
        self.s_max = float(s_max)
        self.hat_c = float(hat_c)
        self.clamp = float(clamp)
        self.previous: list[Tensor] = []  # per hidden layer, the union of the finished tasks' binary masks

    @override
    def configure_network(self, net: nn.Module, stream: TaskStream) -> nn.Module:
        require_task_scenario("hat", stream, "its masks are chosen by the task identity")
        return HATNet(net, stream.num_tasks, self.s_max)

    def _net(self, module: L.LightningModule | ContinualModule) -> HATNet:
        return wrapped_net(module, HATNet, "hat")

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        net = self._net(pl_module)
        if not module_of(pl_module).reset_optimizer:
            raise ValueError(
                "method=hat needs reset_optimizer=true: momentum from a task would move its frozen weights"
            )
        if not self.previous:
            self.previous = [torch.zeros(e.shape[1]) for e in net.embeddings]

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.previous = [p.to(pl_module.device) for p in self.previous]

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        net = self._net(pl_module)
        n = max(int(trainer.num_training_batches), 2)
        net.s = 1 / self.s_max + (self.s_max - 1 / self.s_max) * min(batch_idx, n - 1) / (n - 1)

    @override
    def penalty(self, module: ContinualModule, batch: Batch, outputs: Tensor) -> Tensor | None:
        if self.hat_c == 0:
            return None
        net = self._net(module)
        masks = net.masks(batch.task[:1])  # the batch's task (one task per training batch)
        used = torch.stack([(m[0] * (1 - p)).sum() for m, p in zip(masks, self.previous, strict=True)]).sum()
        free = torch.stack([(1 - p).sum() for p in self.previous]).sum()
        return self.hat_c * used / free.clamp_min(1)

    @override
    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Optimizer) -> None:
        net = self._net(pl_module)
        pre: Tensor | None = None
        for layer, post, expand in zip(net.hidden, self.previous, net.expand, strict=True):
            keep_out = 1 - post
            if layer.weight.grad is not None:
                if pre is None:
                    factor = keep_out.view(-1, *[1] * (layer.weight.ndim - 1))
                else:
                    inputs = pre.repeat_interleave(expand) if expand > 1 else pre
                    shape_in = (1, -1, *[1] * (layer.weight.ndim - 2))
                    factor = 1 - torch.minimum(post.view(-1, *[1] * (layer.weight.ndim - 1)), inputs.view(shape_in))
                layer.weight.grad.mul_(factor)
            if layer.bias is not None and layer.bias.grad is not None:
                layer.bias.grad.mul_(keep_out)
            pre = post
        s = net.s
        for e in net.embeddings:  # the paper's compensation, with its bound on cosh's argument
            if e.grad is not None:
                e.grad.mul_(self.s_max / s * (torch.cosh((s * e).clamp(-50, 50)) + 1) / (torch.cosh(e) + 1))

    @override
    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        for e in self._net(pl_module).embeddings:
            e.clamp_(-self.clamp, self.clamp)

    @override
    def on_task_end(self, trainer: L.Trainer, module: ContinualModule, task: int, last: bool) -> None:
        """The finished task's units join those earlier tasks use (their incoming weights are frozen from now)."""
        masks = self._net(module).masks(task, binary=True)
        self.previous = [torch.maximum(p, m) for p, m in zip(self.previous, masks, strict=True)]
        used = sum(int(p.sum()) for p in self.previous) / sum(p.numel() for p in self.previous)
        module.log_event({"hat/units_used": used})

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"previous": [p.cpu() for p in self.previous]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.previous = list(state_dict["previous"])
