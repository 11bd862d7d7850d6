#!/usr/bin/env bash
# The GPU check from a clean state (docs/performance.md, "On a GPU"): a fresh environment, then
# scripts/gpu_check.py, which runs every GPU step and writes one report.
#
#   make gpu-check                                # online: a fresh .venv-gpu with lifelong and its test tools
#   make gpu-check WHEELS=.whl                    # offline: the machine's own torch, plus the wheels in .whl
#   make gpu-check REPORT=/somewhere/report.md    # where the report goes (default outputs/gpu_check/report.md)
#   scripts/gpu_check.sh --dry-run                # the same steps on the CPU, at a toy size
#
# Offline, the environment is made with --system-site-packages, so that the machine's PyTorch (built for its
# driver) is used as it is; the packages it lacks come from WHEELS (make gpu-wheels, on a machine with the
# package index, fetches the three it usually lacks: hydra-core, omegaconf and antlr4). Extra arguments go to
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
rm -rf "$GPU_VENV"
how=online
if [ -n "${WHEELS:-}" ]; then
  how="offline, the machine's torch and $WHEELS"
  "$PYTHON" -m venv --system-site-packages "$GPU_VENV"
  "$GPU_VENV/bin/python" -m pip install -q --no-index --find-links "$WHEELS" --no-build-isolation -e .
else
  "$PYTHON" -m venv "$GPU_VENV"
  "$GPU_VENV/bin/python" -m pip install -q --no-cache-dir --upgrade pip
  "$GPU_VENV/bin/python" -m pip install -q --no-cache-dir -e . pytest
fi
took=$(( $(date +%s) - start ))
echo "installed into $GPU_VENV in $took s"
exec "$GPU_VENV/bin/python" scripts/gpu_check.py --report "$REPORT" --installed "$how" "$took" "$@"
