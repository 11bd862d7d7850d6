"""Dark Experience Replay, DER and DER++ (Buzzega et al., 2020): replay the network's own past logits."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from lifelong.data.tensors import Batch
from lifelong.methods.base import ContinualModule, gathered
from lifelong.methods.replay import MemoryMethod, ReplayBuffer


def der_loss(outputs: Tensor, stored: Tensor, alpha: float) -> Tensor:
    """DER's term: ``alpha`` times the squared error between the outputs and the stored logits, **averaged
    over the batch and the logits** (``F.mse_loss``, as the official code computes it).

    The paper writes ``alpha * ||z - h(x)||^2``, a sum over the logits; its published alphas are the official
    code's, which averages over them, so the paper's alpha is ours divided by the number of outputs. We keep
    the code's convention so that the published alphas carry over unchanged.
    """
    return alpha * F.mse_loss(outputs.float(), stored.float())


class DarkExperienceReplay(MemoryMethod):
    r"""DER and DER++ (Buzzega et al., NeurIPS 2020).

    A reservoir memory of the training stream: every training batch is offered to it (after the optimizer
    step), each sample with the raw logits the network gave it in that step - every output, before the
    scenario's masking, as the official code stores them, and never refreshed. While training, each step adds

    * DER: $\alpha\,\mathrm{MSE}(h(x'), z')$ on a minibatch $(x', z')$ drawn from the memory, and
    * DER++ (``beta > 0``): also $\beta\,\mathrm{CE}(h(x''), y'')$ on a second, independent minibatch,
      through the scenario's heads,

    to the cross-entropy of the stream batch. With ``alpha=0`` and ``beta=1`` it is the official code's
    experience replay (a reservoir over the stream, a replayed minibatch in every step). See `der_loss`
    for the MSE's convention (averaged over the logits, as in the official code: the published alphas apply
    as they are). Minibatches are drawn without replacement (all of the memory while it holds fewer
    samples), with the training augmentation.

    The memory stores identities (rows of the stream's images and their tasks) and the logits, on the
    training device; it is sampled and updated without a host synchronisation, and checkpoints carry it.

    Under DDP every rank offers the same samples in the same order - the step's batches of all ranks,
    gathered - with the same generator, so the memory is identical on every rank (and the one rank 0 saves
    is the whole state); each rank draws its own minibatches, as it trains on its own shard.

    Args:
        buffer_size: samples held in memory.
        alpha: the weight of the logit-matching term.
        beta: the weight of DER++'s cross-entropy on replayed labels; 0 for DER.
        replay_batch_size: the size of each replayed minibatch; ``None`` for the stream's batch size.
    """

    name = "der"
    needs_rows = True  # training batches carry each sample's row: its identity to store

    def __init__(
        self, buffer_size: int = 500, alpha: float = 0.3, beta: float = 0.0, replay_batch_size: int | None = None
    ) -> None:
        super().__init__()
        for key, value in (("alpha", alpha), ("beta", beta)):
            if not value >= 0:
                raise ValueError(f"method.{key} must be >= 0, got {value}")
        if replay_batch_size is not None and replay_batch_size < 1:
            raise ValueError(f"method.replay_batch_size must be a positive number or null, got {replay_batch_size}")
        self.buffer = ReplayBuffer(buffer_size, "reservoir")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.replay_batch_size = replay_batch_size
        self.name = "derpp" if self.beta > 0 else "der"
        self._sample_gen: torch.Generator | None = None  # this rank's minibatches
        self._fill_gen: torch.Generator | None = None  # the reservoir's choices: the same on every rank
        self._pending: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sample_gen = self.epoch_generator(trainer, pl_module.device, "der_replay")
        self._fill_gen = self.epoch_generator(trainer, pl_module.device, "replay_fill", per_rank=False)

    def _minibatch(self, module: ContinualModule, n: int) -> tuple[Batch, Tensor]:
        """A batch of ``n`` samples drawn from the memory, and their stored logits."""
        assert self._sample_gen is not None
        pick = self.buffer.sample(n, self._sample_gen)
        fields = self.buffer.fields
        replayed = module.stream.replay_batch(fields["rows"][pick], fields["tasks"][pick], self._sample_gen)
        return replayed, fields["logits"][pick]

    @override
    def penalty(self, module: ContinualModule, batch: Batch, outputs: Tensor) -> Tensor | None:
        if batch.rows is None:
            raise RuntimeError(f"method={self.name} needs training batches with their rows (needs_rows)")
        x = batch.x
        # stored after this step, with z from before it
        self._pending = (batch.rows, batch.task, batch.y, outputs.detach().float())
        if len(self.buffer) == 0:
            return None
        n = self.replay_batch_size or x.shape[0]
        loss = outputs.new_zeros(())
        if self.alpha > 0:
            b, z = self._minibatch(module, n)
            loss = loss + der_loss(module.outputs(b.x, b.task), z, self.alpha)
        if self.beta > 0:
            b, _ = self._minibatch(module, n)
            loss = loss + self.beta * F.cross_entropy(module(b.x, b.task), b.y)
        return loss

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is None:
            return
        rows, task, y, logits = self._pending
        self._pending = None
        rows, task, y, logits = gathered(trainer, pl_module, rows, task, y, logits)  # all ranks' samples
        assert self._fill_gen is not None
        self.buffer.add(rows, task, y, self._fill_gen, logits=logits)
