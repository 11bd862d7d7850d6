r"""Kronecker-factored Fisher (KFAC): one $A \otimes G$ block per layer, estimated in one pass with hooks.

For a layer $y = \bar W \bar a$ with $\bar W = [W \mid b]$ (``out x (in + 1)``) and $\bar a = [a; 1]$ (the input with
the bias as a ones column), sample n's log-likelihood gradient is $g_n \bar a_n^\top$, where $g_n$ is the gradient
at the layer's output (the pre-activation). The Fisher block of $\mathrm{vec}(\bar W)$ (column-major) is
$\mathbb{E}[(\bar a \bar a^\top) \otimes (g g^\top)]$, which KFAC (Martens & Grosse, 2015) approximates by

$$
F \approx A \otimes G, \qquad A = \frac1N \sum_n \bar a_n \bar a_n^\top, \qquad
G = \frac1N \sum_n \mathbb{E}_{y \sim q_n}\!\left[g_n g_n^\top\right],
$$

with $q_n$ the `fisher_type`'s labels and weights, exactly as the diagonal Fisher
([`lifelong.methods.fisher`][lifelong.methods.fisher]) takes them: the true label (``empirical``), one label drawn
from the model (``sampled``), every class weighted by $p(c \mid x_n)$ (``exact``, C backward passes), or Mammoth's
``weighted``. The diagonal of $A \otimes G$ is $G_{oo} A_{ii} = \mathbb{E}[g_o^2]\,\mathbb{E}[\bar a_i^2]$ where the
diagonal Fisher has $\mathbb{E}[g_o^2 \bar a_i^2]$: the two have the same scale, so one lambda means the same for
both.

``nn.Conv2d`` (groups 1, numeric zero padding) follows Grosse & Martens (2016, KFC): $\bar a_{n,t}$ are the
unfolded input patches at the output positions $t \in T$ (``C_in * kh * kw`` values and a 1), with the weight
flattened to ``(out, C_in * kh * kw)`` in the same order, and

$$
A = \frac1N \sum_n \sum_{t} \bar a_{n,t} \bar a_{n,t}^\top, \qquad
G = \frac1N \sum_n \frac{1}{|T|} \sum_t \mathbb{E}_{y}\!\left[g_{n,t} g_{n,t}^\top\right].
$$

An ``nn.Linear`` applied to inputs with extra dimensions (tokens) is treated the same way, its positions as $T$
(the "expand" form). Every other parameter - normalisation layers, embeddings, a layer called more than once per
forward pass (shared weights), a layer with its own per-sample rule (DWA's) - keeps the exact diagonal Fisher,
summed in the same pass (`kfac_sums`).

As with the diagonal, the functions return sums over samples and the sample count, so data-parallel ranks
all-reduce both before dividing. The penalty built on these factors is
[`lifelong.methods.kfac_penalty`][lifelong.methods.kfac_penalty].
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lifelong.methods.fisher import Batches, FisherSums, FisherType, call_model, fisher_sums

_ROWS = 1 << 15  # rows of unfolded patches per matmul: bounds the memory of a convolution's patches


def kronecker_candidates(model: nn.Module, params: Mapping[str, nn.Parameter]) -> dict[str, nn.Module]:
    """The layers the factors can cover: ``nn.Linear`` and ``nn.Conv2d`` (groups 1, numeric zero padding) whose every
    parameter is in ``params`` and belongs to no other module, and which bring no per-sample rule of their own."""
    wanted = {id(p) for p in params.values()}
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if callable(getattr(module, "per_sample_grad_powers", None)):
            continue
        conv_ok = (
            isinstance(module, nn.Conv2d)
            and module.groups == 1
            and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)
        )
        if not (isinstance(module, nn.Linear) or conv_ok):
            continue
        own = list(module.parameters(recurse=False))
        if own and all(id(p) in wanted and owners[id(p)] == 1 for p in own):
            out[name] = module
    return out


def calls_per_forward(model: nn.Module, layers: Mapping[str, nn.Module], batch: tuple) -> dict[str, int]:
    """How many times one forward pass (eval mode, no gradient) calls each of ``layers``."""
    calls = dict.fromkeys(layers, 0)

    def counter(name: str):  # type: ignore[no-untyped-def]
        def hook(*_: object) -> None:
            calls[name] += 1

        return hook

    handles = [m.register_forward_hook(counter(n)) for n, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            call_model(model, batch[0], batch[2])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return calls


def input_rows(module: nn.Module, a: Tensor) -> Tensor:
    """A layer's input as rows $\\bar a$ ``(B, T, in [+ 1])``: a Linear's (extra dimensions flattened into T) or a
    convolution's unfolded patches; the ones column when the layer has a bias."""
    if isinstance(module, nn.Conv2d):
        padding = cast(tuple[int, ...], module.padding)  # numeric: kronecker_candidates took no string padding
        patches = F.unfold(a, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
        rows = patches.transpose(1, 2)
    else:
        rows = a.reshape(a.shape[0], -1, a.shape[-1])
    if getattr(module, "bias", None) is not None:
        rows = torch.cat([rows, rows.new_ones(*rows.shape[:2], 1)], dim=2)
    return rows


def patch_moment(x: Tensor, conv: nn.Conv2d) -> Tensor:
    r"""$\sum_n \sum_t \bar a_{n,t} \bar a_{n,t}^\top$ of a stride-1, dilation-1 convolution, without its patches.

    Patches overlap: entry $((c, i, j), (c', i', j'))$ sums $x_c(r, s)\, x_{c'}(r + i' - i, s + j' - j)$ over the
    rectangle of input positions that the output positions reach from kernel offset $(i, j)$. So the products are
    summed over the batch once per offset $(i' - i, j' - j)$ (half of them: $A$ is symmetric), in one batched
    matmul over the input's positions, and each entry is a window sum of them: about ``2 kh kw H (W + kw - 1) C^2``
    multiply-adds a sample instead of the unfolded patches' ``H' W' (C kh kw)^2`` (the CNN's second layer: 41 x 14
    x 18 x 32^2 against 196 x 800^2, 12x fewer), and no ``(B, T, C kh kw)`` tensor. The same sums as ``rows.T @
    rows`` of `input_rows`, tested.
    """
    n, c, h, w = x.shape
    (kh, kw), (ph, pw) = conv.kernel_size, cast(tuple[int, int], conv.padding)
    ho, wo = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1  # the output
    wx = w + kw - 1  # each row followed by zeros: a column shift that leaves the row lands on zeros
    grid = x.new_zeros(h + 2 * kh, wx, n, c)  # (rows, columns, N, C), zero rows above and below
    grid[kh : kh + h, :w] = x.permute(2, 3, 0, 1)
    flat = grid.flatten(0, 1)  # (positions, N, C): a shift by (di, dj) is a shift by di * wx + dj
    start = kh * wx
    left = flat[start : start + h * wx].transpose(1, 2).contiguous()  # (h * wx, C, N), made once for every bmm
    # which input rows (columns) the output reaches from each kernel offset: [i - ph, i - ph + ho), clipped
    row_windows = _windows(kh, ph, ho, h, h, x)  # (kh, h) of 0 and 1
    col_windows = _windows(kw, pw, wo, w, wx, x)  # (kw, wx): the zero columns after each row in no window

    def windows(m: Tensor) -> Tensor:
        """Sums of ``m`` ``(h, wx, ...)`` over each kernel offset's window of the input: ``(kh, kw, ...)``."""
        by_rows = (row_windows @ m.reshape(h, -1)).view(kh, wx, -1)
        return (col_windows @ by_rows).view(kh, kw, *m.shape[2:])

    moment = x.new_zeros(c, kh, kw, c, kh, kw)
    view = moment.permute(1, 2, 4, 5, 0, 3)  # (kh, kw, kh, kw, C, C): indexed by the kernel offsets first
    # half the offsets: A is symmetric, so the block of offset -(di, dj) is the transposed block of (di, dj)
    for di, dj in ((di, dj) for di in range(kh) for dj in range(-(kw - 1), kw) if di > 0 or dj >= 0):
        shift = start + di * wx + dj
        prod = torch.bmm(left, flat[shift : shift + h * wx]).view(h, wx, c, c)
        i = torch.arange(0, kh - di, device=x.device)[:, None]
        j = torch.arange(max(0, -dj), min(kw, kw - dj), device=x.device)[None, :]
        i, j = torch.broadcast_tensors(i, j)
        blocks = windows(prod)[i, j]  # (len i, len j, C, C)
        view[i, j, i + di, j + dj] = blocks
        view[i + di, j + dj, i, j] = blocks.transpose(-1, -2)
    moment = moment.view(c * kh * kw, c * kh * kw)
    if conv.bias is None:
        return moment
    column = windows(grid[kh : kh + h].sum(2)).permute(2, 0, 1).flatten()  # the ones column: sums of the patches
    out = x.new_empty(c * kh * kw + 1, c * kh * kw + 1)
    out[:-1, :-1], out[:-1, -1], out[-1, :-1], out[-1, -1] = moment, column, column, n * ho * wo
    return out


def _windows(kernel: int, padding: int, out: int, size: int, width: int, like: Tensor) -> Tensor:
    """``(kernel, width)``: 1 where input position p (of ``size``) is in the window ``[k - padding, k - padding +
    out)`` that the ``out`` output positions reach from kernel offset k."""
    first = torch.arange(kernel, device=like.device)[:, None] - padding
    p = torch.arange(width, device=like.device)[None, :]
    return ((p >= first) & (p < first + out) & (p < size)).to(like.dtype)


def output_rows(module: nn.Module, g: Tensor) -> Tensor:
    """The gradient at a layer's output as rows ``(B, T, out)``."""
    if isinstance(module, nn.Conv2d):
        return g.flatten(2).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


class FactorSums:
    r"""Sums over samples of $\sum_t \bar a \bar a^\top$ and of the weighted $\frac{1}{|T|}\sum_t g g^\top$, per layer.

    `fisher_sums` calls `add_input` once per batch and `add_grad` once per label pass (C times for ``exact``).
    """

    def __init__(self, layers: Mapping[str, nn.Module]) -> None:
        self.layers = dict(layers)
        self.a: dict[str, Tensor] = {}
        self.g: dict[str, Tensor] = {}

    def add_input(self, name: str, a: Tensor) -> None:
        module = self.layers[name]
        if isinstance(module, nn.Conv2d) and module.stride == (1, 1) and module.dilation == (1, 1):
            moment = patch_moment(a, module)
            self.a[name] = moment if name not in self.a else self.a[name].add_(moment)
            return
        n = a.shape[0]
        positions = max(1, input_rows(module, a[:1]).shape[1])
        step = max(1, _ROWS // positions)  # samples per chunk: a convolution's patches are T times its input
        total = self.a.get(name)
        for start in range(0, n, step):
            rows = input_rows(module, a[start : start + step]).flatten(0, 1)  # (b * T, in [+ 1])
            total = rows.T @ rows if total is None else total.addmm_(rows.T, rows)
        assert total is not None
        self.a[name] = total

    def add_grad(self, name: str, g: Tensor, weights: Tensor) -> None:
        rows = output_rows(self.layers[name], g)  # (B, T, out)
        scaled = rows * (weights / rows.shape[1])[:, None, None]
        rows, scaled = rows.flatten(0, 1), scaled.flatten(0, 1)
        total = self.g.get(name)
        self.g[name] = scaled.T @ rows if total is None else total.addmm_(scaled.T, rows)


@dataclass
class KroneckerSums:
    """What `kfac_sums` returns: per layer the sums of ``A`` and ``G`` (divide by ``count``), the parameter names
    each layer's factors cover, and the diagonal Fisher's sums of every parameter the factors do not cover."""

    a: dict[str, Tensor]
    g: dict[str, Tensor]
    params: dict[str, tuple[str, str | None]]  # layer -> (weight's name, bias's name or None)
    diagonal: FisherSums

    @property
    def count(self) -> int:
        return self.diagonal.count


def kfac_sums(
    model: nn.Module,
    batches: Batches,
    fisher_type: FisherType | str = "empirical",
    *,
    params: Mapping[str, nn.Parameter] | None = None,
    generator: torch.Generator | None = None,
) -> KroneckerSums:
    """The Kronecker factors' sums of ``params``' layers, and the diagonal Fisher of the rest, in one pass.

    The first batch is also run once on its own, to find layers called more than once per forward pass (their
    gradient is a sum over calls, which one Kronecker pair does not describe): they keep the diagonal.

    Args: as [`fisher_sums`][lifelong.methods.fisher.fisher_sums].
    """
    if params is None:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    stream = iter(batches)
    first = next(stream, None)
    if first is None:
        raise ValueError("the Fisher was estimated on no samples (is the task's training data empty?)")
    layers = kronecker_candidates(model, params)
    calls = calls_per_forward(model, layers, first)
    layers = {n: m for n, m in layers.items() if calls[n] == 1}
    names = {id(p): n for n, p in params.items()}
    covered: dict[str, tuple[str, str | None]] = {}
    for name, m in layers.items():
        bias = getattr(m, "bias", None)
        covered[name] = (names[id(m.weight)], names[id(bias)] if bias is not None else None)
    taken = {n for pair in covered.values() for n in pair if n is not None}
    rest = {n: p for n, p in params.items() if n not in taken}
    factors = FactorSums(layers)
    diagonal = fisher_sums(
        model, itertools.chain([first], stream), fisher_type, params=rest, generator=generator, factors=factors
    )
    for name, (wname, bname) in covered.items():  # a layer the data never reached (an unused head): zero factors
        weight = params[wname]
        k = weight[0].numel() + (1 if bname is not None else 0)
        factors.a.setdefault(name, weight.new_zeros(k, k))
        factors.g.setdefault(name, weight.new_zeros(weight.shape[0], weight.shape[0]))
    return KroneckerSums(factors.a, factors.g, covered, diagonal)
