"""What a run costs beside its accuracy: the bytes a method keeps between tasks, and the run's peak memory.

A method's bytes are counted from the state it checkpoints (``state_dict``, the state a resumed run needs: memory
buffers, stored logits, old networks, Fisher and anchors): the bytes of every tensor in it, a tensor reached twice
counted once. Replay methods here keep each stored sample as its row in the stream's images (an index), not as a
copy of the image: the count is what they hold, which is not what a memory of images would (see docs/methods.md).
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import torch


def tensor_bytes(state: Any) -> int:
    """The bytes of the tensors in ``state`` (nested dicts, lists and tuples of tensors and other values); a
    storage shared by several tensors (views of one buffer) is counted once, whole."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors_in(state):
        storage = t.untyped_storage()
        seen[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def tensors_in(state: Any) -> Iterable[torch.Tensor]:
    """Every tensor in ``state`` (nested dicts, lists and tuples), depth first."""
    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, Mapping):
        for v in state.values():
            yield from tensors_in(v)
    elif isinstance(state, (list, tuple)):
        for v in state:
            yield from tensors_in(v)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """The run's peak memory on ``device`` in bytes, and what it is: on a GPU the most the caching allocator had
    allocated for tensors (``cuda_max_allocated``), on a CPU the process's peak resident set (``process_max_rss``,
    which counts everything the process held: data, Python, libraries)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(rss if sys.platform == "darwin" else rss * 1024), "process_max_rss"
