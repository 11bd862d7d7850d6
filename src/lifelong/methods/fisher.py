"""The diagonal Fisher information, per sample and exact, in vectorised form.

For a classifier with output distribution p(y | x, theta), the diagonal Fisher of parameter i is

    F_i = 1/N sum_n E_{y ~ q_n} [ (d log p(y | x_n) / d theta_i)^2 ]

with ``q_n`` chosen by ``fisher_type``:

* ``empirical``: the true label (a point mass) - one backward pass per batch;
* ``sampled``: one label drawn from the model's own p(y | x_n) - one backward pass per batch, an unbiased
  estimate of the true Fisher;
* ``exact``: the expectation over all C classes, weighted by p(c | x_n) - C backward passes per batch;
* ``weighted``: the true label's term of ``exact`` alone, its squared gradient weighted by p(y_n | x_n) - one
  backward pass per batch. Not a Fisher of its own, but the estimator of Mammoth's online EWC (Buzzega et al.
  2020 and its baselines), whose lambdas are only comparable with it: the samples a network gets wrong, whose
  gradients are largest, count for little.

Every term is a *per-sample* squared gradient. Squaring a mini-batch mean gradient instead (as several
libraries do) is a different, batch-size-dependent quantity, about 1/B of this one for uncorrelated
samples, which is why lambdas do not transfer between such estimators.

Per-sample gradients come from one batched backward pass: for ``nn.Linear``, the gradient of sample n is
``g_n a_n^T`` (g: gradient of the loss at the layer's output, a: the layer's input), so the sum of squares
over the batch is ``(g**2).T @ (a**2)`` (for ``exact``, the weighted ``g**2`` of all C classes are summed
before that one matmul); for ``nn.Conv2d``, a grouped convolution with one group per sample gives the
per-sample weight gradients. Any other parameter (and any layer called more than once per forward pass,
whose per-sample gradient is a sum of terms) falls back to ``torch.func.vmap`` over per-sample gradients,
which is exact but slower.

The functions here return *sums* over samples and the sample count, so that data-parallel ranks can
all-reduce both before dividing (the Fisher is then the same on every rank and equal to the single-process
one).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap
from torch.nn.grad import conv2d_weight

FisherType = Literal["empirical", "sampled", "exact", "weighted"]
FISHER_TYPES: tuple[str, ...] = ("empirical", "sampled", "exact", "weighted")

# what the estimators iterate over: lifelong.data.tensors.Batch (its rows are not used), or plain (x, y, task) tuples
Batches = Iterable[tuple[Any, ...]]


class FactorAccumulator(Protocol):
    """What `fisher_sums` hands the layers it does not square per sample (the Kronecker factors' sums)."""

    layers: dict[str, nn.Module]

    def add_input(self, name: str, a: Tensor) -> None: ...

    def add_grad(self, name: str, g: Tensor, weights: Tensor) -> None: ...


def _log_softmax(logits: Tensor) -> Tensor:
    """Log-probabilities, in at least float32 (half-precision logits are upcast)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return torch.log_softmax(logits, dim=-1)


def call_model(model: nn.Module, x: Tensor, task: Tensor) -> Tensor:
    """Logits of ``model``: called as ``model(x, task)`` if it declares ``takes_task``, else ``model(x)``."""
    return model(x, task) if getattr(model, "takes_task", False) else model(x)


@dataclass
class FisherSums:
    """Per-parameter sums of (weighted) squared per-sample gradients, and how many samples they cover."""

    sums: dict[str, Tensor]
    count: int = 0
    fast: list[str] = field(default_factory=list)  # parameters done by the batched Linear/Conv2d rule
    fallback: list[str] = field(default_factory=list)  # parameters done by torch.func

    def mean(self) -> dict[str, Tensor]:
        if self.count == 0:
            raise ValueError("the Fisher was estimated on no samples")
        return {k: v / self.count for k, v in self.sums.items()}


def _fast_rule(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear) or callable(getattr(module, "per_sample_grad_powers", None)):
        return True
    return (
        isinstance(module, nn.Conv2d)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


_CONV_CHUNK = 32  # samples per grouped convolution: keeps the per-sample gradients (chunk, C_out, K) in cache


def abs_pow_(t: Tensor, power: int) -> Tensor:
    """``|t| ** power`` in place (``t`` is a fresh temporary): squares for the Fisher, magnitudes for MAS."""
    return t.square_() if power == 2 else t.abs_()


def per_sample_grad_powers(module: nn.Module, a: Tensor, g: Tensor, w: Tensor, power: int = 2) -> dict[str, Tensor]:
    """Sum over the batch of ``w_n * |per-sample gradient| ** power`` for a Linear or Conv2d layer.

    Args:
        module: the layer.
        a: its input, ``(B, ..., in)`` for Linear, ``(B, C_in, H, W)`` for Conv2d.
        g: gradient of the summed loss at its output (same leading shapes as the output).
        w: ``(B,)`` per-sample weights (1 for empirical/sampled, p(c|x) for exact).
        power: 2 (the Fisher's squares) or 1 (MAS's magnitudes).

    A layer that computes with per-sample weights (DWA's masked layers) brings its own rule, a method
    ``per_sample_grad_powers(a, g, w, power)``; it is used instead.
    """
    own_rule = getattr(module, "per_sample_grad_powers", None)
    if callable(own_rule):
        return own_rule(a, g, w, power)
    out: dict[str, Tensor] = {}
    if isinstance(module, nn.Linear):  # with extra dims (e.g. tokens); (B, in) inputs are done in fisher_sums
        # a sample's gradient sums over the extra dims before squaring
        a3, g3 = a.flatten(1, -2), g.flatten(1, -2)  # (B, S, in), (B, S, out)
        gw = torch.einsum("bso,bsi->boi", g3, a3)  # (B, out, in)
        out["weight"] = torch.einsum("b,boi->oi", w, abs_pow_(gw, power))
        if module.bias is not None:
            out["bias"] = torch.einsum("b,bo->o", w, abs_pow_(g3.sum(1), power))
        return out
    assert isinstance(module, nn.Conv2d) and not isinstance(module.padding, str)
    # Per-sample weight gradients by one grouped convolution per chunk: the batch becomes the groups, so
    # the weight gradient of group n is sample n's (the trick of Goodfellow, 2015, as used by Opacus);
    # several times faster than unfolding the input into patches.
    weight = torch.zeros_like(module.weight)
    for start in range(0, a.shape[0], _CONV_CHUNK):
        gw = conv_weight_grads(module, a[start : start + _CONV_CHUNK], g[start : start + _CONV_CHUNK])
        weight += torch.einsum("b,boikl->oikl", w[start : start + _CONV_CHUNK], abs_pow_(gw, power))
    out["weight"] = weight
    if module.bias is not None:
        out["bias"] = torch.einsum("b,bo->o", w, abs_pow_(g.sum((2, 3)), power))
    return out


def conv_weight_grads(conv: nn.Module, a: Tensor, g: Tensor) -> Tensor:
    """Per-sample weight gradients ``(B, C_out, C_in, kh, kw)`` of a convolution by one grouped convolution:
    the batch becomes the groups, so the weight gradient of group n is sample n's.

    Args:
        conv: an ``nn.Conv2d`` (groups=1, numeric padding), or a layer with the same ``weight``, ``stride``,
            ``padding`` and ``dilation`` (DWA's masked convolution).
        a: its input ``(B, C_in, H, W)``.
        g: the gradient at its output ``(B, C_out, H', W')``.
    """
    c_out, c_in, kh, kw = cast(Tensor, conv.weight).shape
    n = a.shape[0]
    return conv2d_weight(
        a.reshape(1, n * c_in, *a.shape[2:]),
        (n * c_out, c_in, kh, kw),
        g.reshape(1, n * c_out, *g.shape[2:]),
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=n,
    ).view(n, c_out, c_in, kh, kw)


class Recorder:
    """Forward hooks that record each fast-rule layer's input and output during one forward pass."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.records: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in modules}
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            self.records[name].append((inputs[0].detach(), output))

        return hook

    def clear(self) -> None:
        for v in self.records.values():
            v.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def plan_layers(model: nn.Module, params: Mapping[str, nn.Parameter]) -> tuple[dict[str, nn.Module], list[str]]:
    """Split ``params`` into layers handled by the fast rule and names left to the fallback."""
    wanted = {id(p): name for name, p in params.items()}
    owners: dict[int, int] = {}
    for _, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    fast: dict[str, nn.Module] = {}
    covered: set[int] = set()
    for mname, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if not own or not _fast_rule(module):
            continue
        # every parameter of the layer must be wanted and owned by this layer alone (no weight tying)
        if all(id(p) in wanted and owners[id(p)] == 1 for p in own):
            fast[mname] = module
            covered.update(id(p) for p in own)
    fallback = [name for name, p in params.items() if id(p) not in covered]
    return fast, fallback


class PerSampleSums:
    """The skeleton every per-sample importance sum shares (this module's Fisher, MAS's magnitudes).

    On entry it splits ``params`` into fast-rule layers and a ``torch.func`` fallback, puts the model in eval
    mode (dropout off, batch-norm on running statistics, so samples do not interact) and records the fast
    layers' inputs and outputs; on exit it restores the mode and notes in `result` which parameters
    took which path. Per batch: `start` before the forward pass, `used` after it.
    """

    def __init__(
        self, model: nn.Module, params: Mapping[str, nn.Parameter], factored: Mapping[str, nn.Module] | None = None
    ) -> None:
        self.model = model
        self.fast, self.fallback = plan_layers(model, params)
        self.factored = dict(factored or {})  # layers whose inputs and output gradients a FactorSums takes
        self.names = {id(p): n for n, p in params.items()}
        self.result = FisherSums(_zeros(params))

    def __enter__(self) -> PerSampleSums:
        self._was_training = self.model.training
        self.model.eval()
        self.recorder = Recorder({**self.fast, **self.factored})
        return self

    def __exit__(self, *exc: object) -> None:
        self.recorder.remove()
        self.model.train(self._was_training)
        self.result.fast = [self.names[id(p)] for m in self.fast.values() for p in m.parameters(recurse=False)]
        self.result.fallback = sorted(set(self.fallback))

    def start(self) -> None:
        self.recorder.clear()

    def used(self) -> list[tuple[nn.Module, Tensor, Tensor]]:
        """``(layer, input, output)`` of each fast layer the forward pass used.

        A layer called more than once per forward pass (its per-sample gradient is a sum of terms) goes to the
        fallback from now on.
        """
        for name in [n for n, rec in self.recorder.records.items() if len(rec) > 1 and n in self.fast]:
            module = self.fast.pop(name)
            self.fallback += [self.names[id(p)] for p in module.parameters(recurse=False)]
        return [(self.fast[n], *rec[0]) for n, rec in self.recorder.records.items() if n in self.fast and rec]

    def used_factored(self) -> list[tuple[str, Tensor, Tensor]]:
        """``(name, input, output)`` of each factored layer the forward pass used (once: `kfac_sums` checked)."""
        return [(n, *self.recorder.records[n][0]) for n in self.factored if self.recorder.records[n]]

    def add(self, module: nn.Module, sums: Mapping[str, Tensor]) -> None:
        """Add a layer's sums, keyed by the layer's own parameter names (``weight``, ``bias``)."""
        for pname, s in sums.items():
            self.result.sums[self.names[id(getattr(module, pname))]] += s

    def add_linear(self, module: nn.Module, g_pow: Tensor, a_pow: Tensor) -> None:
        """A Linear layer on ``(B, in)`` inputs: per-sample ``|g_n a_n^T| ** p`` summed is ``|g|**p .T @ |a|**p``."""
        self.add(module, {"weight": g_pow.T @ a_pow, **({"bias": g_pow.sum(0)} if module.bias is not None else {})})


def _labels_and_weights(
    log_probs: Tensor, y: Tensor, fisher_type: str, generator: torch.Generator | None
) -> list[tuple[Tensor, Tensor]]:
    """The (labels, per-sample weights) of each backward pass this Fisher type needs."""
    b, c = log_probs.shape
    ones = torch.ones(b, device=log_probs.device)
    if fisher_type == "empirical":
        return [(y, ones)]
    if fisher_type == "weighted":
        return [(y, log_probs.detach().gather(1, y[:, None]).squeeze(1).exp())]
    if fisher_type == "sampled":
        probs = log_probs.detach().exp()
        if generator is not None and generator.device != probs.device:
            sampled = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(probs.device)
        else:
            sampled = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        return [(sampled, ones)]
    if fisher_type == "exact":
        probs = log_probs.detach().exp()
        return [(torch.full((b,), k, device=y.device, dtype=torch.long), probs[:, k]) for k in range(c)]
    raise ValueError(f"fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}")


def _fallback_batch(
    model: nn.Module,
    names: list[str],
    params: Mapping[str, nn.Parameter],
    x: Tensor,
    task: Tensor,
    passes: list[tuple[Tensor, Tensor]],
) -> dict[str, Tensor]:
    """Per-sample squared gradients of ``names`` by ``torch.func`` (vmap over the batch)."""
    sub = {n: params[n].detach() for n in names}

    def log_probs_one(p: dict[str, Tensor], xi: Tensor, ti: Tensor) -> Tensor:
        logits = (
            functional_call(model, p, (xi[None], ti[None]), strict=False)
            if getattr(model, "takes_task", False)
            else functional_call(model, p, (xi[None],), strict=False)
        )
        return _log_softmax(logits)[0]  # (C,)

    sums = {n: torch.zeros_like(v) for n, v in sub.items()}
    if len(passes) == 1:  # one label per sample
        ((labels, weights),) = passes

        def nll(p: dict[str, Tensor], xi: Tensor, ti: Tensor, yi: Tensor) -> Tensor:
            return -log_probs_one(p, xi, ti).gather(0, yi[None])[0]  # indexing by a tensor breaks vmap

        grads = vmap(grad(nll), in_dims=(None, 0, 0, 0))(sub, x, task, labels)
        for n, gn in grads.items():
            sums[n] += torch.einsum("b,b...->...", weights, gn.detach().square())  # (no graph to the other weights)
    else:  # exact: the Jacobian over all classes, weighted by p(c | x)
        jac = vmap(jacrev(log_probs_one), in_dims=(None, 0, 0))(sub, x, task)  # (B, C, *shape)
        probs = torch.stack([w for _, w in passes], dim=1)  # (B, C)
        for n, jn in jac.items():
            sums[n] += torch.einsum("bc,bc...->...", probs, jn.detach().square())
    return sums


@torch.no_grad()
def _zeros(params: Mapping[str, nn.Parameter]) -> dict[str, Tensor]:
    return {n: torch.zeros_like(p) for n, p in params.items()}


def fisher_sums(
    model: nn.Module,
    batches: Batches,
    fisher_type: FisherType | str = "empirical",
    *,
    params: Mapping[str, nn.Parameter] | None = None,
    generator: torch.Generator | None = None,
    factors: FactorAccumulator | None = None,
) -> FisherSums:
    """Sums over samples of the squared per-sample gradients of the log-likelihood (see module docstring).

    The model is in eval mode for the estimate (see `PerSampleSums`).

    Args:
        model: a classifier returning logits (see `call_model` for how it is called).
        batches: ``(x, y, task)`` batches of the data to estimate on.
        fisher_type: ``"empirical"``, ``"sampled"`` or ``"exact"``.
        params: the parameters to estimate, by name; default: all that require grad.
        generator: random generator for ``sampled`` labels (for reproducibility).
        factors: layers whose Kronecker factors are summed in the same pass (their parameters are not in
            ``params``): each batch's input and each label pass's output gradient and weights go to it
            ([`lifelong.methods.kfac`][lifelong.methods.kfac]).

    Returns:
        `FisherSums`; ``.mean()`` is the diagonal Fisher.
    """
    if fisher_type not in FISHER_TYPES:
        raise ValueError(f"fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}")
    if params is None:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with PerSampleSums(model, params, factors.layers if factors is not None else None) as est:
        for x, y, task, *_ in batches:
            est.start()
            with torch.enable_grad():
                log_probs = _log_softmax(call_model(model, x, task))  # (B, C)
            passes = _labels_and_weights(log_probs, y, fisher_type, generator)
            used, factored = est.used(), est.used_factored()
            for name, a, _ in factored:
                cast(FactorAccumulator, factors).add_input(name, a.detach())
            outputs = [out for _, _, out in used] + [out for _, _, out in factored]
            # Linear layers on (B, in) inputs: sum w * g**2 over the passes first, then one matmul with a**2
            # (the input does not depend on the label), so `exact` costs C backward passes but one matmul
            g2_sums: dict[nn.Module, tuple[Tensor, Tensor]] = {}
            for i, (labels, weights) in enumerate(passes):
                if not outputs:
                    break
                loss = F.nll_loss(log_probs, labels, reduction="sum")
                with torch.enable_grad():
                    grads = torch.autograd.grad(loss, outputs, retain_graph=i < len(passes) - 1, allow_unused=True)
                for (name, _, _), g in zip(factored, grads[len(used) :], strict=True):
                    if g is not None:
                        cast(FactorAccumulator, factors).add_grad(name, g.detach(), weights)
                for (module, a, _), g in zip(used, grads[: len(used)], strict=True):
                    if g is None:
                        continue
                    if isinstance(module, nn.Linear) and a.ndim == 2:
                        g2 = g.detach().square().mul_(weights[:, None])  # (B, out)
                        g2_sums[module] = (a, g2_sums[module][1].add_(g2) if module in g2_sums else g2)
                        continue
                    est.add(module, per_sample_grad_powers(module, a, g.detach(), weights))
            for module, (a, g2) in g2_sums.items():
                est.add_linear(module, g2, a.square())
            if est.fallback:
                for n, s in _fallback_batch(model, est.fallback, params, x, task, passes).items():
                    est.result.sums[n] += s
            est.result.count += int(y.shape[0])
    return est.result


def per_sample_loop_fisher(
    model: nn.Module,
    batches: Batches,
    fisher_type: FisherType | str = "empirical",
    *,
    params: Mapping[str, nn.Parameter] | None = None,
    generator: torch.Generator | None = None,
) -> FisherSums:
    """The same sums by the textbook loop: one backward pass per sample (per class for ``exact``).

    Slow by design: it is the reference the vectorised `fisher_sums` is tested and benchmarked
    against. Sampled labels are drawn batch by batch exactly as `fisher_sums` draws them, so the
    same generator state gives the same labels.
    """
    if params is None:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    names, tensors = list(params), list(params.values())
    result = FisherSums(_zeros(params))
    was_training = model.training
    model.eval()
    try:
        for x, y, task, *_ in batches:
            with torch.no_grad():
                log_probs = _log_softmax(call_model(model, x, task))
            passes = _labels_and_weights(log_probs, y, fisher_type, generator)
            for n in range(x.shape[0]):
                with torch.enable_grad():
                    lp = _log_softmax(call_model(model, x[n : n + 1], task[n : n + 1]))[0]
                    for k, (labels, weights) in enumerate(passes):
                        gs = torch.autograd.grad(-lp[labels[n]], tensors, retain_graph=k < len(passes) - 1)
                        for name, g in zip(names, gs, strict=True):
                            result.sums[name] += weights[n] * g.square()
            result.count += int(y.shape[0])
    finally:
        model.train(was_training)
    return result
