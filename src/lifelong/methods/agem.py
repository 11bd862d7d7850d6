"""Averaged Gradient Episodic Memory, A-GEM (Chaudhry et al., ICLR 2019)."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lifelong.data.streams import TaskStream, stream_of
from lifelong.methods.base import ContinualModule
from lifelong.methods.replay import MemoryMethod, ReplayBuffer


def project(grad: Tensor, reference: Tensor) -> Tensor:
    """A-GEM's step direction: ``grad`` if it does not conflict with ``reference`` (``grad . reference >= 0``),
    else ``grad`` minus its component along ``reference``: ``grad - (grad . ref) / (ref . ref) * ref``.

    Both flat vectors. Decided without a branch on the host (no synchronisation on a GPU).
    """
    dot = grad @ reference
    scale = torch.where(dot < 0, dot / (reference @ reference).clamp_min(torch.finfo(dot.dtype).tiny), 0.0)
    return grad - scale * reference


class AGEM(MemoryMethod):
    """A-GEM (Chaudhry, Ranzato, Rohrbach & Elhoseiny, 2019).

    At the end of each task (but the last) ``buffer_size // num_tasks`` of its training samples, drawn at
    random, join an episodic memory (a fixed quota per task, as the paper's and the official DER code's
    A-GEM fill it). While later tasks train, each step's gradient ``g`` - of the loss and of any other
    method's terms - is compared with the reference gradient ``g_ref`` of the loss on a minibatch drawn
    from the memory: if ``g . g_ref < 0`` the step would raise the memory's loss, and ``g`` is replaced by
    its projection ``g - (g . g_ref) / (g_ref . g_ref) g_ref`` (`project`); otherwise it is left as it
    is. The reference gradient is computed with ``torch.autograd.grad`` (it never touches ``.grad``), in
    ``on_before_optimizer_step``: after mixed precision has unscaled the gradients, before clipping and the step.

    Under DDP both gradients are the all-reduced ones: ``g`` is DDP's average over ranks, and ``g_ref`` -
    each rank's from its own memory minibatch - is averaged over ranks here, so every rank projects the same
    vectors and takes the same step. The memory is the same on every rank (drawn from the whole task with
    the stream's seed).

    Args:
        buffer_size: samples held in memory in all (``buffer_size // num_tasks`` per task).
        replay_batch_size: the memory minibatch of the reference gradient; ``None`` for the stream's batch size.
    """

    name = "agem"

    def __init__(self, buffer_size: int = 500, replay_batch_size: int | None = None) -> None:
        super().__init__()
        if replay_batch_size is not None and replay_batch_size < 1:
            raise ValueError(f"method.replay_batch_size must be a positive number or null, got {replay_batch_size}")
        self.buffer = ReplayBuffer(buffer_size)
        self.replay_batch_size = replay_batch_size
        self._generator: torch.Generator | None = None

    @override
    def configure_network(self, net: nn.Module, stream: TaskStream) -> nn.Module:
        if self.buffer.size < stream.num_tasks:
            raise ValueError(
                f"method.buffer_size={self.buffer.size} gives no memory to each of {stream.num_tasks} tasks: "
                f"raise it to at least {stream.num_tasks}"
            )
        return net

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._generator = self.epoch_generator(trainer, pl_module.device, "replay_reference")

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size > 1:
            self._check_ranks_agree(trainer, pl_module)

    @override
    def on_task_end(self, trainer: L.Trainer, module: ContinualModule, task: int, last: bool) -> None:
        """The finished task's quota of samples joins the memory (not the last task's: nothing replays them)."""
        if last:
            return
        dm = module.stream
        data = dm.train_data(task)
        quota = self.buffer.size // dm.num_tasks
        order = self.task_order(dm.seed, task, len(data))[:quota]
        rows, tasks = data.rows.cpu()[order], data.tasks.cpu()[order]
        self.buffer.append(rows, tasks, data.labels.cpu()[rows])

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Optimizer) -> None:
        if len(self.buffer) == 0:
            return
        assert self._generator is not None
        params = [p for p in pl_module.parameters() if p.grad is not None]
        n = self.replay_batch_size or stream_of(trainer).batch_size
        pick = self.buffer.sample(n, self._generator)
        x, y, task, _ = stream_of(trainer).replay_batch(
            self.buffer.rows[pick], self.buffer.tasks[pick], self._generator
        )
        with torch.enable_grad():
            loss = F.cross_entropy(pl_module(x, task), y)
            refs = torch.autograd.grad(loss, params, allow_unused=True)
        reference = torch.cat(
            [(r if r is not None else torch.zeros_like(p)).reshape(-1) for r, p in zip(refs, params, strict=True)]
        )
        if trainer.world_size > 1:
            reference = trainer.strategy.reduce(reference, reduce_op="mean")
        grad = torch.cat([p.grad.reshape(-1) for p in params])  # type: ignore[union-attr]
        projected = project(grad, reference)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(projected[offset : offset + n].view_as(p))  # type: ignore[union-attr]
            offset += n

    @staticmethod
    def _check_ranks_agree(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Every rank must hold the same weights (each projects the same all-reduced gradients): checked once an
        epoch, by one broadcast of a checksum, since a rank that projected its own gradients would drift silently."""
        mine = torch.stack([p.detach().double().sum() for p in pl_module.parameters()]).cpu()
        theirs = trainer.strategy.broadcast(mine, src=0)
        if not torch.equal(mine, theirs):
            raise RuntimeError(f"A-GEM: rank {trainer.global_rank}'s weights differ from rank 0's after a DDP epoch")
