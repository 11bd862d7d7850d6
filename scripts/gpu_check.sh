#!/usr/bin/env bash
# The GPU check from a clean state (docs/performance.md, "On a GPU"): a fresh environment, then
# scripts/gpu_check.py, which runs every GPU step and writes one report.
#
#   make gpu-check                                # online: a fresh .venv-gpu with lifelong and its test tools
#   make gpu-check WHEELS=.whl PYTHON=python3     # offline: that python's own torch, plus the wheels in .whl
#   make gpu-check REPORT=/somewhere/report.md    # where the report goes (default outputs/gpu_check/report.md)
#   scripts/gpu_check.sh --dry-run                # the same steps on the CPU, at a toy size
#
# Offline, the machine's PyTorch (built for its driver) is used as it is: lifelong and the packages the machine
# lacks, from WHEELS (make gpu-wheels, on a machine with the package index, builds the three it usually lacks:
# hydra-core, omegaconf and antlr4), go into a fresh folder on PYTHONPATH. Extra arguments go to
# scripts/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
GPU_VENV=${GPU_VENV:-.venv-gpu}
REPORT=${REPORT:-outputs/gpu_check/report.md}
if [ -d ../shared/data/MNIST ] && [ -z "${LIFELONG_DATA_DIR:-}" ]; then
  export LIFELONG_DATA_DIR=$(cd ../shared/data && pwd)
fi

start=$(date +%s)
if [ -n "${WHEELS:-}" ]; then
  # Offline, on the machine's own PyTorch: lifelong and the wheels into a fresh folder put first on PYTHONPATH
  # (not a --system-site-packages venv: where the machine's python3 is itself a venv, as on many GPU images,
  # such a venv sees the base interpreter's packages, not that venv's PyTorch)
  how="offline: $PYTHON's own packages, lifelong and the wheels of $WHEELS"
  site=${GPU_VENV}-site
  rm -rf "$site"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$site" . "$WHEELS"/*.whl
  export PYTHONPATH="$(pwd)/$site${PYTHONPATH:+:$PYTHONPATH}"
  run_python=$PYTHON
else
  how=online
  rm -rf "$GPU_VENV"
  "$PYTHON" -m venv "$GPU_VENV"
  "$GPU_VENV/bin/python" -m pip install -q --no-cache-dir --upgrade pip
  "$GPU_VENV/bin/python" -m pip install -q --no-cache-dir -e . pytest
  run_python=$GPU_VENV/bin/python
fi
if ! "$run_python" -c "import lifelong, hydra, omegaconf, torch, lightning, torchmetrics, pytest" 2>/tmp/gpu_check_import.err; then
  echo "error: the environment lacks a package lifelong needs: $(tail -n 1 /tmp/gpu_check_import.err)." >&2
  echo "Offline, add its wheel to WHEELS (make gpu-wheels builds hydra-core, omegaconf and antlr4)." >&2
  exit 2
fi
took=$(( $(date +%s) - start ))
echo "installed ($how) in $took s"
exec "$run_python" scripts/gpu_check.py --report "$REPORT" --installed "$how" "$took" "$@"
