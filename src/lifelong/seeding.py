"""Named streams of randomness: every random draw of a run comes from a generator derived from
``(seed, purpose, task, epoch, rank)``.

Each draw that must be the same on every rank and after a resume (a task's shuffling order, the samples a memory
keeps, a validation split) gets its own named stream, seeded from those coordinates through numpy's
``SeedSequence``, which hashes them: distinct coordinates give independent seeds. Arithmetic seed formulas do not:
``seed * 104_729 + task + rank`` gave ``(task + 1, rank)`` and ``(task, rank + 1)`` the same seed, and
``seed * 31 + salt`` the seed of another run's draw.

A purpose is a name from `PURPOSES`, so a typo fails at once and two parts cannot share a stream by
accident. The stream definitions themselves (permutations, rotation angles, class orders; lifelong.data.catalog)
are drawn from the seed alone: they are the stream's identity, recorded in ``metrics.json`` and checked on resume.
"""

from __future__ import annotations

import numpy as np
import torch

# purpose -> its number in the seed's coordinates (never reuse or renumber one: it would change a run's draws)
PURPOSES = {
    "train_subset": 1,  # max_train_samples: the samples a stream keeps of each task
    "test_subset": 2,  # max_test_samples
    "val_split": 3,  # the validation samples held out of each task's training data
    "shuffle": 4,  # the order of an epoch's training samples
    "augment": 5,  # an epoch's training augmentation
    "importance_subset": 6,  # the samples of a finished task an importance (a Fisher) is estimated on
    "fisher_labels": 7,  # the labels a sampled Fisher draws from the model
    "memory_order": 8,  # the order in which a finished task's samples are offered to a memory
    "memory_fill": 9,  # the choices of a memory's policy (reservoir, class-balanced)
    "replay": 10,  # the samples replayed in an epoch's steps
    "replay_fill": 11,  # DER's reservoir choices, the same on every rank
    "replay_reference": 12,  # A-GEM's reference minibatches
    "der_replay": 13,  # DER's replayed minibatches
    "dwa_anchor_samples": 14,  # DWA: the low-complexity samples its anchors are made of
    "dwa_negative_search": 15,  # DWA: the random directions tried for the negative anchor
    "eval_subset": 16,  # continual evaluation: the samples of each task it evaluates (epoch: the step, if redrawn)
    "stream_order": 17,  # blurry and fuzzy streams: which samples move, the orders and the ramps' draws
    "task_sizes": 18,  # dataset.task_sizes: the training samples each task keeps
    "gdumb_init": 19,  # GDumb: the fresh network it trains on its memory
    "gdumb_order": 20,  # GDumb: the order of the memory's samples in each pass (epoch: the training's number)
}


def seed_for(seed: int, purpose: str, *, task: int = 0, epoch: int = 0, rank: int = 0) -> int:
    """The seed of ``purpose``'s draw for ``task``, ``epoch`` and ``rank`` of the run seeded ``seed`` (63 bits)."""
    if purpose not in PURPOSES:
        raise KeyError(f"unknown purpose of randomness {purpose!r}; the known ones: {', '.join(PURPOSES)}")
    coordinates = [int(seed), PURPOSES[purpose], int(task), int(epoch), int(rank)]
    if min(coordinates) < 0:
        raise ValueError(f"seed, task, epoch and rank must be >= 0, got {coordinates}")
    return int(np.random.SeedSequence(coordinates).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def generator(
    seed: int,
    purpose: str,
    *,
    task: int = 0,
    epoch: int = 0,
    rank: int = 0,
    device: torch.device | str | None = None,
) -> torch.Generator:
    """A ``torch.Generator`` (on ``device``, default the CPU) seeded for one named draw (see `seed_for`)."""
    g = torch.Generator(device=device) if device is not None else torch.Generator()
    return g.manual_seed(seed_for(seed, purpose, task=task, epoch=epoch, rank=rank))
