"""Everything lifelong checks on a GPU, in one go, with one report: ``make gpu-check`` (docs/performance.md).

    python scripts/gpu_check.py --report outputs/gpu_check/report.md      # on a machine with CUDA
    python scripts/gpu_check.py --dry-run --report /tmp/report.md          # the same steps on the CPU, tiny

GPU time is usually short and shared, so the steps are ordered by what they tell, each has a time limit, and the
report is rewritten after every step: what finished is kept if the machine is taken back. The steps:

1. the ``gpu``-marked tests (tests/test_gpu.py: GPU against CPU, mixed precision and EWC's penalty, no host
   sync in a training step, data-parallel);
2. EWC on permuted MNIST through ``train.py``: on the CPU and with ``trainer=gpu`` (the two matrices must agree
   within :data:`ENTRY_TOLERANCE`), with ``trainer.precision=bf16-mixed`` and ``16-mixed``, and with
   ``trainer=ddp`` on every GPU there is;
3. ``scripts/benchmark.py --device cuda`` (sections train, fisher, tasks, dwa, kfac).

``--dry-run`` runs the same steps on the CPU at a toy size (``trainer=cpu``, ``ddp_cpu``, bf16 autocast on
the CPU; 16-mixed needs CUDA and is skipped), so the tests can check the script without a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ENTRY_TOLERANCE = 0.01  # GPU against CPU, each accuracy of the matrix: rounding, not a bug's size
MIXED_TOLERANCE = 0.03  # mixed precision against full precision, average accuracy


@dataclass
class Step:
    name: str
    status: str = "not run"  # passed | failed | skipped | timed out
    seconds: float = 0.0
    detail: str = ""
    log_tail: str = ""


@dataclass
class Report:
    path: Path
    device: str
    dry_run: bool
    steps: list[Step] = field(default_factory=list)
    runs: dict[str, dict] = field(default_factory=dict)
    bench_table: str = ""
    started: float = field(default_factory=time.perf_counter)

    def write(self) -> None:
        """The report as Markdown at ``path`` and as JSON beside it (rewritten after every step)."""
        lines = [
            f"# lifelong GPU check{' (dry run on the CPU)' if self.dry_run else ''}",
            "",
            f"- device: {self.device}",
            f"- {_versions()}",
            f"- commit {_commit()}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, "
            f"{time.perf_counter() - self.started:.0f} s so far",
            "",
            "| step | status | seconds | detail |",
            "| --- | --- | --- | --- |",
            *(f"| {s.name} | {s.status} | {s.seconds:.0f} | {s.detail} |" for s in self.steps),
        ]
        if self.runs:
            lines += ["", "## Runs (EWC, permuted MNIST)", "", "| run | average accuracy | BWT | wall time |"]
            lines += ["| --- | --- | --- | --- |"]
            for name, m in self.runs.items():
                acc, bwt = m.get("avg_accuracy"), m.get("bwt")
                lines.append(f"| {name} | {_pct(acc)} | {_pct(bwt)} | {m.get('wall_time_s', float('nan')):.1f} s |")
            for name, m in self.runs.items():
                lines += ["", f"{name}: accuracy matrix (%)", "", "```"]
                lines += [" ".join(f"{100 * v:6.2f}" for v in row) for row in m.get("accuracy_matrix", [])]
                lines += ["```"]
        if self.bench_table:
            lines += ["", "## Benchmark", "", self.bench_table]
        failed = [s for s in self.steps if s.status in ("failed", "timed out") and s.log_tail]
        for s in failed:
            lines += ["", f"## {s.name}: the end of its output", "", "```", s.log_tail, "```"]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("\n".join(lines) + "\n")
        record = {
            "device": self.device,
            "dry_run": self.dry_run,
            "steps": [s.__dict__ for s in self.steps],
            "runs": self.runs,
            "bench": self.bench_table,
        }
        self.path.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f} %"


def _versions() -> str:
    import lightning

    cuda = torch.version.cuda or "none"
    return (
        f"torch {torch.__version__} (CUDA {cuda}), lightning {lightning.__version__}, Python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs"
    )


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def device_name() -> str:
    if not torch.cuda.is_available():
        return f"CPU ({platform.processor() or platform.machine()}), no CUDA device visible"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    props = torch.cuda.get_device_properties(0)
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
    )
    driver = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else "unknown"
    return (
        f"{len(names)} x {names[0]} ({props.total_memory / 2**30:.0f} GiB, compute capability "
        f"{props.major}.{props.minor}), driver {driver}"
    )


def run_step(report: Report, step: Step, cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> str:
    """Run ``cmd`` as ``step``; its output is returned (and its end kept in the report when it fails)."""
    report.steps.append(step)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
        )
        output = proc.stdout + proc.stderr
        step.status = "passed" if proc.returncode == 0 else "failed"
        if proc.returncode != 0:
            step.detail = step.detail or f"exit {proc.returncode}"
    except subprocess.TimeoutExpired as err:
        output = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        step.status, step.detail = "timed out", f"after {timeout:.0f} s"
    step.seconds = time.perf_counter() - t0
    if step.status != "passed":
        step.log_tail = output[-3000:]
    print(f"[{step.status}] {step.name} ({step.seconds:.0f} s) {step.detail}", flush=True)
    report.write()
    return output


def train(report: Report, name: str, overrides: list[str], out: Path, timeout: float) -> dict | None:
    """``train.py`` with ``overrides``; its metrics.json, recorded in the report under ``name``."""
    run_dir = out / "runs" / re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    cmd = [sys.executable, str(REPO / "train.py"), *overrides, f"hydra.run.dir={run_dir}", "overwrite=true"]
    run_step(report, Step(f"train.py: {name}"), cmd, timeout)
    metrics_file = run_dir / "metrics.json"
    if report.steps[-1].status != "passed" or not metrics_file.is_file():
        return None
    metrics = json.loads(metrics_file.read_text())
    report.runs[name] = metrics
    report.steps[-1].detail = f"average accuracy {_pct(metrics['avg_accuracy'])}"
    report.write()
    return metrics


def _max_difference(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", type=Path, default=REPO / "outputs" / "gpu_check" / "report.md")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU, at a toy size")
    parser.add_argument("--installed", nargs=2, metavar=("HOW", "SECONDS"), help="the install step's (gpu_check.sh)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["tests", "runs", "bench"], help="steps to leave out")
    args = parser.parse_args(argv)
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("error: no CUDA device is visible to this process; for the CPU rehearsal use --dry-run", file=sys.stderr)
        return 2
    out = args.report.parent
    report = Report(args.report, device_name() + (" (dry run)" if dry else ""), dry)
    print(f"GPU check on {report.device}; the report: {args.report}", flush=True)
    if args.installed:
        how, seconds = args.installed
        report.steps.append(Step(f"install from a clean state ({how})", "passed", float(seconds)))
    report.write()
    root = os.environ.get("LIFELONG_DATA_DIR")
    data = [f"dataset.root={root}"] if root else []

    if "tests" not in args.skip:
        output = run_step(
            report,
            Step("gpu-marked tests (tests/test_gpu.py)"),
            [sys.executable, "-m", "pytest", "-m", "gpu", "-rs", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"],
            timeout=60 if dry else 300,
        )
        summary = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|skipped)", line)]
        report.steps[-1].detail = summary[-1].strip("= ") if summary else report.steps[-1].detail
        report.write()

    if "runs" not in args.skip:
        size = (
            ["dataset.num_tasks=2", "dataset.max_train_samples=600", "dataset.max_test_samples=300"]
            if dry
            else ["dataset.num_tasks=5"]
        )
        common = [*data, *size, "logger=none", "trainer.enable_progress_bar=false"]
        limit = 120 if dry else 240
        cpu = train(report, "cpu", [*common, "trainer=cpu"], out, limit)
        accelerator = "trainer=cpu" if dry else "trainer=gpu"
        gpu = train(report, "gpu" if not dry else "cpu again (dry run)", [*common, accelerator], out, limit)
        if cpu and gpu:
            diff = _max_difference(cpu["accuracy_matrix"], gpu["accuracy_matrix"])
            ok = diff <= ENTRY_TOLERANCE
            report.steps.append(
                Step(
                    "GPU matrix against the CPU matrix",
                    "passed" if ok else "failed",
                    detail=f"largest difference {100 * diff:.2f} points (tolerance {100 * ENTRY_TOLERANCE:.0f})",
                )
            )
        for precision in ("bf16-mixed", "16-mixed"):
            if dry and precision == "16-mixed":
                report.steps.append(Step(f"train.py: {precision}", "skipped", detail="needs CUDA"))
                continue
            mixed = train(report, precision, [*common, accelerator, f"+trainer.precision={precision}"], out, limit)
            if mixed and gpu:
                gap = abs(mixed["avg_accuracy"] - gpu["avg_accuracy"])
                report.steps[-1].detail += f"; {100 * gap:.2f} points from full precision"
                if gap > MIXED_TOLERANCE:
                    report.steps[-1].status = "failed"
        ddp = "trainer=ddp_cpu" if dry else "trainer=ddp"
        train(
            report,
            "ddp_cpu (dry run)" if dry else f"ddp on {torch.cuda.device_count()} GPU(s)",
            [*common, ddp],
            out,
            limit * 2,
        )
        report.write()

    if "bench" not in args.skip:
        bench = (
            ["--device", "cpu", "--sections", "tasks", "--repeats", "1"]
            if dry
            else ["--device", "cuda", "--sections", "train", "fisher", "tasks", "dwa", "kfac", "--repeats", "3"]
        )
        output = run_step(
            report,
            Step("scripts/benchmark.py" + (" (tasks only, dry run)" if dry else " --device cuda")),
            [sys.executable, str(REPO / "scripts" / "benchmark.py"), *bench, *(["--data-root", root] if root else [])],
            timeout=90 if dry else 360,
        )
        table = output[output.find("| section |") :] if "| section |" in output else ""
        report.bench_table = table.strip()
        report.write()

    failed = [s.name for s in report.steps if s.status in ("failed", "timed out")]
    print(
        f"report: {args.report} ({len(report.steps)} steps, {len(failed)} failed{': ' if failed else ''}"
        f"{', '.join(failed)})",
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
