"""Summarise a sweep: every ``metrics.json`` below a folder, as one table of mean and std over seeds.

python scripts/summarize.py multirun/2026-11-22_10-00-00            # Markdown table + summary.csv
python scripts/summarize.py outputs --plot                         # and a bar chart, summary.png
python scripts/summarize.py multirun/long --curves                 # and accuracy after each task, curves.png
python scripts/summarize.py multirun/lambda_sweep --select          # per method, the setting with the best
                                                                   # validation accuracy, and its test accuracy
python scripts/summarize.py multirun/seeds --compare ewc finetune  # a paired test over the seeds both ran

Runs are grouped by stream (dataset, scenario, number of tasks), method and hyperparameter setting: the
config keys whose values differ between runs of the same stream and method, except the seed and keys that
do not change what is learnt (paths, logging, hardware). A row is one setting, averaged over its seeds.
Beside the accuracies, what the runs cost where their ``metrics.json`` records it: training time, examples seen,
the bytes the method keeps, peak memory; and, for runs with continual evaluation (``eval_every``), min-ACC,
WC-ACC and windowed forgetting (WF10, WF100).
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib.figure import Figure

from lifelong.errors import WriteError
from lifelong.files import atomic_open, save_atomic
from lifelong.keys import NOT_HYPERPARAMETERS, flatten, under
from lifelong.metrics.continual import SUMMARY_KEYS

if TYPE_CHECKING:
    from matplotlib.axes import Axes

METRICS = SUMMARY_KEYS
LABELS = {"avg_accuracy": "ACC", "bwt": "BWT", "forgetting": "forgetting", "fwt": "FWT", "learning_accuracy": "LA"}
LABELS["task_aware_avg_accuracy"] = "Task-IL ACC"
LABELS.update(min_acc="min-ACC", wc_acc="WC-ACC", wf10="WF10", wf100="WF100")
STABILITY = ("min_acc", "wc_acc", "wf10", "wf100")  # columns where some run measured a continual-evaluation curve
# what a run cost, by its metrics.json key: the column's label and how a value is shown
COST = {
    "wall_time_s": ("time (s)", lambda v: f"{v:.1f}"),
    "examples_seen": ("examples (k)", lambda v: f"{v / 1e3:.1f}"),
    "method_state_bytes_max": ("method state (MiB)", lambda v: f"{v / 2**20:.2f}"),
    "peak_memory_bytes": ("peak memory (MiB)", lambda v: f"{v / 2**20:.0f}"),
}
SELECT_ON = "val_avg_accuracy"
# the class scenario's Task-IL view of the same runs (each sample ranked among its own task's classes): a column
# of the table where some run has it
TASK_AWARE = "task_aware_avg_accuracy"


@dataclass
class Group:
    """The runs of one method and hyperparameter setting on one stream (dataset, scenario, tasks), over seeds."""

    dataset: str
    scenario: str
    num_tasks: int
    method: str
    setting: tuple[tuple[str, str], ...] = ()  # (key, value) of each hyperparameter that varies in the sweep
    values: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    seeds: list[Any] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)  # each run's metrics.json, in the order of `seeds`

    @property
    def stream(self) -> tuple[str, str, int, str]:
        return self.dataset, self.scenario, self.num_tasks, self.method

    @property
    def label(self) -> str:
        """The method and its setting, e.g. ``ewc (method.ewc_lambda=100)``."""
        return self.method + (f" ({', '.join(f'{k}={v}' for k, v in self.setting)})" if self.setting else "")

    def mean(self, key: str) -> float:
        v = self.values[key]
        return statistics.fmean(v) if v else math.nan

    def std(self, key: str) -> float:
        """The sample standard deviation (n - 1), 0 for a single run."""
        v = self.values[key]
        return statistics.stdev(v) if len(v) > 1 else 0.0


def _method_order(method: str) -> tuple[int, str]:
    return ({"finetune": 0, "joint": 2}.get(method, 1), method)


def _is_hyperparameter(key: str) -> bool:
    return not any(under(key, k) for k in NOT_HYPERPARAMETERS)


def collect(root: Path) -> tuple[list[Group], list[str]]:
    """Every finished run below ``root``, grouped; also a note for each run left out (and why)."""
    runs: dict[tuple[str, str, int, str], list[tuple[Path, dict[str, Any], dict[str, str]]]] = defaultdict(list)
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
        runs[key].append((path.parent, m, {k: json.dumps(v) for k, v in flatten(m.get("config") or {}).items()}))
    groups: dict[tuple[Any, ...], Group] = {}
    for key, members in runs.items():
        keys = sorted({k for _, _, c in members for k in c})
        varying = [k for k in keys if _is_hyperparameter(k) and len({c.get(k) for _, _, c in members}) > 1]
        for folder, m, config in members:
            setting = tuple((k, config.get(k, "-")) for k in varying)
            group = groups.setdefault((*key, setting), Group(*key, setting=setting))
            for k in (*METRICS, SELECT_ON, TASK_AWARE, *STABILITY, *COST):
                if m.get(k) is not None:
                    group.values[k].append(float(m[k]))
            group.seeds.append(m.get("seed"))
            group.folders.append(folder)
            group.runs.append(m)
    ordered = sorted(
        groups.values(), key=lambda g: (g.dataset, g.scenario, g.num_tasks, _method_order(g.method), g.setting)
    )
    return ordered, skipped


@dataclass
class Selection:
    """For one method on one stream: the setting with the best mean validation accuracy, among ``candidates``."""

    best: Group
    candidates: list[Group]


def select(groups: Sequence[Group]) -> tuple[list[Selection], list[str]]:
    """Per stream and method, the hyperparameter setting with the best mean validation average accuracy.

    Test accuracy plays no part in the choice. A method whose runs lack validation accuracy (run with
    ``dataset.val_fraction=0``) is left out with a note, never selected on test.
    """
    by_stream: dict[tuple[str, str, int, str], list[Group]] = defaultdict(list)
    for g in groups:
        by_stream[g.stream].append(g)
    chosen: list[Selection] = []
    notes: list[str] = []
    for stream, candidates in by_stream.items():
        missing = [g for g in candidates if len(g.values[SELECT_ON]) < len(g.seeds)]
        if missing:
            runs = sum(len(g.seeds) - len(g.values[SELECT_ON]) for g in missing)
            notes.append(
                f"{' / '.join(map(str, stream))}: {runs} run(s) without validation accuracy (trained with "
                "dataset.val_fraction=0), so nothing is selected; rerun the sweep with dataset.val_fraction=0.1"
            )
            continue
        best = max(candidates, key=lambda g: g.mean(SELECT_ON))  # the first of equals, in the table's order
        chosen.append(Selection(best, candidates))
    return chosen, notes


def _pct(mean: float, std: float, runs: int) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if runs > 1 else f"{100 * mean:.2f}"


def _method_cell(g: Group) -> str:
    return f"`{g.method}`" + (f" {', '.join(f'{k}={v}' for k, v in g.setting)}" if g.setting else "")


def markdown(groups: Sequence[Group]) -> str:
    """The table: one row per stream, method and setting; percentages, mean ± std over the runs (seeds). With
    class-scenario runs, a column gives their task-aware (Task-IL) ACC; with continual evaluation, min-ACC and
    WC-ACC; then the means of what the runs cost, where their metrics record it."""
    keys, cost = _table_keys(groups), _cost_keys(groups)
    head = ["dataset", "scenario", "tasks", "method", "runs", *(f"{LABELS[k]} (%)" for k in keys)]
    head += [COST[k][0] for k in cost]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        runs = len(g.seeds)
        cells = [g.dataset, g.scenario, str(g.num_tasks), _method_cell(g), str(runs)]
        cells += [_pct(g.mean(k), g.std(k), runs) for k in keys]
        cells += [COST[k][1](g.mean(k)) if g.values[k] else "n/a" for k in cost]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _table_keys(groups: Sequence[Group]) -> tuple[str, ...]:
    extra = [k for k in (TASK_AWARE, *STABILITY) if any(g.values[k] for g in groups)]
    return (*METRICS, *extra)


def _cost_keys(groups: Sequence[Group]) -> tuple[str, ...]:
    return tuple(k for k in COST if any(g.values[k] for g in groups))


def selection_markdown(chosen: Sequence[Selection]) -> str:
    """The table a paper reports: each method at its validation-selected setting, with that setting's test results."""
    head = ["dataset", "scenario", "tasks", "method (selected setting)", "settings", "runs", "val ACC (%)"]
    head += ["test ACC (%)", "BWT (%)", "forgetting (%)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in chosen:
        g, runs = c.best, len(c.best.seeds)
        cells = [g.dataset, g.scenario, str(g.num_tasks), _method_cell(g), str(len(c.candidates)), str(runs)]
        cells += [_pct(g.mean(k), g.std(k), runs) for k in (SELECT_ON, "avg_accuracy", "bwt", "forgetting")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(groups: Sequence[Group], path: Path) -> None:
    keys = (*_table_keys(groups), SELECT_ON, *_cost_keys(groups))
    with atomic_open(path, newline="") as f:
        writer = csv.writer(f)
        stats = [f"{k}_{s}" for k in keys for s in ("mean", "std")]
        writer.writerow(["dataset", "scenario", "num_tasks", "method", "setting", "runs", *stats, "seeds"])
        for g in groups:
            stats = [f"{v:.6f}" for k in keys for v in (g.mean(k), g.std(k))]
            seeds = " ".join(str(s) for s in g.seeds)
            setting = " ".join(f"{k}={v}" for k, v in g.setting)
            writer.writerow([g.dataset, g.scenario, g.num_tasks, g.method, setting, len(g.seeds), *stats, seeds])


def _stream_panels(
    groups: Sequence[Group], width: Callable[[int], float], height: float
) -> tuple[Figure, list[tuple[Axes, list[Group]]]]:
    """A figure of one titled panel per stream (dataset, scenario, tasks), each with its groups; ``width`` of the most
    groups one panel holds, ``height`` a panel's."""
    streams: dict[tuple[str, str, int], list[Group]] = defaultdict(list)
    for g in groups:
        streams[g.dataset, g.scenario, g.num_tasks].append(g)
    most = max(len(v) for v in streams.values()) if streams else 1
    fig = Figure(figsize=(width(most), height * max(1, len(streams))), dpi=110)
    axes = fig.subplots(max(1, len(streams)), 1, squeeze=False)[:, 0]
    for ax, (dataset, scenario, tasks) in zip(axes, streams, strict=False):
        ax.set_title(f"{dataset}, {scenario} scenario, {tasks} tasks (mean ± std over seeds)", fontsize=9)
    return fig, list(zip(axes, streams.values(), strict=False))


def bar_chart(groups: Sequence[Group], title: str = "") -> Figure:
    """Average accuracy of each method with its standard deviation over seeds, one panel per stream."""
    fig, panels = _stream_panels(groups, lambda most: max(4.0, 0.7 * most + 1.5), 3.2)
    for ax, gs in panels:
        means = [100 * g.mean("avg_accuracy") for g in gs]
        stds = [100 * g.std("avg_accuracy") for g in gs]
        ax.bar(range(len(gs)), means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(gs)), [g.label for g in gs], rotation=30, ha="right")
        ax.set_ylabel("average accuracy (%)")
        ax.set_ylim(0, 100)
        for i, (m, g) in enumerate(zip(means, gs, strict=True)):  # inside the bar: clear of the title
            ax.text(i, m / 2, f"{m:.1f}\nn={len(g.seeds)}", ha="center", va="center", fontsize=7, color="white")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def seen_accuracy(run: dict[str, Any]) -> list[float]:
    """Row t's mean over tasks 1..t of a run's accuracy matrix: the average accuracy after each task."""
    rows = run["accuracy_matrix"]
    return [statistics.fmean(row[: t + 1]) for t, row in enumerate(rows) if not any(map(math.isnan, row[: t + 1]))]


def accuracy_curves(groups: Sequence[Group], reference: tuple[float, str] | None = None) -> Figure:
    """The average accuracy over the tasks seen so far after each task, one line per group (mean over its seeds, a
    band of one standard deviation), one panel per stream; ``reference``: a published value (%) and its label."""
    fig, panels = _stream_panels(groups, lambda _: 7.0, 3.6)
    for ax, gs in panels:
        for g in gs:
            curves = [seen_accuracy(run) for run in g.runs]
            length = min(len(c) for c in curves)
            columns = [[100 * c[t] for c in curves] for t in range(length)]
            mean = [statistics.fmean(col) for col in columns]
            std = [statistics.stdev(col) if len(col) > 1 else 0.0 for col in columns]
            x = range(1, length + 1)
            (line,) = ax.plot(x, mean, label=f"{g.label} (n={len(curves)})")
            ax.fill_between(
                x,
                [m - s for m, s in zip(mean, std, strict=True)],
                [m + s for m, s in zip(mean, std, strict=True)],
                color=line.get_color(),
                alpha=0.2,
            )
        if reference is not None:
            ax.axhline(reference[0], color="black", linestyle="--", linewidth=1, label=reference[1])
        ax.set(xlabel="after training task", ylabel="average accuracy on the tasks seen (%)", ylim=(0, 100))
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def main(argv: Iterable[str] | None = None) -> int:
    """``lifelong-summarize``; a write the system refuses ends in one message naming the file (exit 2)."""
    try:
        return _main(argv)
    except WriteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a sweep or outputs folder; every metrics.json below it is read")
    parser.add_argument("--csv", type=Path, help="where to write the table as CSV (default FOLDER/summary.csv)")
    parser.add_argument("--plot", action="store_true", help="also save a bar chart (FOLDER/summary.png)")
    parser.add_argument(
        "--curves",
        action="store_true",
        help="also save each group's average accuracy on the tasks seen after each task (FOLDER/curves.png)",
    )
    parser.add_argument(
        "--reference",
        type=_reference,
        metavar="PERCENT=LABEL",
        help="with --curves: a published value drawn as a line, e.g. '90=paper'",
    )
    parser.add_argument(
        "--select",
        action="store_true",
        help="per stream and method, the setting with the best mean validation accuracy and its test results "
        "(FOLDER/selection.csv); needs runs with dataset.val_fraction > 0",
    )
    parser.add_argument(
        "--compare",
        nargs=2,
        metavar=("A", "B"),
        help="a paired test over seeds of method A against method B on each stream both ran (names as the table "
        "shows them)",
    )
    parser.add_argument("--metric", default="avg_accuracy", help="what --compare compares (a metrics.json key)")
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
    if args.select:
        return _print_selection(groups, args.folder, args.csv)
    if args.compare:
        return _print_comparison(groups, args.compare[0], args.compare[1], args.metric)
    print(markdown(groups))
    out = args.csv or args.folder / "summary.csv"
    write_csv(groups, out)
    print(f"\n{sum(len(g.seeds) for g in groups)} runs in {len(groups)} groups; table written to {out}")
    if args.plot:
        png = args.folder / "summary.png"
        save_atomic(png, functools.partial(bar_chart(groups).savefig, format="png"))
        print(f"bar chart written to {png}")
    if args.curves:
        png = args.folder / "curves.png"
        save_atomic(png, functools.partial(accuracy_curves(groups, args.reference).savefig, format="png"))
        print(f"accuracy curves written to {png}")
    return 0


def _reference(text: str) -> tuple[float, str]:
    value, _, label = text.partition("=")
    try:
        return float(value), label
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected PERCENT=LABEL, e.g. '90=Ritter et al. 2018'") from None


def _print_comparison(groups: Sequence[Group], a: str, b: str, metric: str) -> int:
    from lifelong.metrics.compare import compare, report

    try:
        comparisons = compare(groups, a, b, metric)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n\n".join(report(c) for c in comparisons))
    return 0


def _print_selection(groups: Sequence[Group], folder: Path, csv_path: Path | None) -> int:
    chosen, notes = select(groups)
    for note in notes:
        print(f"not selected: {note}", file=sys.stderr)
    if not chosen:
        print("error: no method with validation accuracy to select on", file=sys.stderr)
        return 2
    keys = sorted({k for c in chosen for g in c.candidates for k, _ in g.setting})
    print(selection_markdown(chosen))
    print(
        f"\nselected on mean validation average accuracy ({SELECT_ON}) over seeds; test accuracy took no part. "
        f"Hyperparameters (config keys that vary between runs of a method): {', '.join(keys) or 'none'}"
    )
    out = csv_path or folder / "selection.csv"
    write_csv([c.best for c in chosen], out)
    print(f"table written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
