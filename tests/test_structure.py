"""The code's structure, held: the library's core takes plain values (no Hydra), methods reach the module only
through their door, the stream alone knows what a task's epochs are, and no source file grows past a page."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lifelong"
CORE = (
    "lifelong",
    "lifelong.data",
    "lifelong.models",
    "lifelong.methods",
    "lifelong.metrics",
    "lifelong.metrics.summary",
    "lifelong.run",
    "lifelong.folders",
    "lifelong.checkpoints",
    "lifelong.callbacks",
    "lifelong.loggers",
)
ENTRY_LAYER = {"cli.py", "config.py"}  # what train.py and eval.py share: the only modules that may import Hydra


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_core_never_imports_hydra_or_omegaconf():
    code = f"import sys; import {', '.join(CORE)}; print(sorted(m for m in ('hydra', 'omegaconf') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    for path in SRC.rglob("*.py"):
        if path.name not in ENTRY_LAYER or path.parent != SRC:
            assert not {m for m in _imports(path) if m.split(".")[0] in ("hydra", "omegaconf")}, path


def test_no_method_imports_the_lightning_module():
    for path in (SRC / "methods").rglob("*.py"):
        assert not {m for m in _imports(path) if m.startswith("lifelong.models")}, path


def test_only_the_stream_knows_how_many_epochs_a_task_has():
    mentions = {p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py") if "epochs_per_task" in p.read_text()}
    # the stream (and the checks of its arguments), and the entry layer that maps the command line's
    # epochs_per_task= onto it
    assert mentions <= {"data/streams.py", "data/arguments.py", "cli.py"}, mentions


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: p.relative_to(SRC).as_posix())
def test_no_source_file_is_over_450_lines(path):
    assert len(path.read_text().splitlines()) <= 450
