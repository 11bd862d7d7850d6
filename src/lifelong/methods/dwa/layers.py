"""DWA's masked layers: a Linear or Conv2d layer whose every sample computes with its own weight mask."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from typing_extensions import override

from lifelong.methods.fisher import abs_pow_, conv_weight_grads

GATES = ("tanh", "sigmoid")
SPARSITY_FORMS = ("paper", "code")
MASK_FORMS = ("full", "factored")
CONTEXTS = ("shared", "task")


def check_choice(key: str, value: object, choices: tuple[str, ...]) -> str:
    """``value``, checked to be one of ``choices`` (the option ``method.<key>``)."""
    if value not in choices:
        raise ValueError(f"method.{key} must be one of {list(choices)}, got {value!r}")
    return str(value)


def check_gate(gate: str) -> str:
    """``gate``, checked to be one of `GATES` (the masks' and the embedding's squashing function)."""
    return check_choice("gate", gate, GATES)


def check_sparsity(form: object) -> str:
    """``form``, checked to be one of `SPARSITY_FORMS` (what the sparsity term counts as a mask's activity)."""
    if isinstance(form, (int, float)):
        raise ValueError(
            f"method.sparsity is the sparsity term's form, one of {list(SPARSITY_FORMS)}, got {form!r}; the "
            "fraction of active entries allowed, mu, is method.sparsity_target"
        )
    return check_choice("sparsity", form, SPARSITY_FORMS)


def mask_activity(mask: Tensor, gate: str, form: str) -> Tensor:
    """Each sample's mask activity ``(B,)`` from its flattened masks ``(B, |W|)``, as the sparsity term counts it.

    ``paper``: the fraction of active entries, ``1(H > 0)``, in the gate's saturated limit and with a gradient:
    ``mean_i max(M_i, 0)`` for tanh masks, ``mean_i M_i`` for sigmoid ones. ``code``: the original code's
    default (``utils.sparsity_regularization`` with ``binary=False``), ``mean_i (1 - |M_i|)``, the *inactive*
    fraction, which its published runs used.
    """
    if form == "code":
        return (1 - mask.abs()).mean(1)
    return (mask.relu() if gate == "tanh" else mask).mean(1)


def factored_activity(out_gate: Tensor, in_gate: Tensor, gate: str, form: str) -> Tensor:
    """`mask_activity` of the factored masks ``M_b = out_b in_b^T`` ``(B,)``, from the two gates alone."""
    if form == "code":
        return 1 - out_gate.abs().mean(1) * in_gate.abs().mean(1)
    if gate == "sigmoid":
        return out_gate.mean(1) * in_gate.mean(1)
    positive = out_gate.relu().mean(1) * in_gate.relu().mean(1)  # max(a c, 0): both positive or both negative
    return positive + (-out_gate).relu().mean(1) * (-in_gate).relu().mean(1)


def select_task(outputs: Tensor, task: Tensor) -> Tensor:
    """Sample ``b`` of ``outputs[task_b]``: ``outputs`` ``(T, B, ...)`` stacked per task, ``task`` ``(B,)``."""
    index = task.view(1, -1, *[1] * (outputs.ndim - 2)).expand(1, *outputs.shape[1:])
    return outputs.gather(0, index).squeeze(0)


class PerTask(nn.Module):
    """One copy of a module per task; sample ``b`` is computed by its task's copy.

    Every copy runs on the whole batch and each sample's row is gathered from its task's output: no host
    sync (a mixed-task batch, e.g. with replay, needs none either), and the copies of the other tasks get
    exactly zero gradients, so a finished task's copy stays as it was (with an optimizer whose state is
    cleared at each task start and no weight decay; DWA checks it).
    """

    def __init__(self, make: Callable[[], nn.Module], num_tasks: int) -> None:
        super().__init__()
        self.copies = nn.ModuleList(make() for _ in range(num_tasks))

    def forward(self, x: Tensor, task: Tensor) -> Tensor:
        return select_task(torch.stack([c(x) for c in self.copies]), task)


def _apply(module: nn.Module, x: Tensor, task: Tensor | None) -> Tensor:
    if isinstance(module, PerTask):
        if task is None:
            raise RuntimeError("a DWA network with method.context=task needs each sample's task")
        return cast(Tensor, module(x, task))
    return cast(Tensor, module(x))


@dataclass(frozen=True)
class MaskOptions:
    """How a masked layer generates and gates its masks (`DWANet`'s options)."""

    emb_size: int
    gate: str = "tanh"
    chunk_elements: int = 2**24
    sparsity: str = "paper"
    form: str = "full"  # full: the paper's generators; factored: an output gate times an input gate
    num_tasks: int = 0  # > 0: one generator per task (method.context=task)

    def generator(self, size: int) -> nn.Module:
        """A generator ``emb -> size``: one Linear, or one per task."""
        if self.num_tasks:
            return PerTask(lambda: nn.Linear(self.emb_size, size), self.num_tasks)
        return nn.Linear(self.emb_size, size)


def factor_pair(n: int) -> tuple[int, int]:
    """``(f1, f2)`` with ``f1 * f2 = n`` and ``f1`` the largest divisor of ``n`` not above ``sqrt(n) + 1``."""
    f1 = max(d for d in range(1, math.isqrt(n) + 2) if n % d == 0)
    return f1, n // f1


def triplet(e: Tensor, pos: Tensor, neg: Tensor, margin: float) -> Tensor:
    """Per-sample triplet loss ``[|e - pos|^2 - |e - neg|^2 + margin]_+`` of embeddings ``e`` ``(B, D)``: ``(B,)``."""
    return ((e - pos).square().sum(1) - (e - neg).square().sum(1) + margin).clamp_min(0)


@dataclass
class _Context:
    """What a forward pass of a `DWANet` shares between its processor and its masked layers."""

    emb: Tensor | None = None  # (B, emb_size): this forward pass's context embedding
    task: Tensor | None = None  # (B,): each sample's task (it picks the generators with method.context=task)
    injected: Tensor | None = None  # (emb_size,): an embedding used for every sample instead (anchor search)
    collect: bool = False  # record the masks' loss statistics (training steps)
    slope: float | None = None  # the gate's slope while training (method.protection=hard anneals it)
    binary: bool = False  # binary masks, 1(raw > 0) (method.protection=hard, in eval mode)
    attention: list[Tensor] = field(default_factory=list)  # per masked layer, (B,): sum_i F_i |M_b,i|
    activity: list[Tensor] = field(default_factory=list)  # per masked layer, (B,): mean_i of the soft activity


class _MaskedLayer(nn.Module):
    """A Linear or Conv2d layer whose sample ``b`` computes with ``W * M_b``, ``M_b`` generated from ``E_b``.

    Holds the original layer's ``weight`` and ``bias`` parameters (the bias is not masked). With the paper's
    ``full`` masks the per-sample computation is vectorised (one batched matmul for Linear, one grouped
    convolution for Conv2d); when ``B x |W|`` exceeds ``chunk_elements`` the batch is split into chunks
    computed under activation checkpointing, so the masks of only one chunk are ever held (the backward pass
    recomputes them). ``factored`` masks, ``M_b = a_b c_b^T`` (an output gate times an input gate, broadcast
    over a kernel), are never formed: ``(W * M_b) x_b = a_b * (W (c_b * x_b))``, the plain layer's cost.
    """

    weight: nn.Parameter
    bias: nn.Parameter | None

    def __init__(self, layer: nn.Linear | nn.Conv2d, context: _Context, options: MaskOptions):
        super().__init__()
        self.weight = cast(nn.Parameter, layer.weight)
        self.bias = cast(nn.Parameter | None, layer.bias)
        self._context = [context]  # a list: not a submodule
        self.gate = check_gate(options.gate)
        self.sparsity = check_sparsity(options.sparsity)
        self.form = check_choice("mask_form", options.form, MASK_FORMS)
        self.chunk_elements = int(options.chunk_elements)
        self.importance: Tensor | None = None  # the Fisher of ``weight`` from earlier tasks (set by DWA)
        self.last_emb: Tensor | None = None  # the embeddings of the last forward pass (for the Fisher rule)
        self.last_task: Tensor | None = None
        if self.form == "factored":
            self.gen_out = options.generator(int(layer.weight.shape[0]))
            self.gen_in = options.generator(int(layer.weight.shape[1]))

    @property
    def context(self) -> _Context:
        return self._context[0]

    def gated(self, raw: Tensor) -> Tensor:
        """The gate on the generator's output: binary, or tanh/sigmoid of ``slope * raw``."""
        ctx = self.context
        if ctx.binary:
            return (raw > 0).to(raw.dtype)
        if ctx.slope is not None:
            raw = raw * ctx.slope
        return torch.tanh(raw) if self.gate == "tanh" else torch.sigmoid(raw)

    def raw_mask(self, emb: Tensor, task: Tensor | None = None) -> Tensor:
        """The ``full`` generator's output before the gate, ``(B, *weight.shape)``."""
        raise NotImplementedError

    def factors(self, emb: Tensor, task: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The ``factored`` masks' gates: ``(B, out)`` and ``(B, in)`` (channels for a convolution)."""
        return self.gated(_apply(self.gen_out, emb, task)), self.gated(_apply(self.gen_in, emb, task))

    def mask(self, emb: Tensor, task: Tensor | None = None) -> Tensor:
        """Each sample's mask ``M_b``, ``(B, *weight.shape)``."""
        if self.form == "factored":
            a, c = self.factors(emb, task)
            shape = (*c.shape, *[1] * (self.weight.ndim - 2))
            outer = a.view(*a.shape, *[1] * (self.weight.ndim - 1)) * c.view(shape).unsqueeze(1)
            return outer.expand(emb.shape[0], *self.weight.shape)
        return self.gated(self.raw_mask(emb, task))

    def masked_call(self, x: Tensor, weights: Tensor) -> Tensor:
        """The layer's output with per-sample weights ``(B, *weight.shape)`` (the bias added)."""
        raise NotImplementedError

    def factored_call(self, x: Tensor, a: Tensor, c: Tensor) -> Tensor:
        """The layer's output with the factored masks' gates ``a`` (outputs) and ``c`` (inputs)."""
        raise NotImplementedError

    def _chunk(self, x: Tensor, emb: Tensor, task: Tensor | None, collect: bool) -> tuple[Tensor, Tensor, Tensor]:
        if self.form == "factored":
            a, c = self.factors(emb, task)
            out = self.factored_call(x, a, c)
            if not collect:
                return out, out.new_zeros(()), out.new_zeros(())
            attention = out.new_zeros(())
            if self.importance is not None:  # sum_{o,i} F_oi |a_o c_i|, F summed over a kernel
                f = self.importance.flatten(2).sum(2) if self.importance.ndim > 2 else self.importance
                attention = ((a.abs() @ f) * c.abs()).sum(1)
            return out, attention, factored_activity(a, c, self.gate, self.sparsity)
        mask = self.mask(emb, task)
        out = self.masked_call(x, self.weight * mask)
        if not collect:
            return out, out.new_zeros(()), out.new_zeros(())
        flat = mask.flatten(1)
        attention = flat.abs() @ self.importance.flatten() if self.importance is not None else flat.new_zeros(())
        return out, attention, mask_activity(flat, self.gate, self.sparsity)

    def forward(self, x: Tensor) -> Tensor:
        ctx = self.context
        emb, task = ctx.emb, ctx.task
        if emb is None:
            raise RuntimeError("a DWA masked layer ran outside its DWANet's forward pass")
        self.last_emb, self.last_task = emb.detach(), task
        size = max(1, self.chunk_elements // self.weight.numel())
        if x.shape[0] <= size or self.form == "factored":  # factored masks are never held whole
            out, attention, activity = self._chunk(x, emb, task, ctx.collect)
        else:  # the backward pass recomputes each chunk (with the same `collect`, passed along)
            tasks = task.split(size) if task is not None else [None] * len(emb.split(size))
            parts = [
                cast(
                    tuple[Tensor, Tensor, Tensor],
                    checkpoint(self._chunk, xc, ec, tc, ctx.collect, use_reentrant=False),
                )
                for xc, ec, tc in zip(x.split(size), emb.split(size), tasks, strict=True)
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
    def usage(self, emb: Tensor, task: Tensor | None) -> tuple[Tensor, Tensor]:
        """Which weights and which outputs any of these samples' masks uses (``M > 0``): ``(*weight.shape)``
        and ``(out,)``, as 0/1 (with binary masks, the ones a test of these samples computes with)."""
        if self.form == "factored":
            a, c = (f.gt(0).to(self.weight.dtype) for f in self.factors(emb, task))
            pairs = (a.T @ c).gt(0).to(self.weight.dtype)
            return pairs.view(*pairs.shape, *[1] * (self.weight.ndim - 2)).expand_as(self.weight), a.amax(0)
        size = max(1, self.chunk_elements // self.weight.numel())
        used = torch.zeros_like(self.weight)
        for start in range(0, emb.shape[0], size):
            part = task[start : start + size] if task is not None else None
            used = torch.maximum(used, self.mask(emb[start : start + size], part).gt(0).amax(0).to(used.dtype))
        return used, used.flatten(1).amax(1)

    @torch.no_grad()
    def per_sample_grad_powers(self, a: Tensor, g: Tensor, w: Tensor, power: int) -> dict[str, Tensor]:
        """The Fisher engine's rule (see
        [`lifelong.methods.fisher.per_sample_grad_powers`][lifelong.methods.fisher.per_sample_grad_powers]): sample
        ``b``'s
        weight gradient is the plain layer's ``(g_b a_b^T)`` times its mask ``M_b``."""
        if self.last_emb is None:
            raise RuntimeError("per_sample_grad_powers needs a forward pass first")
        weight = torch.zeros_like(self.weight)
        size = max(1, self.chunk_elements // self.weight.numel())
        for start in range(0, a.shape[0], size):
            stop = start + size
            task = self.last_task[start:stop] if self.last_task is not None else None
            grads = self.plain_grads(a[start:stop], g[start:stop]).mul_(self.mask(self.last_emb[start:stop], task))
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
    """A Linear layer with a per-sample weight mask. ``full`` (the paper's): the gated outer product of two
    vectors generated from the embedding (``f1 x f2 = out x in``, reshaped to the weight's shape), as DWA's
    dense "combination" generator: rank 1 before the gate, ``(f1 + f2) x emb`` generator weights."""

    def __init__(self, layer: nn.Linear, context: _Context, options: MaskOptions) -> None:
        super().__init__(layer, context, options)
        if self.form == "full":
            self.factors_shape = factor_pair(layer.weight.numel())
            self.gen1 = options.generator(self.factors_shape[0])
            self.gen2 = options.generator(self.factors_shape[1])

    @override
    def raw_mask(self, emb: Tensor, task: Tensor | None = None) -> Tensor:
        outer = _apply(self.gen2, emb, task).unsqueeze(2) * _apply(self.gen1, emb, task).unsqueeze(1)  # (B, f2, f1)
        return outer.view(emb.shape[0], *self.weight.shape)

    def _check(self, x: Tensor) -> None:
        if x.ndim != 2:
            raise ValueError(f"a DWA masked Linear layer takes (B, in) inputs, got shape {tuple(x.shape)}")

    @override
    def masked_call(self, x: Tensor, weights: Tensor) -> Tensor:
        self._check(x)
        out = torch.bmm(weights, x.unsqueeze(2)).squeeze(2)  # (B, out): sample b's W_b @ x_b
        return out + self.bias if self.bias is not None else out

    @override
    def factored_call(self, x: Tensor, a: Tensor, c: Tensor) -> Tensor:
        self._check(x)
        out = a * F.linear(c * x, self.weight)
        return out + self.bias if self.bias is not None else out

    @override
    def plain_grads(self, a: Tensor, g: Tensor) -> Tensor:
        return torch.einsum("bo,bi->boi", g, a)


class MaskedConv2d(_MaskedLayer):
    """A Conv2d layer (groups=1) with a per-sample weight mask: ``full`` (the paper's), generated by one Linear
    from the embedding; ``factored``, an output-channel gate times an input-channel gate."""

    def __init__(self, layer: nn.Conv2d, context: _Context, options: MaskOptions) -> None:
        if layer.groups != 1 or isinstance(layer.padding, str) or layer.padding_mode != "zeros":
            raise ValueError("method=dwa masks Conv2d layers with groups=1 and numeric zero padding only")
        super().__init__(layer, context, options)
        self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation
        if self.form == "full":
            self.gen = options.generator(layer.weight.numel())

    @override
    def raw_mask(self, emb: Tensor, task: Tensor | None = None) -> Tensor:
        return _apply(self.gen, emb, task).view(emb.shape[0], *self.weight.shape)

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
    def factored_call(self, x: Tensor, a: Tensor, c: Tensor) -> Tensor:
        out = F.conv2d(c[:, :, None, None] * x, self.weight, None, self.stride, self.padding, self.dilation)
        out = a[:, :, None, None] * out
        return out + self.bias.view(1, -1, 1, 1) if self.bias is not None else out

    @override
    def plain_grads(self, a: Tensor, g: Tensor) -> Tensor:
        return conv_weight_grads(self, a, g)
