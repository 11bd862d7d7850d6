"""Task boundaries that are not sharp: blurry and fuzzy streams, and tasks of different lengths.

A sharp stream (the default) trains task ``t`` on task ``t``'s samples only. The other two reorder one pass over
the same samples - each sample still appears exactly once per pass, in an order drawn from the seed - into the
same ``T`` segments, one per task; the stream's clock ends task ``t`` at the end of segment ``t`` (the task events
fall there, and the evaluation), and the scenario's evaluation still tests each task on its own test set:

* **blurry** (Bang et al., CVPR 2021, "Blurry-M"): a fraction ``blur`` of each task's training samples is moved
  into the other tasks' segments, spread evenly over them (``blur_into="others"``, Rainbow Memory's definition:
  ``blur=0.1`` is their Blurry10), or into the tasks just before and after (``blur_into="neighbours"``). Each
  segment is shuffled every epoch.
* **fuzzy** (van de Ven's ``FuzzyBoundaryStream``): the segments follow each other, but around each boundary lies a
  linear ramp of ``ramp_width`` samples in which a sample comes from the next task with a probability rising from
  0 to 1; the boundary (the task event) is at the ramp's middle. Each segment keeps its task's length, and its
  order: it is not reshuffled (a later epoch of the task repeats it). van de Ven's ``--fuzziness`` f (in
  iterations) is a ramp of ``2 f x batch_size`` samples.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from lifelong.data.tensors import TaskData
from lifelong.seeding import generator

BOUNDARIES = ("sharp", "blurry", "fuzzy")
BLUR_INTO = ("others", "neighbours")


@dataclass(frozen=True)
class Boundaries:
    """How a stream's tasks meet (see the module docstring); checked on construction.

    Attributes:
        kind: ``"sharp"``, ``"blurry"`` or ``"fuzzy"``.
        blur: blurry: the fraction of each task's training samples moved into other tasks, in (0, 1).
        blur_into: blurry: ``"others"`` (every other task, evenly) or ``"neighbours"`` (the tasks before and after).
        ramp_width: fuzzy: samples in the ramp around each boundary, at least 2 and at most the smallest task's.
    """

    kind: str = "sharp"
    blur: float = 0.1
    blur_into: str = "others"
    ramp_width: int = 1000

    def __post_init__(self) -> None:
        if self.kind not in BOUNDARIES:
            raise ValueError(f"dataset.boundary must be one of {list(BOUNDARIES)}, got {self.kind!r}")
        if self.kind == "blurry" and not (isinstance(self.blur, (int, float)) and 0 < self.blur < 1):
            raise ValueError(
                f"dataset.blur must be in (0, 1) for a blurry stream (the share of each task's samples moved into "
                f"other tasks; Rainbow Memory's Blurry10 is 0.1), got {self.blur!r}"
            )
        if self.blur_into not in BLUR_INTO:
            raise ValueError(f"dataset.blur_into must be one of {list(BLUR_INTO)}, got {self.blur_into!r}")
        if self.kind == "fuzzy" and (isinstance(self.ramp_width, bool) or int(self.ramp_width) < 2):
            raise ValueError(f"dataset.ramp_width must be at least 2 samples, got {self.ramp_width!r}")

    @property
    def mixes(self) -> bool:
        """Whether a task's segment holds other tasks' samples."""
        return self.kind != "sharp"

    def describe(self) -> dict[str, Any]:
        if self.kind == "blurry":
            return {"boundary": "blurry", "blur": self.blur, "blur_into": self.blur_into}
        if self.kind == "fuzzy":
            return {"boundary": "fuzzy", "ramp_width": int(self.ramp_width)}
        return {}

    def segments(self, tasks: list[TaskData], seed: int) -> list[TaskData]:
        """The training segment of each task, from the tasks' own training data."""
        if self.kind == "blurry":
            return blurry_segments(tasks, self.blur, self.blur_into, seed)
        if self.kind == "fuzzy":
            return fuzzy_segments(tasks, int(self.ramp_width), seed)
        return tasks


def _mixed(like: TaskData, rows: torch.Tensor, tasks: torch.Tensor) -> TaskData:
    single = tasks.unique()
    return TaskData(like.images, like.labels, rows, tasks, int(single) if len(single) == 1 else None)


def blurry_segments(tasks: list[TaskData], blur: float, into: str, seed: int) -> list[TaskData]:
    """Each task's segment: its own samples but ``round(blur * n)`` of them, and its share of the others' moved
    ones (handed out in turn over the receiving tasks, in an order drawn from the seed)."""
    n = len(tasks)
    rows: list[list[torch.Tensor]] = [[] for _ in range(n)]
    owner: list[list[torch.Tensor]] = [[] for _ in range(n)]
    for t, data in enumerate(tasks):
        g = generator(seed, "stream_order", task=t)
        perm = torch.randperm(len(data), generator=g)
        moved = round(blur * len(data)) if n > 1 else 0
        keep = perm[moved:]
        rows[t].append(data.rows[keep])
        owner[t].append(data.tasks[keep])
        receivers = [u for u in range(n) if u != t] if into == "others" else [u for u in (t - 1, t + 1) if 0 <= u < n]
        order = torch.randperm(len(receivers), generator=g).tolist()
        dest = torch.tensor([receivers[order[i % len(receivers)]] for i in range(moved)], dtype=torch.long)
        for u in receivers:
            pick = perm[:moved][dest == u]
            rows[u].append(data.rows[pick])
            owner[u].append(data.tasks[pick])
    return [_mixed(tasks[0], torch.cat(rows[u]), torch.cat(owner[u])) for u in range(n)]


def fuzzy_segments(tasks: list[TaskData], width: int, seed: int) -> list[TaskData]:
    """The tasks one after another in seeded orders, with a linear ramp of ``width`` samples at each boundary: at
    ramp position ``i`` the next sample comes from the next task with probability ``(i + 1/2) / width`` (while
    both have samples left); each segment ends at its ramp's middle, so it keeps its task's length."""
    smallest = min(len(d) for d in tasks)
    if width > smallest:
        raise ValueError(
            f"dataset.ramp_width={width} is longer than the smallest task ({smallest} training samples): the ramps "
            "of a task's two boundaries would overlap. Lower dataset.ramp_width"
        )
    half = width // 2
    orders = []
    for t, d in enumerate(tasks):
        perm = torch.randperm(len(d), generator=generator(seed, "stream_order", task=t))
        orders.append((d.rows[perm], d.tasks[perm]))
    pieces: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in tasks]
    start = 0  # where task t's own part starts (after the previous ramp's second half)
    for t in range(len(tasks)):
        rows, owner = orders[t]
        if t == len(tasks) - 1:
            pieces[t].append((rows[start:], owner[start:]))
            break
        pieces[t].append((rows[start : len(rows) - half], owner[start : len(rows) - half]))
        ramp_rows, ramp_owner = _ramp(orders[t], orders[t + 1], half, generator(seed, "stream_order", task=t, epoch=1))
        pieces[t].append((ramp_rows[:half], ramp_owner[:half]))
        pieces[t + 1].append((ramp_rows[half:], ramp_owner[half:]))
        start = half
    return [_mixed(tasks[0], torch.cat([r for r, _ in p]), torch.cat([o for _, o in p])) for p in pieces]


def _ramp(
    this: tuple[torch.Tensor, torch.Tensor], after: tuple[torch.Tensor, torch.Tensor], half: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``2 half`` samples around one boundary: the last ``half`` of this task's order and the first ``half``
    of the next one's, interleaved by the ramp's draws (each keeps its own order)."""
    width = 2 * half
    draws = torch.rand(width, generator=g)
    take_next = torch.zeros(width, dtype=torch.bool)
    left = [half, half]  # samples left of this task's tail, of the next task's head
    for i in range(width):
        nxt = bool(draws[i] < (i + 0.5) / width) if left[0] and left[1] else left[1] > 0
        take_next[i] = nxt
        left[int(nxt)] -= 1
    rows = torch.empty(width, dtype=this[0].dtype)
    owner = torch.empty(width, dtype=this[1].dtype)
    rows[~take_next], owner[~take_next] = this[0][len(this[0]) - half :], this[1][len(this[1]) - half :]
    rows[take_next], owner[take_next] = after[0][:half], after[1][:half]
    return rows, owner


def fingerprint(segments: list[TaskData]) -> str:
    """A short digest of the segments' rows and tasks, in order: a resumed run must train the same stream."""
    digest = hashlib.sha1()
    for d in segments:
        digest.update(d.rows.cpu().numpy().tobytes())
        digest.update(d.tasks.cpu().numpy().tobytes())
    return digest.hexdigest()[:12]
