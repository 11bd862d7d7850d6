r"""The DWA method (dynamic weight allocation; Geilert, "Pay attention to the Task: Avoid forgetting in sequential
learning through dynamic weight allocation"): a mask over every weight, generated for every sample from its input.

HAT learns one mask per *task* over a layer's *units*; DWA generates, for every *sample*, a mask over every
*weight* of the masked layers from a context embedding of the input itself, and protects earlier tasks
softly: a loss keeps the masks small on weights with a high Fisher value for earlier tasks, and a triplet
loss pulls a task's embeddings together and away from other tasks'.

The choices lifelong makes where the paper and its code (felixnext/dwa) differ, and the code's bugs it
fixes, are listed in the docs/methods.md ("DWA: what lifelong implements").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from lifelong.data.streams import TaskStream, stream_of
from lifelong.data.tensors import Batch, TaskData
from lifelong.errors import ResumeError
from lifelong.methods.base import (
    ContinualMethod,
    ContinualModule,
    log_now,
    module_of,
    refuse_sharded,
    require_task_scenario,
    wrapped_net,
)
from lifelong.methods.dwa.curriculum import Curriculum
from lifelong.methods.dwa.held import HeldMasks
from lifelong.methods.dwa.layers import CONTEXTS, MASK_FORMS, check_choice, check_gate, triplet
from lifelong.methods.dwa.net import DWANet
from lifelong.methods.dwa.options import check_options
from lifelong.methods.fisher import fisher_sums
from lifelong.methods.quadratic import all_reduce_mean, task_sample
from lifelong.seeding import generator


class DWA(ContinualMethod):
    r"""Dynamic weight allocation (Geilert, "Pay attention to the Task", a fork of HAT); the task scenario.

    The network is wrapped in a `DWANet`. The loss of a training step is

    $$
    L_{task} + \lambda_1 L_{emb} + \lambda_2 \sum_j L_{pl,j} + \lambda_3 \sum_j R_{sp,j}
    $$

    averaged over the batch's samples, each term per sample ``b``:

    * $L_{emb} = (1 - \zeta_b)\,(T(E_b, P, N) + \delta\,T(E_b, P, N_T))$ with the triplet loss
      $T(E, P, N) = [\|E - P\|^2 - \|E - N\|^2 + \alpha]_+$ and the sample's complexity
      $\zeta_b$ (from the second task on; ``anchor_first_task`` also on the first, without the
      $N_T$ term). The anchors are recomputed at the start of every epoch from the current network:
      $P$ the mean embedding of ``anchor_samples`` low-complexity samples ($\zeta < 0.4$) of
      the task; $N$ of ``negative_searches`` random unit directions orthogonal to $P$, the one
      whose injection as every sample's embedding gives the highest task loss on them; $N_T$ of the
      earlier tasks' stored anchors, the one giving the highest loss. A task's anchor $P$ is stored
      when it ends.
    * $L_{pl,j} = \sum_i F_i |M_{b,i}|$ over the weights of masked layer $j$, with $F$
      the diagonal Fisher of those weights (per-sample, empirical, from lifelong's engine), the mean of
      the earlier tasks' Fishers (the paper's running merge).
    * $R_{sp,j} = [\frac{1}{|M_j|} \sum_i a(M_{b,i}) - \mu]_+$, where the soft activity $a$ is
      $\max(M, 0)$ for tanh masks ($M$ for sigmoid ones): the paper's fraction of active mask
      entries, $\mathbb{1}(H > 0)$, in the gate's saturated limit, with a gradient towards sparse masks
      (``sparsity="code"``: $a(M) = 1 - |M|$, the original code's).

    The curriculum (``curriculum``) trains each epoch only on the task's samples with
    $\zeta \le \min(1, s + (1 - s)\,e / E_c)$ at epoch $e$ of the task; the warm-up divides the
    learning rate by ``warmup_divisor`` for the first ``warmup_epochs`` epochs of every task.

    The defaults are lifelong's extension, the *held-mask DWA*: each task has its own context processor and
    mask generators (``context="task"``), masks are an output gate times an input gate per sample
    (``mask_form="factored"``, sigmoid, no stem), and what a finished task's binary masks use is held
    (``protection="hard"``, HAT's way), so an old task's masks cannot drift; the three losses are off
    (``lambda_* = 0``), as the selection on validation data chose. ``DWA(**PAPER_OPTIONS)``
    (``method=dwa_paper``) is the paper's DWA. docs/methods.md ("DWA: what lifelong implements") has why,
    and the selection's numbers.

    Under DDP every rank computes the complexity of the whole task (the same scores), the anchors' means and
    losses and the Fisher are sums over each rank's shard, all-reduced, and so is the record of what a finished
    task's masks use (``protection="hard"``: the union over every rank's shard): every rank holds the same
    state, equal to one process's.

    Args:
        stem_layers: see `DWANet` (0; the paper: 1).
        emb_size: see `DWANet`.
        processor_features: see `DWANet`.
        gate: see `DWANet` (``"sigmoid"``; the paper: ``"tanh"``).
        chunk_elements: see `DWANet`.
        paper_init: see `DWANet`.
        lambda_emb: $\lambda_1$ (0; the paper: 20).
        lambda_attention: $\lambda_2$ (0; the paper: 0.1).
        lambda_sparsity: $\lambda_3$ (0; the paper: 500).
        sparsity: the sparsity term's form: ``"paper"`` (the active fraction above, Eq. 6) or ``"code"`` (the
            original code's default, the *inactive* fraction ``mean_i (1 - |M_b,i|)`` in place of the active
            one: its published runs used it); see `mask_activity`.
        sparsity_target: $\mu$, the fraction allowed without penalty (0.2).
        margin: the triplet margin $\alpha$ (1.5).
        delta: $\delta$, the weight of the earlier tasks' anchor (1).
        anchor_first_task: apply $L_{emb}$ on the first task too.
        anchor_threshold: the complexity below which samples make the anchors (0.4).
        anchor_samples: how many of them (a seeded random choice; 320, the code's 10 batches of 32).
        negative_searches: random directions tried for $N$ (5).
        curriculum: train each epoch on the samples under the rising complexity threshold (off; the paper: on).
        curriculum_start: the threshold $s$ at a task's first epoch (0.2).
        curriculum_epochs: $E_c$, the epochs over which it reaches 1 (100).
        warmup_epochs: epochs of reduced learning rate at the start of every task (0: none).
        warmup_divisor: the learning rate's divisor during them (750).
        fisher_samples: samples of a finished task to estimate the Fisher on (seeded); ``None`` for all.
        mask_form: ``"factored"`` (the default) or ``"full"`` (the paper's; see `DWANet`).
        context: ``"task"`` (the default) or ``"shared"`` (the paper's; see `DWANet`).
        protection: ``"hard"`` (the default) or ``"soft"`` (the paper's: the losses above only). Hard: what a
            finished task's binary masks use is held (see `HeldMasks`; sigmoid gates, ``reset_optimizer=true``).
        s_max: the largest slope of the annealed gate (``protection="hard"``; 400, HAT's).
    """

    name = "dwa"
    needs_rows = True  # training batches carry their rows: each sample's complexity weights its L_emb

    def __init__(
        self,
        stem_layers: int = 0,
        emb_size: int = 100,
        processor_features: Sequence[int] = (32, 128),
        gate: str = "sigmoid",
        lambda_emb: float = 0.0,
        lambda_attention: float = 0.0,
        lambda_sparsity: float = 0.0,
        sparsity: str = "paper",
        sparsity_target: float = 0.2,
        margin: float = 1.5,
        delta: float = 1.0,
        anchor_first_task: bool = False,
        anchor_threshold: float = 0.4,
        anchor_samples: int = 320,
        negative_searches: int = 5,
        curriculum: bool = False,
        curriculum_start: float = 0.2,
        curriculum_epochs: int = 100,
        warmup_epochs: int = 0,
        warmup_divisor: float = 750.0,
        fisher_samples: int | None = None,
        chunk_elements: int = 2**24,
        paper_init: bool = True,
        mask_form: str = "factored",
        context: str = "task",
        protection: str = "hard",
        s_max: float = 400.0,
    ) -> None:
        super().__init__()
        check_options(locals())
        check_gate(gate)
        self.hard = check_choice("protection", protection, ("soft", "hard")) == "hard"
        if self.hard and gate != "sigmoid":
            raise ValueError("method.protection=hard needs method.gate=sigmoid: its test masks are 1(raw > 0)")
        self.held = HeldMasks(s_max)
        self.net_options: dict[str, Any] = {
            "stem_layers": int(stem_layers),
            "emb_size": int(emb_size),
            "processor_features": [int(f) for f in processor_features],
            "gate": gate,
            "chunk_elements": int(chunk_elements),
            "paper_init": bool(paper_init),
            "sparsity": sparsity,
            "mask_form": check_choice("mask_form", mask_form, MASK_FORMS),
            "context": check_choice("context", context, CONTEXTS),
            "binary": self.hard,
        }
        self.lambda_emb = float(lambda_emb)
        self.lambda_attention = float(lambda_attention)
        self.lambda_sparsity = float(lambda_sparsity)
        self.sparsity_target = float(sparsity_target)
        self.margin = float(margin)
        self.delta = float(delta)
        self.anchor_first_task = bool(anchor_first_task)
        self.anchor_threshold = float(anchor_threshold)
        self.anchor_samples = int(anchor_samples)
        self.negative_searches = int(negative_searches)
        self.curriculum = Curriculum(curriculum, curriculum_start, curriculum_epochs)
        self.warmup_epochs = int(warmup_epochs)
        self.warmup_divisor = float(warmup_divisor)
        self.fisher_samples = fisher_samples
        # state (see state_dict)
        self.task_anchors: list[Tensor] = []  # P of each finished task
        self.anchors: dict[str, Tensor] = {}  # this epoch's P, N and (from the second task) N_T
        self.fisher: dict[str, Tensor] = {}  # masked weights' Fisher: the mean over the finished tasks
        self.num_fishers = 0

    # ---- the network -------------------------------------------------------------------------------
    @override
    def configure_network(self, net: nn.Module, stream: TaskStream) -> nn.Module:
        require_task_scenario("dwa", stream, "its heads are per task, as in the paper")
        return DWANet(net, stream.input_shape, num_tasks=stream.num_tasks, **self.net_options)

    def _net(self, module: L.LightningModule | ContinualModule) -> DWANet:
        return wrapped_net(module, DWANet, "dwa")

    def _masked_params(self, module: ContinualModule) -> dict[str, nn.Parameter]:
        """The masked layers' weights and biases, by the module's parameter names."""
        owned = {id(p) for layer in self._net(module).masked for p in layer.parameters(recurse=False)}
        return {n: p for n, p in module.named_parameters() if id(p) in owned}

    def _install_fisher(self, module: ContinualModule) -> None:
        named = dict(module.named_parameters())
        for layer in self._net(module).masked:
            name = next(n for n, p in named.items() if p is layer.weight)
            layer.importance = self.fisher.get(name)

    # ---- hooks -------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Before the fit: check the network and the strategy."""
        self._net(pl_module)
        refuse_sharded("dwa", trainer)
        if (self.hard or self.net_options["context"] == "task") and not module_of(pl_module).reset_optimizer:
            raise ValueError(
                "method=dwa with protection=hard or context=task needs reset_optimizer=true: momentum from a task "
                "would move the weights it holds"
            )

    @override
    def training_data(self, stream: TaskStream, data: TaskData, task: int, epoch_in_task: int) -> TaskData:
        """The curriculum's samples of the epoch (all of them with ``curriculum=false``)."""
        return self.curriculum.select(stream, data, task, epoch_in_task)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After the strategy placed the model: move the (restored) state to its device."""
        device = pl_module.device
        self.task_anchors = [a.to(device) for a in self.task_anchors]
        self.anchors = {k: a.to(device) for k, a in self.anchors.items()}
        self.fisher = {k: f.to(device) for k, f in self.fisher.items()}
        self.held.to(device)
        self._install_fisher(module_of(pl_module))

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """With ``protection=hard``: the gate's slope, annealed within the epoch."""
        if self.hard:
            self._net(pl_module).context.slope = self.held.slope(batch_idx, trainer.num_training_batches)

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        """With ``protection=hard``: no gradient reaches what the finished tasks' masks use."""
        if self.hard:
            self.held.block(self._net(pl_module))

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Every epoch: the warm-up's learning rate, and this epoch's anchors P, N (and N_T)."""
        stream, epoch = stream_of(trainer), trainer.current_epoch
        task, epoch_in_task = stream.task_of_epoch(epoch), stream.epoch_in_task(epoch)[0]
        if self.warmup_epochs:  # otherwise the optimizer's rate is left alone
            factor = 1 / self.warmup_divisor if epoch_in_task < self.warmup_epochs else 1.0
            for opt in trainer.optimizers:
                for group in opt.param_groups:
                    base = group.setdefault("initial_lr", group["lr"])
                    group["lr"] = base * factor
        position = self.curriculum.position
        if self.curriculum.enabled and position:
            pl_module.log("dwa/curriculum_threshold", position["threshold"])
            pl_module.log("dwa/curriculum_samples", float(position["samples"]))
        if self.lambda_emb and (task > 0 or self.anchor_first_task):  # no triplet loss: no anchors to search
            self.anchors = self.search_anchors(trainer, pl_module, task, epoch)

    @override
    def on_task_end(self, trainer: L.Trainer, module: ContinualModule, task: int, last: bool) -> None:
        """Store the finished task's anchor and merge its Fisher (not after the last task: nothing uses them)."""
        if last:
            return
        if self.hard:
            module.log_event({"dwa/weights_held": self.held.record(trainer, module, self._net(module), task)})
        dm = stream_of(trainer)
        if self.lambda_emb:
            samples = self._anchor_data(dm, task, trainer.current_epoch)
            with _eval(module), torch.no_grad():
                self.task_anchors.append(self._mean_embedding(trainer, module, dm, samples))
        if not self.lambda_attention:  # nothing uses a Fisher
            return
        fisher = self.task_fisher(trainer, module, task)
        k = self.num_fishers
        self.fisher = {n: (f + k * self.fisher[n]) / (k + 1) if k else f for n, f in fisher.items()}
        self.num_fishers += 1
        self._install_fisher(module)
        module.log_event({"dwa/fisher_mean": torch.stack([f.mean() for f in self.fisher.values()]).mean()})

    def task_fisher(self, trainer: L.Trainer, module: ContinualModule, task: int) -> dict[str, Tensor]:
        """The diagonal Fisher of the masked layers' weights on ``task``'s training data (all ranks' samples)."""
        dm = stream_of(trainer)
        data = task_sample(dm, task, self.fisher_samples)
        params = self._masked_params(module)
        sums = fisher_sums(module, dm.loader(data, train=False), "empirical", params=params)  # type: ignore[arg-type]
        weights = {n: p for n, p in params.items() if p.ndim > 1}
        return all_reduce_mean(trainer, {n: sums.sums[n] for n in weights}, sums.count)

    # ---- anchors -----------------------------------------------------------------------------------
    def _anchor_data(self, stream: TaskStream, task: int, epoch: int) -> TaskData:
        """``anchor_samples`` of the task's low-complexity training samples (seeded by stream, task, epoch)."""
        data = stream.train_data(task)
        zeta = self.curriculum.complexity(stream, task)[data.rows]
        easy = (zeta < self.anchor_threshold).nonzero().squeeze(1)
        if easy.numel() == 0:  # every sample is complex: the simplest ones
            easy = zeta.argsort()[: self.anchor_samples]
        g = generator(stream.seed, "dwa_anchor_samples", task=task, epoch=epoch)
        pick = easy[torch.randperm(easy.numel(), generator=g)[: self.anchor_samples].to(easy.device)].sort().values
        return TaskData(data.images, data.labels, data.rows[pick], data.tasks[pick], data.task)

    def _mean_embedding(
        self, trainer: L.Trainer, module: ContinualModule, stream: TaskStream, data: TaskData
    ) -> Tensor:
        """The mean embedding of ``data`` (summed over every rank's shard)."""
        net = self._net(module)
        total: Tensor | None = None
        count = 0
        for x, _, t, _ in stream.loader(data, train=False):
            module(x, t)
            assert net.embedding is not None
            part = net.embedding.sum(0)
            total = part if total is None else total + part
            count += x.shape[0]
        if total is None:
            total = torch.zeros(self.net_options["emb_size"], device=module.device)
        return all_reduce_mean(trainer, {"p": total}, count)["p"]

    def _task_loss(
        self, trainer: L.Trainer, module: ContinualModule, stream: TaskStream, data: TaskData, emb: Tensor
    ) -> Tensor:
        """The task's mean cross-entropy on ``data`` with ``emb`` injected as every sample's embedding."""
        net = self._net(module)
        total = torch.zeros((), device=module.device)
        count = 0
        with net.inject(emb):
            for x, y, t, _ in stream.loader(data, train=False):
                total = total + F.cross_entropy(module(x, t), y, reduction="sum")
                count += x.shape[0]
        return all_reduce_mean(trainer, {"loss": total.view(1)}, count)["loss"][0]

    @torch.no_grad()
    def search_anchors(
        self, trainer: L.Trainer, pl_module: L.LightningModule, task: int, epoch: int
    ) -> dict[str, Tensor]:
        """This epoch's anchors ``{"pos": P, "neg": N[, "task_neg": N_T]}`` from the current network."""
        module = module_of(pl_module)
        dm = stream_of(trainer)
        data = self._anchor_data(dm, task, epoch)
        with _eval(module):
            pos = self._mean_embedding(trainer, module, dm, data)
            unit = pos / pos.norm().clamp_min(1e-12)
            g = generator(dm.seed, "dwa_negative_search", task=task, epoch=epoch)
            best: tuple[float, Tensor] | None = None
            for _ in range(self.negative_searches):
                v = torch.randn(pos.shape, generator=g).to(pos)
                v = v - (v @ unit) * unit  # orthogonal to P
                v = v / v.norm().clamp_min(1e-12)
                loss = float(self._task_loss(trainer, module, dm, data, v))
                if best is None or loss > best[0]:
                    best = (loss, v)
            assert best is not None
            anchors = {"pos": pos, "neg": best[1]}
            earlier = [(float(self._task_loss(trainer, module, dm, data, a)), a) for a in self.task_anchors[:task]]
            if earlier:
                anchors["task_neg"] = max(earlier, key=lambda pair: pair[0])[1]
        return anchors

    # ---- the loss ----------------------------------------------------------------------------------
    @override
    def penalty(self, module: ContinualModule, batch: Batch, outputs: Tensor) -> Tensor | None:
        net = self._net(module)
        ctx = net.context
        x = batch.x
        if net.embedding is None or net.embedding.shape[0] != x.shape[0] or not net.embedding.requires_grad:
            net(x, batch.task)  # another forward pass ran since this batch's (e.g. a replayed batch's): redo it
        emb = net.embedding
        assert emb is not None
        terms: dict[str, Tensor] = {}
        task = module.current_task  # the stream's clock: no look at the batch's tensors
        if self.anchors and (task > 0 or self.anchor_first_task):
            rows = batch.rows
            zeta = (
                self.curriculum.complexity(module.stream, task)[rows]
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
            over = torch.stack([(a - self.sparsity_target).clamp_min(0).mean() for a in ctx.activity]).sum()
            terms["sparsity"] = self.lambda_sparsity * over
            if log_now(module.trainer):
                module.log("dwa/activity", torch.stack([a.mean() for a in ctx.activity]).mean())
        if not terms:
            return None
        if log_now(module.trainer):
            for key, value in terms.items():
                module.log(f"train/dwa_{key}", value)
        return torch.stack(list(terms.values())).sum()

    # ---- checkpointing -----------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "task_anchors": [a.detach().cpu() for a in self.task_anchors],
            "anchors": {k: a.detach().cpu() for k, a in self.anchors.items()},
            "fisher": {n: f.detach().cpu() for n, f in self.fisher.items()},
            "num_fishers": self.num_fishers,
            "curriculum": dict(self.curriculum.position),
            "net_options": dict(self.net_options),
            "held": self.held.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        older = {"sparsity": "paper", "mask_form": "full", "context": "shared", "binary": False}  # the paper's
        saved = {**older, **state_dict.get("net_options", self.net_options)}
        if saved != self.net_options:
            raise ResumeError(
                f"the checkpoint's DWA network was built with {saved}, this run's with {self.net_options}: "
                "resume with the same method options"
            )
        self.task_anchors = list(state_dict["task_anchors"])
        self.anchors = dict(state_dict["anchors"])
        self.fisher = dict(state_dict["fisher"])
        self.num_fishers = int(state_dict["num_fishers"])
        self.curriculum.position = dict(state_dict.get("curriculum", {}))
        if "held" in state_dict:
            self.held.load_state_dict(state_dict["held"])


@contextlib.contextmanager
def _eval(module: nn.Module | ContinualModule) -> Iterator[None]:
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)
