#!/usr/bin/env bash
# Select L2's and LwF's strengths for Hsu et al. (2018) split MNIST on VALIDATION data (10 % of each task's
# training set held out), 3 seeds per value; then scripts/reproduce_hsu2018.sh trains on the full training set
# with the selected values and reports test accuracy.
#   bash scripts/select_hsu2018.sh [JOBS]
# Results: multirun/select_hsu2018/<scenario>/<method>/..., the choice printed by summarize.py --select.
# Run again over existing results: RESUME=1 finishes what is missing and skips finished runs (a new run
# is refused in a folder that holds results).
set -euo pipefail
JOBS=${1:-2}
PY=${PYTHON:-python}
run() {
  $PY train.py -m hydra/launcher=joblib hydra.launcher.n_jobs="$JOBS" logger=none ${RESUME:+resume=true} dataset.val_fraction=0.1 \
    'seed=range(0,3)' "$@"
}
for sc in domain class; do
  run experiment=hsu2018_split_mnist_$sc method=l2 'method.l2_lambda=0.01,0.1,1,10,100,1000' \
    hydra.sweep.dir=multirun/select_hsu2018/$sc/l2
  run experiment=hsu2018_split_mnist_$sc method=lwf 'method.lwf_alpha=0.3,1,3,10,30,100' \
    hydra.sweep.dir=multirun/select_hsu2018/$sc/lwf
done
$PY scripts/summarize.py multirun/select_hsu2018 --select
