"""Named streams of randomness: distinct coordinates, distinct seeds; the same coordinates, the same draws."""

from __future__ import annotations

import itertools

import pytest
import torch

from lifelong.seeding import PURPOSES, generator, seed_for


def test_no_two_coordinates_share_a_seed():
    """The old EWC formula, seed * 104_729 + task + rank, gave (task + 1, rank) and (task, rank + 1) one seed."""
    grid = itertools.product(range(3), PURPOSES, range(4), range(3), range(3))
    seeds = [seed_for(s, p, task=t, epoch=e, rank=r) for s, p, t, e, r in grid]
    assert len(set(seeds)) == len(seeds)
    assert seed_for(0, "fisher_labels", task=1, rank=0) != seed_for(0, "fisher_labels", task=0, rank=1)


def test_the_same_coordinates_draw_the_same_numbers():
    a, b = (torch.randperm(100, generator=generator(7, "shuffle", epoch=3)) for _ in range(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, torch.randperm(100, generator=generator(7, "shuffle", epoch=4)))


def test_an_unknown_purpose_or_a_negative_coordinate_is_refused():
    with pytest.raises(KeyError, match="unknown purpose of randomness 'shufle'"):
        seed_for(0, "shufle")
    with pytest.raises(ValueError, match=">= 0"):
        seed_for(0, "shuffle", task=-1)
