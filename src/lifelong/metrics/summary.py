"""Summarise a sweep: every ``metrics.json`` below a folder, as one table of mean and std over seeds.

python scripts/summarize.py multirun/2026-11-22_10-00-00            # Markdown table + summary.csv
python scripts/summarize.py outputs --plot                         # and a bar chart, summary.png
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

METRICS = ("avg_accuracy", "bwt", "forgetting")
LABELS = {"avg_accuracy": "ACC", "bwt": "BWT", "forgetting": "forgetting"}


@dataclass
class Group:
    """The runs of one method on one stream (dataset, scenario, number of tasks), over seeds."""

    dataset: str
    scenario: str
    num_tasks: int
    method: str
    values: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    seeds: list[Any] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)

    def mean(self, key: str) -> float:
        v = self.values[key]
        return statistics.fmean(v) if v else math.nan

    def std(self, key: str) -> float:
        """The sample standard deviation (n - 1), 0 for a single run."""
        v = self.values[key]
        return statistics.stdev(v) if len(v) > 1 else 0.0


def _method_order(method: str) -> tuple[int, str]:
    return ({"finetune": 0, "joint": 2}.get(method, 1), method)


def collect(root: Path) -> tuple[list[Group], list[str]]:
    """Every finished run below ``root``, grouped; also a note for each run left out (and why)."""
    groups: dict[tuple[str, str, int, str], Group] = {}
    skipped: list[str] = []
    for path in sorted(root.rglob("metrics.json")):
        try:
            m = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            skipped.append(f"{path}: unreadable ({err})")
            continue
        if m.get("tasks_completed", m.get("num_tasks")) != m.get("num_tasks") or m.get("avg_accuracy") is None:
            skipped.append(f"{path}: unfinished ({m.get('tasks_completed')} of {m.get('num_tasks')} tasks)")
            continue
        scenario = m.get("scenario") or m.get("stream", {}).get("scenario") or "-"
        key = (str(m.get("dataset")), str(scenario), int(m["num_tasks"]), str(m.get("method")))
        group = groups.setdefault(key, Group(*key))
        for k in METRICS:
            if m.get(k) is not None:
                group.values[k].append(float(m[k]))
        group.seeds.append(m.get("seed"))
        group.folders.append(path.parent)
    ordered = sorted(groups.values(), key=lambda g: (g.dataset, g.scenario, g.num_tasks, _method_order(g.method)))
    return ordered, skipped


def _pct(mean: float, std: float, runs: int) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if runs > 1 else f"{100 * mean:.2f}"


def markdown(groups: Sequence[Group]) -> str:
    """The table: one row per method and stream; percentages, mean ± std over the runs (seeds)."""
    head = ["dataset", "scenario", "tasks", "method", "runs", *(f"{LABELS[k]} (%)" for k in METRICS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        runs = len(g.seeds)
        cells = [g.dataset, g.scenario, str(g.num_tasks), f"`{g.method}`", str(runs)]
        cells += [_pct(g.mean(k), g.std(k), runs) for k in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(groups: Sequence[Group], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        stats = [f"{k}_{s}" for k in METRICS for s in ("mean", "std")]
        writer.writerow(["dataset", "scenario", "num_tasks", "method", "runs", *stats, "seeds"])
        for g in groups:
            stats = [f"{v:.6f}" for k in METRICS for v in (g.mean(k), g.std(k))]
            seeds = " ".join(str(s) for s in g.seeds)
            writer.writerow([g.dataset, g.scenario, g.num_tasks, g.method, len(g.seeds), *stats, seeds])


def bar_chart(groups: Sequence[Group], title: str = "") -> Figure:
    """Average accuracy of each method with its standard deviation over seeds, one panel per stream."""
    streams: dict[tuple[str, str, int], list[Group]] = defaultdict(list)
    for g in groups:
        streams[g.dataset, g.scenario, g.num_tasks].append(g)
    width = max(len(v) for v in streams.values()) if streams else 1
    fig = Figure(figsize=(max(4.0, 0.7 * width + 1.5), 3.2 * max(1, len(streams))), dpi=110)
    axes = fig.subplots(max(1, len(streams)), 1, squeeze=False)[:, 0]
    for ax, ((dataset, scenario, tasks), gs) in zip(axes, streams.items(), strict=False):
        means = [100 * g.mean("avg_accuracy") for g in gs]
        stds = [100 * g.std("avg_accuracy") for g in gs]
        ax.bar(range(len(gs)), means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(gs)), [g.method for g in gs], rotation=30, ha="right")
        ax.set_ylabel("average accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{dataset}, {scenario} scenario, {tasks} tasks (mean ± std over seeds)", fontsize=9)
        for i, (m, g) in enumerate(zip(means, gs, strict=True)):  # inside the bar: clear of the title
            ax.text(i, m / 2, f"{m:.1f}\nn={len(g.seeds)}", ha="center", va="center", fontsize=7, color="white")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a sweep or outputs folder; every metrics.json below it is read")
    parser.add_argument("--csv", type=Path, help="where to write the table as CSV (default FOLDER/summary.csv)")
    parser.add_argument("--plot", action="store_true", help="also save a bar chart (FOLDER/summary.png)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if not args.folder.is_dir():
        print(f"error: {args.folder} is not a folder", file=sys.stderr)
        return 2
    groups, skipped = collect(args.folder)
    for note in skipped:
        print(f"skipped {note}", file=sys.stderr)
    if not groups:
        print(f"error: no finished run (metrics.json) below {args.folder}", file=sys.stderr)
        return 2
    print(markdown(groups))
    out = args.csv or args.folder / "summary.csv"
    write_csv(groups, out)
    print(f"\n{sum(len(g.seeds) for g in groups)} runs in {len(groups)} groups; table written to {out}")
    if args.plot:
        png = args.folder / "summary.png"
        bar_chart(groups).savefig(png)
        print(f"bar chart written to {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
