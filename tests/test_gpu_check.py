"""``make gpu-check``'s script, rehearsed on the CPU: every step runs at a toy size and the report holds it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO


@pytest.mark.slow  # 36 s of 8 runs and a benchmark: `make test-all` (and every GPU session's make gpu-check) runs it
def test_the_gpu_check_dry_run_writes_its_report(tmp_path, mnist_root):
    report = tmp_path / "report.md"
    cmd = [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--dry-run", "--report", str(report)]
    env = {"LIFELONG_DATA_DIR": str(mnist_root), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(report.with_suffix(".json").read_text())
    assert "no CUDA device visible" in record["device"] and record["dry_run"]
    status = {s["name"]: s["status"] for s in record["steps"]}
    assert status == {
        "gpu-marked tests (tests/test_gpu.py)": "passed",  # every one skipped, with its reason
        "train.py: cpu": "passed",
        "train.py: cpu again (dry run)": "passed",
        "GPU matrix against the CPU matrix": "passed",
        "train.py: bf16-mixed": "passed",
        "train.py: 16-mixed": "skipped",
        "train.py: ddp_cpu (dry run)": "passed",
        "scripts/benchmark.py (tasks only, dry run)": "passed",
    }, status
    tests = next(s for s in record["steps"] if s["name"].startswith("gpu-marked"))
    assert "skipped" in tests["detail"]
    assert set(record["runs"]) == {"cpu", "cpu again (dry run)", "bf16-mixed", "ddp_cpu (dry run)"}
    assert all(len(m["accuracy_matrix"]) == 2 for m in record["runs"].values())
    assert "| tasks | 50 past tasks: training step with the penalty |" in record["bench"]
    text = report.read_text()
    assert text.startswith("# lifelong GPU check (dry run on the CPU)") and "largest difference 0.00 points" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible: the check would run")
def test_the_gpu_check_refuses_to_run_without_a_gpu(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--report", str(tmp_path / "r.md")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "--dry-run" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r.md").exists()
