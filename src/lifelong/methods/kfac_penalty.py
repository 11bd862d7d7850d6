r"""EWC's penalty with Kronecker-factored Fisher blocks, its gradient, how blocks are kept across tasks, its state.

Per layer $\ell$ with stacked weights $\bar W = [W \mid b]$ and one factor pair $(A, G)$ anchored at $\bar W^*$:

$$
\mathrm{vec}(\Delta)^\top (A \otimes G)\, \mathrm{vec}(\Delta) = \mathrm{tr}(\Delta^\top G \Delta A), \qquad
\Delta = \bar W - \bar W^*,
$$

whose gradient is $2\, G \Delta A$: two matrix products, ``out^2 (in+1) + out (in+1)^2`` multiply-adds. The
difference is taken first (as the diagonal's gradient does, for the same reason: at the anchor the gradient is
exactly zero, not the round-off of two large products, which Adam would turn into full steps).

Across tasks (``mode``):

* ``separate`` keeps every finished task's pair and anchor, exactly: $\sum_k \mathrm{tr}(\Delta_k^\top G_k \Delta_k
  A_k)$. The sum of Kronecker products is not one Kronecker product, so memory and the step's cost grow linearly
  with the tasks: per task ``(in+1)^2 + out^2 + out (in+1)`` floats and one more pair of products per step.
* ``online`` keeps one pair anchored at the latest task, $\gamma (A_o \otimes G_o) + A_k \otimes G_k$ merged into
  one Kronecker product by an approximation (``merge``):

  - ``"average"``: $A = \frac{\gamma\,\mathrm{tr}(G_o) A_o + \mathrm{tr}(G_k) A_k}{\gamma\,\mathrm{tr}(A_o)
    \mathrm{tr}(G_o) + \mathrm{tr}(A_k) \mathrm{tr}(G_k)}$, $G = \gamma\,\mathrm{tr}(A_o) G_o + \mathrm{tr}(A_k)
    G_k$: each factor averaged with the other factor's trace as its weight (the averaged-A, summed-G merge of
    Mammoth's TAK and of the Laplace library, made invariant to how a pair's scale is split between its factors). It
    keeps the trace of the sum exactly, and it is exact whenever every task's A is the same up to a scale (then
    $\sum_k A \otimes G_k = A \otimes \sum_k G_k$), or every task's G is.
  - ``"pi"``: $(\gamma A_o + A_k / \pi) \otimes (G_o + \pi G_k)$ with $\pi = \sqrt{\mathrm{tr}(G_o)
    \mathrm{tr}(A_k) / (\mathrm{tr}(G_k)\,\gamma\,\mathrm{tr}(A_o))}$: Martens & Grosse's factored sum, as van de
    Ven's library merges its KFAC-EWC. It adds the cross terms $A_k \otimes G_o / \pi + \pi\, \gamma A_o \otimes
    G_k$ (the $\pi$ that minimises their trace), so it over-states the curvature: by a factor of about t after t
    tasks whose factors are alike.

Damping $\delta$ adds $\pi_d \sqrt\delta\, I$ to A and $\sqrt\delta / \pi_d\, I$ to G of every kept pair, with
$\pi_d = \sqrt{(\mathrm{tr}(A)/\dim A) / (\mathrm{tr}(G)/\dim G)}$ (Martens & Grosse, 2015, section 6.3; the
references in ``shared/reference/kfac.md`` damp the same way): about $\delta I$ added to the block, a pull of
strength $\delta$ toward the anchor in every direction. The penalty multiplies the factors, never inverts them,
so it needs no damping to be stable; damping is a prior precision, off by default. The state keeps the
undamped factors.

The step's two products per pair are its whole cost (``2.7x`` a training step's arithmetic on the MLP 2 x 400).
``matmul_precision`` is torch's float32 matmul precision for them alone: ``"highest"`` (float32, the default),
``"high"`` (TF32 on NVIDIA GPUs) or ``"medium"`` (bfloat16 products with float32 sums where the hardware has them:
GPUs, and CPUs with AVX512-BF16 or AMX), about 3 significant digits; the gradient at the anchor stays exactly zero.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lifelong.errors import ResumeError

MERGES = ("average", "pi")
PRECISIONS = ("highest", "high", "medium")


@contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """``torch.set_float32_matmul_precision(precision)`` for the block, the caller's setting after it."""
    before = torch.get_float32_matmul_precision()
    if before == precision:
        yield
        return
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


@dataclass
class Block:
    """One factor pair and its anchor: ``a`` (in+1, in+1), ``g`` (out, out), ``anchor`` (out, in+1)."""

    a: Tensor
    g: Tensor
    anchor: Tensor

    def to(self, device: torch.device) -> Block:
        return Block(self.a.to(device), self.g.to(device), self.anchor.to(device))


def stacked(weight: Tensor, bias: Tensor | None) -> Tensor:
    """$\\bar W = [W \\mid b]$: the weight flattened to ``(out, rest)``, the bias as a last column."""
    w = weight.detach().reshape(weight.shape[0], -1)
    return torch.cat([w, bias.detach()[:, None]], dim=1) if bias is not None else w.clone()


def merge_average(old: Block, new: Block, decay: float) -> tuple[Tensor, Tensor]:
    """``"average"`` (module docstring): $\\gamma A_o \\otimes G_o + A_k \\otimes G_k$ as one pair."""
    ta_o, tg_o, ta_n, tg_n = (t.trace() for t in (old.a, old.g, new.a, new.g))
    mass = decay * ta_o * tg_o + ta_n * tg_n
    if mass <= 0:  # both pairs zero (a layer no data reached)
        return new.a.clone(), new.g.clone()
    return (decay * tg_o * old.a + tg_n * new.a) / mass, decay * ta_o * old.g + ta_n * new.g


def merge_pi(old: Block, new: Block, decay: float) -> tuple[Tensor, Tensor]:
    """``"pi"`` (module docstring): Martens & Grosse's factored sum, van de Ven's ``additive_nearest_kf``."""
    a_o = decay * old.a
    ta_o, tg_o, ta_n, tg_n = (t.trace() for t in (a_o, old.g, new.a, new.g))
    if ta_o * tg_o <= 0:
        return new.a.clone(), new.g.clone()
    if ta_n * tg_n <= 0:
        return a_o, old.g.clone()
    pi = torch.sqrt(tg_o * ta_n / (tg_n * ta_o))
    return a_o + new.a / pi, old.g + pi * new.g


def damped(a: Tensor, g: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    r"""``(A + \pi\sqrt\delta I, G + \sqrt\delta/\pi I)`` (module docstring); the factors themselves for 0."""
    if damping == 0:
        return a, g
    ta, tg = a.trace() / a.shape[0], g.trace() / g.shape[0]
    pi = torch.sqrt(ta / tg) if ta > 0 and tg > 0 else torch.ones((), device=a.device)
    root = math.sqrt(damping)
    eye_a = torch.eye(a.shape[0], device=a.device, dtype=a.dtype)
    eye_g = torch.eye(g.shape[0], device=g.device, dtype=g.dtype)
    return a + pi * root * eye_a, g + root / pi * eye_g


class KroneckerPenalty:
    r"""$\kappa \sum_\ell \sum_{\text{kept pairs}} \mathrm{tr}(\Delta^\top G \Delta A)$ over the factored layers.

    Args:
        mode: ``"separate"`` (every task's pair) or ``"online"`` (one merged pair, latest anchor).
        decay: $\gamma$ of online mode.
        merge: ``"average"`` or ``"pi"`` (online mode's approximation).
        damping: $\delta \geq 0$.
        matmul_precision: ``"highest"``, ``"high"`` or ``"medium"`` (module docstring).
    """

    def __init__(
        self, mode: str, decay: float, merge: str = "average", damping: float = 0.0, matmul_precision: str = "highest"
    ) -> None:
        if merge not in MERGES:
            raise ValueError(f"method.kfac_merge must be one of {list(MERGES)}, got {merge!r}")
        if not (math.isfinite(damping) and damping >= 0):
            raise ValueError(f"method.kfac_damping must be a finite number >= 0, got {damping}")
        if matmul_precision not in PRECISIONS:
            raise ValueError(
                f"method.kfac_matmul_precision must be one of {list(PRECISIONS)}, got {matmul_precision!r}"
            )
        self.mode, self.decay, self.merge, self.damping = mode, float(decay), merge, float(damping)
        self.precision = matmul_precision
        self.params: dict[str, tuple[str, str | None]] = {}  # layer -> (weight's name, bias's name)
        self.blocks: dict[str, list[Block]] = {}  # layer -> its kept pairs (one in online mode)
        self._damped: dict[str, list[tuple[Tensor, Tensor]]] = {}  # what the step multiplies by
        self._buffers: dict[str, tuple[Tensor, Tensor, Tensor, Tensor]] = {}  # W-bar, Delta, G Delta, the sum
        self._module: tuple[nn.Module, dict[str, Tensor]] | None = None

    @torch.no_grad()
    def consolidate(
        self,
        a: Mapping[str, Tensor],
        g: Mapping[str, Tensor],
        covers: Mapping[str, tuple[str, str | None]],
        params: Mapping[str, Tensor],
    ) -> None:
        """Fold one finished task's factors (per layer, already divided by the count) and anchor into the state."""
        if self.params and dict(covers) != self.params:
            raise ValueError(f"the Kronecker-factored layers changed between tasks: {self.params} -> {dict(covers)}")
        self.params = dict(covers)
        for layer, (wname, bname) in covers.items():
            new = Block(a[layer], g[layer], stacked(params[wname], params[bname] if bname else None))
            kept = self.blocks.get(layer, [])
            if self.mode == "separate" or not kept:
                kept = [*kept, new]
            else:
                merge = merge_average if self.merge == "average" else merge_pi
                kept = [Block(*merge(kept[0], new, self.decay), new.anchor)]
            self.blocks[layer] = kept
        self._refresh()

    def _refresh(self) -> None:
        self._damped = {n: [damped(b.a, b.g, self.damping) for b in kept] for n, kept in self.blocks.items()}
        self._buffers, self._module = {}, None

    def to(self, device: torch.device) -> None:
        self.blocks = {n: [b.to(device) for b in kept] for n, kept in self.blocks.items()}
        self._refresh()

    def _deltas(self, named: Mapping[str, Tensor], layer: str) -> tuple[Tensor, ...]:
        """The layer's buffers, the stacked weights copied into the first (no allocation after the first step)."""
        wname, bname = self.params[layer]
        w = named[wname]
        if layer not in self._buffers:
            k = w[0].numel() + (1 if bname else 0)
            new = [torch.empty(w.shape[0], k, device=w.device, dtype=w.dtype) for _ in range(4)]
            self._buffers[layer] = (new[0], new[1], new[2], new[3])
        buf = self._buffers[layer]
        cols = w[0].numel()
        buf[0][:, :cols].copy_(w.detach().reshape(w.shape[0], cols))
        if bname:
            buf[0][:, cols].copy_(named[bname].detach())
        return buf

    @torch.no_grad()
    def add_grad(self, module: nn.Module, factor: float) -> None:
        """Add ``factor *`` $\\sum G \\Delta A$ to each covered parameter's ``.grad`` (``factor`` = 2 kappa)."""
        with matmul_precision(self.precision):
            self._add_grad(self._named(module), factor)

    def _named(self, module: nn.Module) -> dict[str, Tensor]:
        """``module``'s parameters by name (cached: the same objects for the whole fit)."""
        if self._module is None or self._module[0] is not module:
            self._module = (module, dict(module.named_parameters()))
        return self._module[1]

    def _add_grad(self, named: Mapping[str, Tensor], factor: float) -> None:
        for layer, pairs in self._damped.items():
            wbar, delta, gd, total = self._deltas(named, layer)
            for k, ((a, g), block) in enumerate(zip(pairs, self.blocks[layer], strict=True)):
                torch.sub(wbar, block.anchor, out=delta)
                torch.mm(g, delta, out=gd)
                if k == 0:
                    torch.mm(gd, a, out=total)
                else:
                    total.addmm_(gd, a)
            wname, bname = self.params[layer]
            for name, part in ((wname, total[:, : named[wname][0].numel()]), (bname, total[:, -1])):
                if name is None:
                    continue
                p = named[name]
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.view(p.shape[0], -1).add_(part.reshape(p.shape[0], -1), alpha=factor)

    @torch.no_grad()
    def value(self, module: nn.Module) -> Tensor:
        """$\\sum_\\ell \\sum \\mathrm{tr}(\\Delta^\\top G \\Delta A)$ (without the coefficient)."""
        named = self._named(module)
        total = torch.zeros((), device=next(iter(named.values())).device)
        for layer, pairs in self._damped.items():
            wbar = self._deltas(named, layer)[0]
            for (a, g), block in zip(pairs, self.blocks[layer], strict=True):
                delta = wbar - block.anchor
                with matmul_precision(self.precision):
                    total += ((g @ delta @ a) * delta).sum()
        return total

    def state_dict(self) -> dict[str, Any]:
        return {
            "merge": self.merge,
            "params": {n: list(p) for n, p in self.params.items()},
            "blocks": {
                n: [{"a": b.a.cpu(), "g": b.g.cpu(), "anchor": b.anchor.cpu()} for b in kept]
                for n, kept in self.blocks.items()
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["merge"] != self.merge and self.mode == "online":
            raise ResumeError(
                f"the checkpoint's KFAC factors were merged by {state['merge']!r}, this run uses "
                f"method.kfac_merge={self.merge!r}"
            )
        self.params = {n: (p[0], p[1]) for n, p in state["params"].items()}
        self.blocks = {n: [Block(b["a"], b["g"], b["anchor"]) for b in kept] for n, kept in state["blocks"].items()}
        self._refresh()
