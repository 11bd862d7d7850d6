"""DWA's masked layers: a Linear or Conv2d layer whose every sample computes with its own weight mask."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from typing_extensions import override

from lifelong.methods.fisher import abs_pow_, conv_weight_grads

GATES = ("tanh", "sigmoid")


def check_gate(gate: str) -> str:
    """``gate``, checked to be one of `GATES` (the masks' and the embedding's squashing function)."""
    if gate not in GATES:
        raise ValueError(f"method.gate must be one of {list(GATES)}, got {gate!r}")
    return gate


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
