"""iCaRL (Rebuffi, Kolesnikov, Sperl & Lampert, CVPR 2017): herded exemplars, sigmoid distillation and
nearest-mean-of-exemplars classification."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from lifelong.data.streams import TaskStream
from lifelong.data.tensors import Batch, TaskData, TensorBatchLoader
from lifelong.methods.base import ContinualModule, frozen_copy, module_of
from lifelong.methods.fisher import call_model
from lifelong.methods.replay import MemoryMethod, ReplayBuffer


def classifier_layer(net: nn.Module) -> nn.Linear:
    """The network's last ``nn.Linear``: its classifier, whose input is the feature vector iCaRL uses."""
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"iCaRL needs a network whose last layer is an nn.Linear classifier, got {type(net).__name__}")
    return linears[-1]


def features(net: nn.Module, x: Tensor) -> Tensor:
    """The feature vectors of ``x``: the inputs of the network's classifier layer, ``(B, D)``, L2-normalised."""
    captured: list[Tensor] = []
    handle = classifier_layer(net).register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        net(x)
    finally:
        handle.remove()
    return F.normalize(captured[0].flatten(1).float(), dim=1)


def herding(feats: Tensor, m: int) -> Tensor:
    """iCaRL's exemplar selection (Rebuffi et al. 2017, Algorithm 4): ``min(m, n)`` indices into ``feats``
    ``(n, D)``, chosen one at a time, each the sample that brings the mean of those chosen so far closest to
    the mean of all. In the order chosen: the first ``k`` are the best ``k`` (a class's memory shrinks by
    keeping a prefix). On the features' device, without a host synchronisation per step."""
    n = feats.shape[0]
    mean = feats.mean(0)
    running = torch.zeros_like(mean)
    taken = torch.zeros(n, dtype=torch.bool, device=feats.device)
    chosen = []
    for k in range(min(m, n)):
        cost = (mean - (running + feats) / (k + 1)).pow(2).sum(1).masked_fill(taken, float("inf"))
        i = cost.argmin()
        chosen.append(i)
        running = running + feats[i]
        taken[i] = True
    return torch.stack(chosen) if chosen else torch.zeros(0, dtype=torch.long, device=feats.device)


def nme_scores(feats: Tensor, means: Tensor) -> Tensor:
    """Nearest-mean-of-exemplars scores: ``-||f - mu_c||^2`` of each feature ``(B, D)`` to each class mean
    ``(C, D)``; the highest score is the nearest mean. Classes without exemplars have NaN means: the dtype's
    lowest score."""
    scores = -torch.cdist(feats.float(), means.nan_to_num().float()).pow(2)
    return scores.masked_fill(means.isnan().any(1)[None, :], torch.finfo(scores.dtype).min)


class ICaRL(MemoryMethod):
    """iCaRL (Rebuffi et al., 2017), in the class scenario (and the task scenario, evaluated per task).

    * Memory: a class-balanced set of ``buffer_size`` exemplars, ``buffer_size // classes seen`` per class.
      At each task's end, each earlier class keeps the first exemplars of its herding order and each of the
      task's classes gets its quota by `herding` over all its training samples' features (the inputs of
      the network's last linear layer, L2-normalised, the network in eval mode).
    * Training: while a task trains, its training set is the task's samples together with every exemplar
      (the stream's loader shuffles them as one set). The loss - in place of the cross-entropy - is the
      binary cross-entropy of the sigmoid outputs of the classes seen so far, averaged over samples and
      classes: the current task's classes take one-hot targets, the earlier classes the sigmoid outputs of
      the network as it was at the end of the previous task (distillation).
    * Classification: nearest mean of exemplars (`nme_scores`), class means from the exemplars'
      normalised features (re-normalised), computed at each task's end; before the first task ends, the
      network's outputs.

    Under DDP every rank selects the same exemplars (from the whole task, with the same weights) and holds
    the same means; checkpoints carry the memory, the means and the old network.

    Args:
        buffer_size: exemplars held in all.
    """

    name = "icarl"

    def __init__(self, buffer_size: int = 2000) -> None:
        super().__init__()
        self.buffer = ReplayBuffer(buffer_size, "class_balanced")
        self.tasks_done = 0  # tasks whose exemplars were selected
        self.means: Tensor | None = None  # (C, D) class means of the exemplars' features; NaN rows: no exemplars
        self._old: nn.Module | None = None
        self._old_state: dict[str, Tensor] | None = None

    @override
    def configure_network(self, net: nn.Module, stream: TaskStream) -> nn.Module:
        if stream.scenario == "domain":
            raise ValueError(
                "method=icarl learns new classes (dataset.scenario=class, or task to evaluate per task); the domain "
                "scenario has no new classes to remember exemplars of"
            )
        classifier_layer(net)
        return net

    def _exemplars(self, base: TaskData) -> TaskData:
        """The exemplars, as samples of the stream's base images (which every task's rows index)."""
        device = base.rows.device
        return TaskData(base.images, base.labels, self.buffer.rows.to(device), self.buffer.tasks.to(device), None)

    @override
    def training_data(self, stream: TaskStream, data: TaskData, task: int, epoch_in_task: int) -> TaskData:
        """The task's samples and every exemplar, shuffled as one set by the stream's loader."""
        return TaskData.concat([data, self._exemplars(data)]) if len(self.buffer) else data

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.means is not None:
            self.means = self.means.to(pl_module.device)
        if self._old_state is not None:
            self._old = frozen_copy(module_of(pl_module).net)
            self._old.load_state_dict(self._old_state)
            self._old_state = None

    @override
    def classification_loss(self, module: ContinualModule, batch: Batch, outputs: Tensor) -> Tensor | None:
        x, y = batch.x, batch.y
        seen = module.seen_outputs[module.current_task]
        logits = outputs[:, :seen].float()
        targets = F.one_hot(y, seen).to(logits.dtype)
        if self._old is not None and self.tasks_done > 0:
            before = module.seen_outputs[self.tasks_done - 1]
            with torch.no_grad():
                targets[:, :before] = torch.sigmoid(call_model(self._old, x, batch.task)[:, :before].float())
        return F.binary_cross_entropy_with_logits(logits, targets)

    @override
    def on_task_end(self, trainer: L.Trainer, module: ContinualModule, task: int, last: bool) -> None:
        """Before the task is evaluated: select its exemplars and compute the class means."""
        if task < self.tasks_done:
            return
        dm = module.stream
        was_training = module.training
        module.eval()
        with torch.no_grad():
            self._select(module, dm, task)
            self.means = self._class_means(module, dm)
        module.train(was_training)
        self.tasks_done = task + 1
        if not last:
            self._old = frozen_copy(module.net)

    def _whole(self, dm: TaskStream, data: TaskData) -> TensorBatchLoader:
        """All of ``data`` (not this rank's shard), in order, without augmentation, with each sample's row."""
        assert dm.transform is not None
        return TensorBatchLoader(data, dm.eval_batch_size, dm.transform, targets=dm.targets, with_rows=True)

    def _select(self, module: ContinualModule, dm: TaskStream, task: int) -> None:
        feats, labels, rows, tasks = [], [], [], []
        for b in self._whole(dm, dm.train_data(task)):
            assert b.rows is not None
            feats.append(features(module.net, b.x))
            labels.append(b.y)
            rows.append(b.rows)
            tasks.append(b.task)
        f, y, r, t = (torch.cat(v) for v in (feats, labels, rows, tasks))
        classes = y.unique().tolist()
        known = self.buffer.classes.unique().tolist() if len(self.buffer) else []
        per_class = self.buffer.size // len(set(known) | set(classes))
        # earlier classes keep the first `per_class` of their herding order (the memory holds them in that order)
        kept: dict[str, list[Tensor]] = {k: [] for k in ("rows", "tasks", "classes")}
        for c in known:
            pick = (self.buffer.classes == c).nonzero().squeeze(1)[:per_class]
            for k in kept:
                kept[k].append(self.buffer.fields[k][pick])
        for c in classes:
            members = (y == c).nonzero().squeeze(1)
            pick = members[herding(f[members], per_class)]
            kept["rows"].append(r[pick])
            kept["tasks"].append(t[pick])
            kept["classes"].append(y[pick])
        self.buffer.fields = {k: torch.cat(v).to(self.buffer.device) for k, v in kept.items()}
        self.buffer.seen += len(f)

    def _class_means(self, module: ContinualModule, dm: TaskStream) -> Tensor:
        assert dm.transform is not None
        device = module.device
        sums: Tensor | None = None
        counts = torch.zeros(module.num_classes, device=device)
        for x, y, _t, _r in self._whole(dm, self._exemplars(dm.train_data(0))):
            f = features(module.net, x)
            if sums is None:
                sums = torch.zeros(module.num_classes, f.shape[1], device=device)
            sums.index_add_(0, y, f)
            counts.index_add_(0, y, torch.ones_like(y, dtype=counts.dtype))
        assert sums is not None
        means = F.normalize(sums / counts[:, None], dim=1)
        return means.masked_fill((counts == 0)[:, None], float("nan"))

    @override
    def scores(self, module: ContinualModule, x: Tensor, task: Tensor | None) -> Tensor | None:
        if self.means is None:
            return None
        return module.heads(nme_scores(features(module.net, x), self.means), task)

    @override
    def state_dict(self) -> dict[str, Any]:
        old = {k: v.detach().cpu() for k, v in self._old.state_dict().items()} if self._old is not None else None
        means = self.means.cpu() if self.means is not None else None
        return {**super().state_dict(), "tasks_done": self.tasks_done, "means": means, "old_network": old}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.tasks_done = int(state_dict["tasks_done"])
        self.means = state_dict["means"]
        self._old_state = state_dict["old_network"]
