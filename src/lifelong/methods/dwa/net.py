"""The network DWA trains: a stem, a context processor that embeds each input, and masked layers."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import cast

import torch
from torch import Tensor, nn

from lifelong.methods.base import refuse_normalisation
from lifelong.methods.dwa.layers import (
    CONTEXTS,
    MaskedConv2d,
    MaskedLinear,
    MaskOptions,
    PerTask,
    _Context,
    _MaskedLayer,
    check_choice,
    check_gate,
    check_sparsity,
)


class ContextProcessor(nn.Module):
    """Maps the stem's features to the context embedding ``E = gate(...)`` ``(B, emb_size)``.

    Conv features ``(C, H, W)``: a 2x2 max-pool when the map is at least 14 wide, Conv2d(C, F_B, 1x1), ReLU,
    Conv2d(F_B, F_E, 3x3, stride 2, padding 1), ReLU, flatten, Linear(-> emb_size). Flat features ``(D,)``:
    Linear(D, F_B), ReLU, Linear(F_B, F_E), ReLU, Linear(F_E, emb_size). The gate on top.
    """

    def __init__(self, feature_shape: Sequence[int], emb_size: int, features: Sequence[int], gate: str) -> None:
        super().__init__()
        f_b, f_e = (int(f) for f in features)
        self.gate = gate
        if len(feature_shape) == 3:
            c, h, w = feature_shape
            pool = w >= 14
            size_h, size_w = (h // 2, w // 2) if pool else (h, w)
            out_h, out_w = (size_h - 1) // 2 + 1, (size_w - 1) // 2 + 1
            self.layers = nn.Sequential(
                nn.MaxPool2d(2) if pool else nn.Identity(),
                nn.Conv2d(c, f_b, 1),
                nn.ReLU(),
                nn.Conv2d(f_b, f_e, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(f_e * out_h * out_w, emb_size),
            )
        else:
            d = math.prod(feature_shape)
            self.layers = nn.Sequential(
                nn.Flatten(),
                nn.Linear(d, f_b),
                nn.ReLU(),
                nn.Linear(f_b, f_e),
                nn.ReLU(),
                nn.Linear(f_e, emb_size),
            )

    def forward(self, features: Tensor) -> Tensor:
        raw = self.layers(features)
        return torch.tanh(raw) if self.gate == "tanh" else torch.sigmoid(raw)  # (B, emb_size)


class DWANet(nn.Module):
    """A network whose Linear/Conv2d layers after the stem compute with per-sample weight masks.

    The network's Linear and Conv2d layers, in order: the first ``stem_layers`` run as they are; a
    `ContextProcessor` maps the input of the first masked layer (the stem's features, after its
    activation and pooling) to the embedding ``E``; every later layer but the output is replaced by a
    `MaskedLinear` or `MaskedConv2d` (same parameters, same names) whose masks are generated
    from ``E``; the output layer (all tasks' heads; the task scenario picks each sample's) is not masked.
    The layers must form a chain as in the MLP, the CNN and the AlexNet-style network; networks with
    normalisation layers (whose statistics all tasks would share) are refused.

    Args:
        net: the network.
        input_shape: the shape of one input (to size the processor).
        stem_layers: Linear/Conv2d layers run unmasked before the processor.
        emb_size: the embedding's size.
        processor_features: ``(F_B, F_E)``, the processor's widths.
        gate: ``"tanh"`` (the paper) or ``"sigmoid"`` (the code's default) for masks and embedding.
        sparsity: what the sparsity term counts as a mask's activity, ``"paper"`` or ``"code"`` (see
            `mask_activity`).
        mask_form: ``"full"`` (the paper's generators) or ``"factored"`` (an output gate times an input gate per
            sample: see `_MaskedLayer`).
        context: ``"shared"`` (the paper's: one processor and one set of generators for every task) or ``"task"``
            (one of each per task, picked by the sample's task: a finished task's masks cannot change).
        num_tasks: the stream's tasks (for ``context="task"``).
        binary: binary masks ``1(raw > 0)`` in eval mode (what ``protection=hard`` tests with).
        chunk_elements: the most mask entries (``B x |W|``) one layer computes at once (see
            `_MaskedLayer`).
        paper_init: initialise the network's layers as the paper does: He-normal for convolutions,
            Xavier-uniform for dense layers, zero biases.
    """

    takes_task = True

    def __init__(
        self,
        net: nn.Module,
        input_shape: Sequence[int],
        stem_layers: int = 1,
        emb_size: int = 100,
        processor_features: Sequence[int] = (32, 128),
        gate: str = "tanh",
        chunk_elements: int = 2**24,
        paper_init: bool = True,
        sparsity: str = "paper",
        mask_form: str = "full",
        context: str = "shared",
        num_tasks: int = 1,
        binary: bool = False,
    ) -> None:
        super().__init__()
        check_gate(gate)
        check_sparsity(sparsity)
        per_task = check_choice("context", context, CONTEXTS) == "task"
        refuse_normalisation("dwa", net)
        named = [(n, m) for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        if not 0 <= stem_layers <= len(named) - 2:
            raise ValueError(
                f"method.stem_layers must be in [0, {len(named) - 2}] for this network ({len(named)} Linear/Conv2d "
                f"layers: the stem, at least one masked layer, the output), got {stem_layers}"
            )
        if paper_init:
            for _, m in named:
                init = nn.init.kaiming_normal_ if isinstance(m, nn.Conv2d) else nn.init.xavier_uniform_
                init(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.net = net
        self.context = _Context()
        self.stem_layers = int(stem_layers)
        self.gate = gate
        feature_shape = _input_shape_of(net, named[stem_layers][1], input_shape)
        self.binary = bool(binary)
        self.processor: nn.Module = (
            PerTask(lambda: ContextProcessor(feature_shape, emb_size, processor_features, gate), int(num_tasks))
            if per_task
            else ContextProcessor(feature_shape, emb_size, processor_features, gate)
        )
        options = MaskOptions(emb_size, gate, chunk_elements, sparsity, mask_form, int(num_tasks) if per_task else 0)
        self.masked: list[_MaskedLayer] = []  # in `net` already (each replaced its layer there)
        for name, layer in named[stem_layers:-1]:
            kind = MaskedConv2d if isinstance(layer, nn.Conv2d) else MaskedLinear
            new = kind(layer, self.context, options)  # type: ignore[arg-type]
            _replace(net, name, new)
            self.masked.append(new)
        self.masked_names = [name for name, _ in named[stem_layers:-1]]
        self._plain = ([m for _, m in named[:stem_layers]], named[-1][1])  # a tuple: not submodules (in `net`)
        self.masked[0].register_forward_pre_hook(self._embed)
        self.embedding: Tensor | None = None  # the last forward pass's E (with its graph while training)

    def _embed(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        ctx = self.context
        features = inputs[0]
        if ctx.injected is not None:
            ctx.emb = ctx.injected.to(features).expand(features.shape[0], -1)
        elif isinstance(self.processor, PerTask):
            if ctx.task is None:
                raise RuntimeError("a DWA network with method.context=task needs each sample's task")
            ctx.emb = self.processor(features, ctx.task.to(features.device).expand(features.shape[0]))
        else:
            ctx.emb = self.processor(features)
        self.embedding = ctx.emb

    @contextlib.contextmanager
    def inject(self, emb: Tensor) -> Iterator[None]:
        """Within the block, every sample's embedding is ``emb`` ``(emb_size,)`` (the anchor search)."""
        self.context.injected = emb
        try:
            yield
        finally:
            self.context.injected = None

    def forward(self, x: Tensor, task: Tensor | None = None) -> Tensor:
        ctx = self.context
        ctx.collect = self.training and torch.is_grad_enabled()
        ctx.binary = self.binary and not self.training
        ctx.attention, ctx.activity = [], []
        ctx.task = None if task is None else torch.as_tensor(task, device=x.device).expand(x.shape[0])
        try:
            return cast(Tensor, self.net(x))
        finally:
            ctx.emb = None

    def components(self) -> dict[str, list[nn.Parameter]]:
        """The network's parameters by their role: ``stem``, ``processor``, ``generators`` (the masks'),
        ``masked`` (the masked layers' own weights and biases) and ``heads`` (the output layer)."""
        stem, output = self._plain
        return {
            "stem": [p for m in stem for p in m.parameters()],
            "processor": list(self.processor.parameters()),
            "generators": [p for layer in self.masked for c in layer.children() for p in c.parameters()],
            "masked": [p for layer in self.masked for p in layer.parameters(recurse=False)],
            "heads": list(output.parameters()),
        }

    def masks(self, x: Tensor, task: Tensor | None = None) -> list[Tensor]:
        """Each masked layer's per-sample masks for inputs ``x``, ``(B, *weight.shape)`` (for inspection)."""
        with torch.no_grad():
            self.forward(x, task)
            assert self.embedding is not None
            ctx = self.context
            ctx.binary = self.binary and not self.training
            ctx.task = None if task is None else torch.as_tensor(task, device=x.device).expand(x.shape[0])
            return [layer.mask(self.embedding, ctx.task) for layer in self.masked]


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _input_shape_of(net: nn.Module, layer: nn.Module, input_shape: Sequence[int]) -> tuple[int, ...]:
    """The shape of one sample's input to ``layer`` (a dry run of ``net`` on zeros)."""
    seen: list[tuple[int, ...]] = []
    handle = layer.register_forward_pre_hook(lambda m, inputs: seen.append(tuple(inputs[0].shape[1:])))
    try:
        with torch.no_grad():
            was = net.training
            net.eval()
            net(torch.zeros(1, *input_shape))
            net.train(was)
    finally:
        handle.remove()
    if len(seen) != 1:
        raise ValueError("method=dwa needs each Linear/Conv2d layer of the network to run once per forward pass")
    return seen[0]
