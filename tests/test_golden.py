"""Every method's numbers as recorded in tests/golden/metrics.json (``python scripts/golden.py record``).

A structural change must leave them identical; one that changes a number says which and why, and records
the file again. They are exact on the machine they were recorded on: on another kind of processor, float
sums in another order can differ, so record there first, then check after the change.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_every_method_gives_its_recorded_numbers(mnist_root):
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "golden.py"), "check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "LIFELONG_DATA_DIR": str(mnist_root)},
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
