"""Is method A better than method B, or is it the seeds? A paired test over the seeds both were run with.

``summarize.py FOLDER --compare A B`` pairs, on each stream where both ran, the run of A and the run of B that share
a seed (the same stream draws, initial network and data order), and tests the mean of the paired differences
against 0: Student's paired t-test (two-sided), and beside it the Wilcoxon signed-rank test (exact), which does
not assume the differences are normal but cannot go below p = 0.25 with 3 pairs or 0.0625 with 5. Pairing removes
what the seed does to both methods alike, which at 3-5 seeds is often most of the spread.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from scipy import stats

from lifelong.metrics.summary import Group


@dataclass
class Comparison:
    """A paired comparison of two groups of runs on one stream."""

    a: Group
    b: Group
    metric: str
    seeds: list[Any]  # the seeds both ran, in order
    a_values: list[float]
    b_values: list[float]
    unpaired: tuple[list[Any], list[Any]]  # seeds only A ran, only B ran

    @property
    def differences(self) -> list[float]:
        return [x - y for x, y in zip(self.a_values, self.b_values, strict=True)]

    def t_test(self) -> tuple[float, float]:
        """``(t, p)``: the paired t statistic with ``n - 1`` degrees of freedom and its two-sided p-value."""
        d = self.differences
        sd = statistics.stdev(d)
        if sd == 0:
            return (math.copysign(math.inf, statistics.fmean(d)) if any(d) else math.nan), (0.0 if any(d) else 1.0)
        t = statistics.fmean(d) / (sd / math.sqrt(len(d)))
        return t, float(2 * stats.t.sf(abs(t), len(d) - 1))

    def wilcoxon(self) -> float | None:
        """The exact two-sided p-value of the Wilcoxon signed-rank test (``None`` when every difference is 0)."""
        if not any(self.differences):
            return None
        return float(stats.wilcoxon(self.a_values, self.b_values, method="exact").pvalue)


def find(groups: Sequence[Group], name: str) -> list[Group]:
    """The groups ``name`` means: a method's label as the table shows it (``ewc (method.ewc_lambda=100)``), or a
    method's name where it ran with one setting on a stream."""
    exact = [g for g in groups if g.label == name]
    return exact or [g for g in groups if g.method == name]


def compare(groups: Sequence[Group], a: str, b: str, metric: str = "avg_accuracy") -> list[Comparison]:
    """On each stream where both ``a`` and ``b`` ran, their runs paired by seed. Raises ``ValueError`` saying what
    is missing: a name that matches no runs, or several settings of one method on a stream."""
    found = {name: find(groups, name) for name in (a, b)}
    for name, gs in found.items():
        if not gs:
            labels = sorted({g.label for g in groups})
            raise ValueError(f"no runs of {name!r} below the folder; the methods there: {', '.join(labels)}")
        streams = [g.stream[:3] for g in gs]
        if len(set(streams)) < len(streams):
            raise ValueError(f"{name!r} ran with several settings on one stream: name one, e.g. {gs[0].label!r}")
    out = []
    for ga in found[a]:
        for gb in found[b]:
            if ga.stream[:3] != gb.stream[:3]:
                continue
            va, vb = _by_seed(ga, metric), _by_seed(gb, metric)
            seeds = [s for s in va if s in vb]
            unpaired = ([s for s in va if s not in vb], [s for s in vb if s not in va])
            out.append(Comparison(ga, gb, metric, seeds, [va[s] for s in seeds], [vb[s] for s in seeds], unpaired))
    if not out:
        raise ValueError(f"{a!r} and {b!r} never ran on the same stream (dataset, scenario and number of tasks)")
    return out


def _by_seed(g: Group, metric: str) -> dict[Any, float]:
    return {seed: float(m[metric]) for seed, m in zip(g.seeds, g.runs, strict=True) if m.get(metric) is not None}


def report(c: Comparison) -> str:
    """The comparison in words: which seeds pair, the per-seed values, the mean difference, the two tests."""
    dataset, scenario, tasks = c.a.stream[:3]
    pct = 100
    lines = [
        f"{c.metric} on {dataset} ({scenario} scenario, {tasks} tasks): {c.a.label} (A) against {c.b.label} (B)",
        f"seeds paired: {', '.join(map(str, c.seeds)) or 'none'}"
        + "".join(
            f"; only {w} ran seed(s) {', '.join(map(str, s))}" for w, s in zip("AB", c.unpaired, strict=True) if s
        ),
    ]
    for seed, x, y in zip(c.seeds, c.a_values, c.b_values, strict=True):
        lines.append(f"  seed {seed}: A {pct * x:.2f}, B {pct * y:.2f}, A - B {pct * (x - y):+.2f}")
    if len(c.seeds) < 2:
        lines.append("a paired test needs at least 2 seeds run by both: run more seeds (seed=0,1,2)")
        return "\n".join(lines)
    d = c.differences
    t, p = c.t_test()
    w = c.wilcoxon()
    lines.append(
        f"mean difference A - B: {pct * statistics.fmean(d):+.2f} points (sd {pct * statistics.stdev(d):.2f}, "
        f"n = {len(d)}); paired t-test: t({len(d) - 1}) = {t:.3f}, p = {p:.4f} (two-sided); "
        f"Wilcoxon signed-rank: p = {'n/a' if w is None else f'{w:.4f}'} (exact, two-sided)"
    )
    return "\n".join(lines)
