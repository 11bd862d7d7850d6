r"""Dynamic weight allocation (Geilert, "Pay attention to the Task: Avoid forgetting in sequential learning
through dynamic weight allocation"): a mask over every weight, generated for every sample from its input.

HAT learns one mask per *task* over a layer's *units*; DWA generates, for every *sample*, a mask over every
*weight* of the masked layers from a context embedding of the input itself, and protects earlier tasks
softly: a loss keeps the masks small on weights with a high Fisher value for earlier tasks, and a triplet
loss pulls a task's embeddings together and away from other tasks'.

The choices lifelong makes where the paper and its code (felixnext/dwa) differ, and the code's bugs it
fixes, are listed in the docs/methods.md ("DWA: what lifelong implements").
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from typing_extensions import override

from lifelong.data.complexity import entropy_complexity
from lifelong.data.streams import TaskStream, stream_of
from lifelong.data.tensors import Batch, TaskData
from lifelong.errors import ResumeError
from lifelong.methods.base import (
    ContinualMethod,
    log_now,
    refuse_normalisation,
    require_task_scenario,
    wrapped_net,
)
from lifelong.methods.fisher import abs_pow_, conv_weight_grads, fisher_sums
from lifelong.methods.quadratic import all_reduce_mean

GATES = ("tanh", "sigmoid")


def factor_pair(n: int) -> tuple[int, int]:
    """``(f1, f2)`` with ``f1 * f2 = n`` and ``f1`` the largest divisor of ``n`` not above ``sqrt(n) + 1``."""
    f1 = max(d for d in range(1, math.isqrt(n) + 2) if n % d == 0)
    return f1, n // f1


def triplet(e: Tensor, pos: Tensor, neg: Tensor, margin: float) -> Tensor:
    """Per-sample triplet loss ``[|e - pos|^2 - |e - neg|^2 + margin]_+`` of embeddings ``e`` ``(B, D)``: ``(B,)``."""
    return ((e - pos).square().sum(1) - (e - neg).square().sum(1) + margin).clamp_min(0)


@dataclass
class _Context:
    """What a forward pass of a :class:`DWANet` shares between its processor and its masked layers."""

    emb: Tensor | None = None  # (B, emb_size): this forward pass's context embedding
    injected: Tensor | None = None  # (emb_size,): an embedding used for every sample instead (anchor search)
    collect: bool = False  # record the masks' loss statistics (training steps)
    attention: list[Tensor] = field(default_factory=list)  # per masked layer, (B,): sum_i F_i |M_b,i|
    activity: list[Tensor] = field(default_factory=list)  # per masked layer, (B,): mean_i of the soft activity


class _MaskedLayer(nn.Module):
    """A Linear or Conv2d layer whose sample ``b`` computes with ``W * M_b``, ``M_b`` generated from ``E_b``.

    Holds the original layer's ``weight`` and ``bias`` parameters (the bias is not masked). The per-sample
    computation is vectorised (one batched matmul for Linear, one grouped convolution for Conv2d); when
    ``B x |W|`` exceeds ``chunk_elements`` the batch is split into chunks computed under activation
    checkpointing, so the masks of only one chunk are ever held (the backward pass recomputes them).
    """

    weight: nn.Parameter
    bias: nn.Parameter | None

    def __init__(self, layer: nn.Linear | nn.Conv2d, context: _Context, emb_size: int, gate: str, chunk: int):
        super().__init__()
        self.weight = cast(nn.Parameter, layer.weight)
        self.bias = cast(nn.Parameter | None, layer.bias)
        self._context = [context]  # a list: not a submodule
        self.gate = gate
        self.chunk_elements = int(chunk)
        self.importance: Tensor | None = None  # the Fisher of ``weight`` from earlier tasks (set by DWA)
        self.last_emb: Tensor | None = None  # the embeddings of the last forward pass (for the Fisher rule)

    @property
    def context(self) -> _Context:
        return self._context[0]

    def raw_mask(self, emb: Tensor) -> Tensor:
        """The generator's output before the gate, ``(B, *weight.shape)``."""
        raise NotImplementedError

    def mask(self, emb: Tensor) -> Tensor:
        """Each sample's mask ``M_b = gate(raw)``, ``(B, *weight.shape)``."""
        raw = self.raw_mask(emb)
        return torch.tanh(raw) if self.gate == "tanh" else torch.sigmoid(raw)

    def masked_call(self, x: Tensor, weights: Tensor) -> Tensor:
        """The layer's output with per-sample weights ``(B, *weight.shape)`` (the bias added)."""
        raise NotImplementedError

    def _chunk(self, x: Tensor, emb: Tensor, collect: bool) -> tuple[Tensor, Tensor, Tensor]:
        mask = self.mask(emb)
        out = self.masked_call(x, self.weight * mask)
        if not collect:
            return out, out.new_zeros(()), out.new_zeros(())
        flat = mask.flatten(1)
        # the soft activity is 1(raw > 0) in the gate's saturated limit, with a gradient (see DWA, R_sp)
        activity = (flat.relu() if self.gate == "tanh" else flat).mean(1)
        attention = flat.abs() @ self.importance.flatten() if self.importance is not None else flat.new_zeros(())
        return out, attention, activity

    def forward(self, x: Tensor) -> Tensor:
        ctx = self.context
        emb = ctx.emb
        if emb is None:
            raise RuntimeError("a DWA masked layer ran outside its DWANet's forward pass")
        self.last_emb = emb.detach()
        size = max(1, self.chunk_elements // self.weight.numel())
        if x.shape[0] <= size:
            out, attention, activity = self._chunk(x, emb, ctx.collect)
        else:  # the backward pass recomputes each chunk (with the same `collect`, passed along)
            parts = [
                cast(tuple[Tensor, Tensor, Tensor], checkpoint(self._chunk, xc, ec, ctx.collect, use_reentrant=False))
                for xc, ec in zip(x.split(size), emb.split(size), strict=True)
            ]
            out = torch.cat([p[0] for p in parts])
            attention = torch.cat([p[1].expand(len(p[0])) for p in parts])
            activity = torch.cat([p[2].expand(len(p[0])) for p in parts])
        if ctx.collect:
            if self.importance is not None:
                ctx.attention.append(attention)
            ctx.activity.append(activity)
        return out

    @torch.no_grad()
    def per_sample_grad_powers(self, a: Tensor, g: Tensor, w: Tensor, power: int) -> dict[str, Tensor]:
        """The Fisher engine's rule (see :func:`lifelong.methods.fisher.per_sample_grad_powers`): sample ``b``'s
        weight gradient is the plain layer's ``(g_b a_b^T)`` times its mask ``M_b``."""
        if self.last_emb is None:
            raise RuntimeError("per_sample_grad_powers needs a forward pass first")
        weight = torch.zeros_like(self.weight)
        size = max(1, self.chunk_elements // self.weight.numel())
        for start in range(0, a.shape[0], size):
            stop = start + size
            grads = self.plain_grads(a[start:stop], g[start:stop]).mul_(self.mask(self.last_emb[start:stop]))
            weight += torch.einsum("b,b...->...", w[start:stop], abs_pow_(grads, power))
        out = {"weight": weight}
        if self.bias is not None:
            summed = g.sum((2, 3)) if g.ndim == 4 else g
            out["bias"] = torch.einsum("b,bo->o", w, abs_pow_(summed.clone(), power))
        return out

    def plain_grads(self, a: Tensor, g: Tensor) -> Tensor:
        """Per-sample gradients of the per-sample weights ``W * M_b``: ``(B, *weight.shape)``."""
        raise NotImplementedError


class MaskedLinear(_MaskedLayer):
    """A Linear layer with a per-sample weight mask; the mask is the gated outer product of two vectors
    generated from the embedding (``f1 x f2 = out x in``, reshaped to the weight's shape), as DWA's dense
    "combination" generator: rank 1 before the gate, ``(f1 + f2) x emb`` generator weights."""

    def __init__(self, layer: nn.Linear, context: _Context, emb_size: int, gate: str, chunk: int) -> None:
        super().__init__(layer, context, emb_size, gate, chunk)
        self.factors = factor_pair(layer.weight.numel())
        self.gen1 = nn.Linear(emb_size, self.factors[0])
        self.gen2 = nn.Linear(emb_size, self.factors[1])

    @override
    def raw_mask(self, emb: Tensor) -> Tensor:
        outer = self.gen2(emb).unsqueeze(2) * self.gen1(emb).unsqueeze(1)  # (B, f2, f1)
        return outer.view(emb.shape[0], *self.weight.shape)

    @override
    def masked_call(self, x: Tensor, weights: Tensor) -> Tensor:
        if x.ndim != 2:
            raise ValueError(f"a DWA masked Linear layer takes (B, in) inputs, got shape {tuple(x.shape)}")
        out = torch.bmm(weights, x.unsqueeze(2)).squeeze(2)  # (B, out): sample b's W_b @ x_b
        return out + self.bias if self.bias is not None else out

    @override
    def plain_grads(self, a: Tensor, g: Tensor) -> Tensor:
        return torch.einsum("bo,bi->boi", g, a)


class MaskedConv2d(_MaskedLayer):
    """A Conv2d layer (groups=1) with a per-sample weight mask generated by one Linear from the embedding."""

    def __init__(self, layer: nn.Conv2d, context: _Context, emb_size: int, gate: str, chunk: int) -> None:
        if layer.groups != 1 or isinstance(layer.padding, str) or layer.padding_mode != "zeros":
            raise ValueError("method=dwa masks Conv2d layers with groups=1 and numeric zero padding only")
        super().__init__(layer, context, emb_size, gate, chunk)
        self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation
        self.gen = nn.Linear(emb_size, layer.weight.numel())

    @override
    def raw_mask(self, emb: Tensor) -> Tensor:
        return self.gen(emb).view(emb.shape[0], *self.weight.shape)

    @override
    def masked_call(self, x: Tensor, weights: Tensor) -> Tensor:
        b = x.shape[0]
        c_out = self.weight.shape[0]
        # one grouped convolution: the batch becomes the groups, group b convolves sample b with W_b
        out = F.conv2d(
            x.reshape(1, -1, *x.shape[2:]),
            weights.reshape(b * c_out, *self.weight.shape[1:]),
            self.bias.repeat(b) if self.bias is not None else None,
            self.stride,
            self.padding,
            self.dilation,
            groups=b,
        )
        return out.view(b, c_out, *out.shape[2:])

    @override
    def plain_grads(self, a: Tensor, g: Tensor) -> Tensor:
        return conv_weight_grads(self, a, g)


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
    :class:`ContextProcessor` maps the input of the first masked layer (the stem's features, after its
    activation and pooling) to the embedding ``E``; every later layer but the output is replaced by a
    :class:`MaskedLinear` or :class:`MaskedConv2d` (same parameters, same names) whose masks are generated
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
        chunk_elements: the most mask entries (``B x |W|``) one layer computes at once (see
            :class:`_MaskedLayer`).
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
    ) -> None:
        super().__init__()
        if gate not in GATES:
            raise ValueError(f"method.gate must be one of {list(GATES)}, got {gate!r}")
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
        self.processor = ContextProcessor(feature_shape, emb_size, processor_features, gate)
        self.masked: list[_MaskedLayer] = []
        masked_layers = nn.ModuleList()
        for name, layer in named[stem_layers:-1]:
            kind = MaskedConv2d if isinstance(layer, nn.Conv2d) else MaskedLinear
            new = kind(layer, self.context, emb_size, gate, chunk_elements)  # type: ignore[arg-type]
            _replace(net, name, new)
            self.masked.append(new)
            masked_layers.append(new)
        self.masked_names = [name for name, _ in named[stem_layers:-1]]
        self.masked[0].register_forward_pre_hook(self._embed)
        self.embedding: Tensor | None = None  # the last forward pass's E (with its graph while training)

    def _embed(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        ctx = self.context
        features = inputs[0]
        if ctx.injected is not None:
            ctx.emb = ctx.injected.to(features).expand(features.shape[0], -1)
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
        ctx.attention, ctx.activity = [], []
        try:
            return cast(Tensor, self.net(x))
        finally:
            ctx.emb = None

    def masks(self, x: Tensor) -> list[Tensor]:
        """Each masked layer's per-sample masks for inputs ``x``, ``(B, *weight.shape)`` (for inspection)."""
        with torch.no_grad():
            self.forward(x)
            assert self.embedding is not None
            return [layer.mask(self.embedding) for layer in self.masked]


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


class DWA(ContinualMethod):
    r"""Dynamic weight allocation (Geilert, "Pay attention to the Task", a fork of HAT); the task scenario.

    The network is wrapped in a :class:`DWANet`. The loss of a training step is

    .. math::  L_{task} + \lambda_1 L_{emb} + \lambda_2 \sum_j L_{pl,j} + \lambda_3 \sum_j R_{sp,j}

    averaged over the batch's samples, each term per sample ``b``:

    * :math:`L_{emb} = (1 - \zeta_b)\,(T(E_b, P, N) + \delta\,T(E_b, P, N_T))` with the triplet loss
      :math:`T(E, P, N) = [\|E - P\|^2 - \|E - N\|^2 + \alpha]_+` and the sample's complexity
      :math:`\zeta_b` (from the second task on; ``anchor_first_task`` also on the first, without the
      :math:`N_T` term). The anchors are recomputed at the start of every epoch from the current network:
      :math:`P` the mean embedding of ``anchor_samples`` low-complexity samples (:math:`\zeta < 0.4`) of
      the task; :math:`N` of ``negative_searches`` random unit directions orthogonal to :math:`P`, the one
      whose injection as every sample's embedding gives the highest task loss on them; :math:`N_T` of the
      earlier tasks' stored anchors, the one giving the highest loss. A task's anchor :math:`P` is stored
      when it ends.
    * :math:`L_{pl,j} = \sum_i F_i |M_{b,i}|` over the weights of masked layer :math:`j`, with :math:`F`
      the diagonal Fisher of those weights (per-sample, empirical, from lifelong's engine), the mean of
      the earlier tasks' Fishers (the paper's running merge).
    * :math:`R_{sp,j} = [\frac{1}{|M_j|} \sum_i a(M_{b,i}) - \mu]_+`, where the soft activity :math:`a` is
      :math:`\max(M, 0)` for tanh masks (:math:`M` for sigmoid ones): the paper's fraction of active mask
      entries, :math:`\mathbb{1}(H > 0)`, in the gate's saturated limit, with a gradient towards sparse masks.

    The curriculum (``curriculum``) trains each epoch only on the task's samples with
    :math:`\zeta \le \min(1, s + (1 - s)\,e / E_c)` at epoch :math:`e` of the task; the warm-up divides the
    learning rate by ``warmup_divisor`` for the first ``warmup_epochs`` epochs of every task.

    Under DDP every rank computes the complexity of the whole task (the same scores), the anchors' means and
    losses and the Fisher are sums over each rank's shard, all-reduced: every rank holds the same state,
    equal to one process's.

    Args:
        stem_layers: see :class:`DWANet`.
        emb_size: see :class:`DWANet`.
        processor_features: see :class:`DWANet`.
        gate: see :class:`DWANet`.
        chunk_elements: see :class:`DWANet`.
        paper_init: see :class:`DWANet`.
        lambda_emb: :math:`\lambda_1` (20).
        lambda_attention: :math:`\lambda_2` (0.1).
        lambda_sparsity: :math:`\lambda_3` (500).
        sparsity: :math:`\mu`, the fraction of active mask entries allowed without penalty (0.2).
        margin: the triplet margin :math:`\alpha` (1.5).
        delta: :math:`\delta`, the weight of the earlier tasks' anchor (1).
        anchor_first_task: apply :math:`L_{emb}` on the first task too.
        anchor_threshold: the complexity below which samples make the anchors (0.4).
        anchor_samples: how many of them (a seeded random choice; 320, the code's 10 batches of 32).
        negative_searches: random directions tried for :math:`N` (5).
        curriculum: train each epoch on the samples under the rising complexity threshold.
        curriculum_start: the threshold :math:`s` at a task's first epoch (0.2).
        curriculum_epochs: :math:`E_c`, the epochs over which it reaches 1 (100).
        warmup_epochs: epochs of reduced learning rate at the start of every task (0: none).
        warmup_divisor: the learning rate's divisor during them (750).
        fisher_samples: samples of a finished task to estimate the Fisher on (seeded); ``None`` for all.
    """

    name = "dwa"

    def __init__(
        self,
        stem_layers: int = 1,
        emb_size: int = 100,
        processor_features: Sequence[int] = (32, 128),
        gate: str = "tanh",
        lambda_emb: float = 20.0,
        lambda_attention: float = 0.1,
        lambda_sparsity: float = 500.0,
        sparsity: float = 0.2,
        margin: float = 1.5,
        delta: float = 1.0,
        anchor_first_task: bool = False,
        anchor_threshold: float = 0.4,
        anchor_samples: int = 320,
        negative_searches: int = 5,
        curriculum: bool = True,
        curriculum_start: float = 0.2,
        curriculum_epochs: int = 100,
        warmup_epochs: int = 0,
        warmup_divisor: float = 750.0,
        fisher_samples: int | None = None,
        chunk_elements: int = 2**24,
        paper_init: bool = True,
    ) -> None:
        super().__init__()
        for key, value in (
            ("lambda_emb", lambda_emb),
            ("lambda_attention", lambda_attention),
            ("lambda_sparsity", lambda_sparsity),
            ("margin", margin),
            ("delta", delta),
        ):
            if not value >= 0:  # also refuses NaN
                raise ValueError(f"method.{key} must be >= 0, got {value}")
        for key, value in (("sparsity", sparsity), ("anchor_threshold", anchor_threshold)):
            if not 0 <= value <= 1:
                raise ValueError(f"method.{key} must be in [0, 1], got {value}")
        if not 0 <= curriculum_start <= 1:
            raise ValueError(f"method.curriculum_start must be in [0, 1], got {curriculum_start}")
        for key, count in (
            ("emb_size", emb_size),
            ("anchor_samples", anchor_samples),
            ("negative_searches", negative_searches),
            ("curriculum_epochs", curriculum_epochs),
            ("chunk_elements", chunk_elements),
        ):
            if int(count) < 1:
                raise ValueError(f"method.{key} must be at least 1, got {count}")
        if len(processor_features) != 2 or min(int(f) for f in processor_features) < 1:
            raise ValueError(f"method.processor_features must be two widths [F_B, F_E], got {processor_features}")
        if int(warmup_epochs) < 0 or not warmup_divisor >= 1:
            raise ValueError(
                f"method.warmup_epochs must be >= 0 and method.warmup_divisor >= 1, got {warmup_epochs}, "
                f"{warmup_divisor}"
            )
        if fisher_samples is not None and fisher_samples < 1:
            raise ValueError(f"method.fisher_samples must be a positive number or null, got {fisher_samples}")
        if gate not in GATES:
            raise ValueError(f"method.gate must be one of {list(GATES)}, got {gate!r}")
        self.net_options: dict[str, Any] = {
            "stem_layers": int(stem_layers),
            "emb_size": int(emb_size),
            "processor_features": [int(f) for f in processor_features],
            "gate": gate,
            "chunk_elements": int(chunk_elements),
            "paper_init": bool(paper_init),
        }
        self.lambda_emb = float(lambda_emb)
        self.lambda_attention = float(lambda_attention)
        self.lambda_sparsity = float(lambda_sparsity)
        self.sparsity = float(sparsity)
        self.margin = float(margin)
        self.delta = float(delta)
        self.anchor_first_task = bool(anchor_first_task)
        self.anchor_threshold = float(anchor_threshold)
        self.anchor_samples = int(anchor_samples)
        self.negative_searches = int(negative_searches)
        self.curriculum = bool(curriculum)
        self.curriculum_start = float(curriculum_start)
        self.curriculum_epochs = int(curriculum_epochs)
        self.warmup_epochs = int(warmup_epochs)
        self.warmup_divisor = float(warmup_divisor)
        self.fisher_samples = fisher_samples
        # state (see state_dict)
        self.task_anchors: list[Tensor] = []  # P of each finished task
        self.anchors: dict[str, Tensor] = {}  # this epoch's P, N and (from the second task) N_T
        self.fisher: dict[str, Tensor] = {}  # masked weights' Fisher: the mean over the finished tasks
        self.num_fishers = 0
        self.position: dict[str, Any] = {}  # the curriculum's position: task, epoch, threshold, samples
        self._complexity: dict[int, Tensor] = {}  # task -> (N_base,) complexity of the task's rows

    # ---- the network -------------------------------------------------------------------------------
    @override
    def configure_network(self, net: nn.Module, stream: TaskStream) -> nn.Module:
        require_task_scenario("dwa", stream, "its heads are per task, as in the paper")
        return DWANet(net, stream.input_shape, **self.net_options)

    def _net(self, pl_module: L.LightningModule) -> DWANet:
        return wrapped_net(pl_module, DWANet, "dwa")

    def _masked_params(self, pl_module: L.LightningModule) -> dict[str, nn.Parameter]:
        """The masked layers' weights and biases, by the module's parameter names."""
        owned = {id(p) for layer in self._net(pl_module).masked for p in layer.parameters(recurse=False)}
        return {n: p for n, p in pl_module.named_parameters() if id(p) in owned}

    def _install_fisher(self, pl_module: L.LightningModule) -> None:
        named = dict(pl_module.named_parameters())
        for layer in self._net(pl_module).masked:
            name = next(n for n, p in named.items() if p is layer.weight)
            layer.importance = self.fisher.get(name)

    # ---- hooks -------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Before the fit: check the network and strategy, and make the stream serve DWA's curriculum."""
        self._net(pl_module)
        name = type(trainer.strategy).__name__
        if any(key in name for key in ("FSDP", "DeepSpeed", "ModelParallel")):
            raise ValueError(f"method=dwa does not support the {name} strategy (it shards parameters); use ddp")
        dm = stream_of(trainer)
        dm.train_rows = True  # training batches carry their rows: each sample's complexity weights its L_emb
        dm.train_selector = functools.partial(self._select, dm) if self.curriculum else None

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After the strategy placed the model: move the (restored) state to its device."""
        device = pl_module.device
        self.task_anchors = [a.to(device) for a in self.task_anchors]
        self.anchors = {k: a.to(device) for k, a in self.anchors.items()}
        self.fisher = {k: f.to(device) for k, f in self.fisher.items()}
        self._install_fisher(pl_module)

    def threshold(self, epoch_in_task: int) -> float:
        """The curriculum's complexity threshold at an epoch of a task (0-based)."""
        rise = (1 - self.curriculum_start) * epoch_in_task / self.curriculum_epochs
        return min(1.0, self.curriculum_start + rise)

    def complexity(self, stream: TaskStream, task: int) -> Tensor:
        """The complexity of ``task``'s training samples, indexed by their rows: ``(N_base,)``.

        Computed once per task on what the network sees (a permuted task's permuted images), min-max
        normalised over the task's training set, and the same on every rank.
        """
        if task not in self._complexity:
            data = stream.train_data(task)
            images = data.images.index_select(0, data.rows)
            pixels = getattr(stream.transform, "pixels", None)
            if pixels is not None:
                images = pixels(images, data.tasks, data.task)
            table = torch.full((data.images.shape[0],), float("nan"), device=data.rows.device)
            table[data.rows] = entropy_complexity(images).to(table.device)
            self._complexity = {task: table}  # one task's at a time
        return self._complexity[task]

    def _select(self, stream: TaskStream, data: TaskData, epoch: int) -> TaskData:
        """The curriculum: the epoch's training samples, those with complexity under the threshold."""
        task = stream.task_of_epoch(epoch)
        threshold = self.threshold(epoch % stream.epochs_per_task)
        zeta = self.complexity(stream, task)[data.rows]
        keep = (zeta <= threshold).nonzero().squeeze(1)
        self.position = {
            "task": task,
            "epoch_in_task": epoch % stream.epochs_per_task,
            "threshold": threshold,
            "samples": int(keep.numel()),
            "of": len(data),
        }
        return TaskData(data.images, data.labels, data.rows[keep], data.tasks[keep], data.task)

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Every epoch: the warm-up's learning rate, and this epoch's anchors P, N (and N_T)."""
        dm = stream_of(trainer)
        epoch = trainer.current_epoch
        task, epoch_in_task = dm.task_of_epoch(epoch), epoch % dm.epochs_per_task
        if self.warmup_epochs:  # otherwise the optimizer's rate is left alone
            factor = 1 / self.warmup_divisor if epoch_in_task < self.warmup_epochs else 1.0
            for opt in trainer.optimizers:
                for group in opt.param_groups:
                    base = group.setdefault("initial_lr", group["lr"])
                    group["lr"] = base * factor
        if self.curriculum and self.position:
            pl_module.log("dwa/curriculum_threshold", self.position["threshold"])
            pl_module.log("dwa/curriculum_samples", float(self.position["samples"]))
        if task > 0 or self.anchor_first_task:
            self.anchors = self.search_anchors(trainer, pl_module, task, epoch)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """At a task boundary (not after the last task): store the task's anchor, merge its Fisher."""
        dm = stream_of(trainer)
        epoch = trainer.current_epoch
        if not dm.is_task_end(epoch) or dm.task_of_epoch(epoch) == dm.num_tasks - 1:
            return
        task = dm.task_of_epoch(epoch)
        samples = self._anchor_data(dm, task, epoch)
        with _eval(pl_module), torch.no_grad():
            self.task_anchors.append(self._mean_embedding(trainer, pl_module, dm, samples))
        fisher = self.task_fisher(trainer, pl_module, task)
        k = self.num_fishers
        self.fisher = {n: (f + k * self.fisher[n]) / (k + 1) if k else f for n, f in fisher.items()}
        self.num_fishers += 1
        self._install_fisher(pl_module)
        pl_module.log("dwa/fisher_mean", torch.stack([f.mean() for f in self.fisher.values()]).mean(), sync_dist=True)

    def task_fisher(self, trainer: L.Trainer, pl_module: L.LightningModule, task: int) -> dict[str, Tensor]:
        """The diagonal Fisher of the masked layers' weights on ``task``'s training data (all ranks' samples)."""
        dm = stream_of(trainer)
        data = dm.train_data(task)
        if self.fisher_samples is not None:
            data = data.subset(self.fisher_samples, torch.Generator().manual_seed(dm.seed * 7919 + task))
        params = self._masked_params(pl_module)
        sums = fisher_sums(pl_module, dm.loader(data, train=False), "empirical", params=params)
        weights = {n: p for n, p in params.items() if p.ndim > 1}
        return all_reduce_mean(trainer, {n: sums.sums[n] for n in weights}, sums.count)

    # ---- anchors -----------------------------------------------------------------------------------
    def _anchor_data(self, stream: TaskStream, task: int, epoch: int) -> TaskData:
        """``anchor_samples`` of the task's low-complexity training samples (seeded by stream, task, epoch)."""
        data = stream.train_data(task)
        zeta = self.complexity(stream, task)[data.rows]
        easy = (zeta < self.anchor_threshold).nonzero().squeeze(1)
        if easy.numel() == 0:  # every sample is complex: the simplest ones
            easy = zeta.argsort()[: self.anchor_samples]
        g = torch.Generator().manual_seed((stream.seed * 1_000_003 + epoch) * 31 + 17)
        pick = easy[torch.randperm(easy.numel(), generator=g)[: self.anchor_samples].to(easy.device)].sort().values
        return TaskData(data.images, data.labels, data.rows[pick], data.tasks[pick], data.task)

    def _mean_embedding(
        self, trainer: L.Trainer, pl_module: L.LightningModule, stream: TaskStream, data: TaskData
    ) -> Tensor:
        """The mean embedding of ``data`` (summed over every rank's shard)."""
        net = self._net(pl_module)
        total: Tensor | None = None
        count = 0
        for x, _, t in stream.loader(data, train=False):
            pl_module(x, t)
            assert net.embedding is not None
            part = net.embedding.sum(0)
            total = part if total is None else total + part
            count += x.shape[0]
        if total is None:
            total = torch.zeros(self.net_options["emb_size"], device=pl_module.device)
        return all_reduce_mean(trainer, {"p": total}, count)["p"]

    def _task_loss(
        self, trainer: L.Trainer, pl_module: L.LightningModule, stream: TaskStream, data: TaskData, emb: Tensor
    ) -> Tensor:
        """The task's mean cross-entropy on ``data`` with ``emb`` injected as every sample's embedding."""
        net = self._net(pl_module)
        total = torch.zeros((), device=pl_module.device)
        count = 0
        with net.inject(emb):
            for x, y, t in stream.loader(data, train=False):
                total = total + F.cross_entropy(pl_module(x, t), y, reduction="sum")
                count += x.shape[0]
        return all_reduce_mean(trainer, {"loss": total.view(1)}, count)["loss"][0]

    @torch.no_grad()
    def search_anchors(
        self, trainer: L.Trainer, pl_module: L.LightningModule, task: int, epoch: int
    ) -> dict[str, Tensor]:
        """This epoch's anchors ``{"pos": P, "neg": N[, "task_neg": N_T]}`` from the current network."""
        dm = stream_of(trainer)
        data = self._anchor_data(dm, task, epoch)
        with _eval(pl_module):
            pos = self._mean_embedding(trainer, pl_module, dm, data)
            unit = pos / pos.norm().clamp_min(1e-12)
            g = torch.Generator().manual_seed((dm.seed * 1_000_003 + epoch) * 31 + 23)
            best: tuple[float, Tensor] | None = None
            for _ in range(self.negative_searches):
                v = torch.randn(pos.shape, generator=g).to(pos)
                v = v - (v @ unit) * unit  # orthogonal to P
                v = v / v.norm().clamp_min(1e-12)
                loss = float(self._task_loss(trainer, pl_module, dm, data, v))
                if best is None or loss > best[0]:
                    best = (loss, v)
            assert best is not None
            anchors = {"pos": pos, "neg": best[1]}
            earlier = [(float(self._task_loss(trainer, pl_module, dm, data, a)), a) for a in self.task_anchors[:task]]
            if earlier:
                anchors["task_neg"] = max(earlier, key=lambda pair: pair[0])[1]
        return anchors

    # ---- the loss ----------------------------------------------------------------------------------
    @override
    def penalty(self, pl_module: L.LightningModule, batch: Batch, outputs: Tensor) -> Tensor | None:
        net = self._net(pl_module)
        ctx = net.context
        x = batch[0]
        if net.embedding is None or net.embedding.shape[0] != x.shape[0] or not net.embedding.requires_grad:
            net(x, batch[2])  # another forward pass ran since this batch's (e.g. a replayed batch's): redo it
        emb = net.embedding
        assert emb is not None
        terms: dict[str, Tensor] = {}
        task = int(getattr(pl_module, "current_task", 0))  # the stream's clock: no look at the batch's tensors
        if self.anchors and (task > 0 or self.anchor_first_task):
            rows = batch[3] if len(batch) > 3 else None
            zeta = (
                self.complexity(stream_of(pl_module.trainer), task)[rows]
                if rows is not None
                else torch.zeros(x.shape[0], device=x.device)
            )
            loss = triplet(emb, self.anchors["pos"], self.anchors["neg"], self.margin)
            if "task_neg" in self.anchors:
                loss = loss + self.delta * triplet(emb, self.anchors["pos"], self.anchors["task_neg"], self.margin)
            terms["emb"] = self.lambda_emb * ((1 - zeta) * loss).mean()
        if ctx.attention:
            terms["attention"] = self.lambda_attention * torch.stack([a.mean() for a in ctx.attention]).sum()
        if ctx.activity:
            over = torch.stack([(a - self.sparsity).clamp_min(0).mean() for a in ctx.activity]).sum()
            terms["sparsity"] = self.lambda_sparsity * over
            if log_now(pl_module.trainer):
                pl_module.log("dwa/activity", torch.stack([a.mean() for a in ctx.activity]).mean())
        if not terms:
            return None
        if log_now(pl_module.trainer):
            for key, value in terms.items():
                pl_module.log(f"train/dwa_{key}", value)
        return torch.stack(list(terms.values())).sum()

    # ---- checkpointing -----------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "task_anchors": [a.detach().cpu() for a in self.task_anchors],
            "anchors": {k: a.detach().cpu() for k, a in self.anchors.items()},
            "fisher": {n: f.detach().cpu() for n, f in self.fisher.items()},
            "num_fishers": self.num_fishers,
            "curriculum": dict(self.position),
            "net_options": dict(self.net_options),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("net_options", self.net_options)
        if saved != self.net_options:
            raise ResumeError(
                f"the checkpoint's DWA network was built with {saved}, this run's with {self.net_options}: "
                "resume with the same method options"
            )
        self.task_anchors = list(state_dict["task_anchors"])
        self.anchors = dict(state_dict["anchors"])
        self.fisher = dict(state_dict["fisher"])
        self.num_fishers = int(state_dict["num_fishers"])
        self.position = dict(state_dict.get("curriculum", {}))


@contextlib.contextmanager
def _eval(module: nn.Module) -> Iterator[None]:
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)
