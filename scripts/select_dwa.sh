#!/usr/bin/env bash
# Choose method=dwa's defaults (lifelong's held-mask DWA) on VALIDATION data: split MNIST, task scenario, MLP
# 2 x 400, Adam 1e-3, 1 epoch per task (experiment=dwa_split_mnist), 10 % of each task's training set held out,
# 3 seeds per variant. Each variant changes one choice of the held DWA below (or its protection, context or
# mask form); every one starts from method=dwa_paper, so the script means the same whatever dwa.yaml holds.
#   bash scripts/select_dwa.sh [JOBS]
# About 90 minutes on 2 cores. Results: multirun/select_dwa/<variant>/...; summarize.py --select prints the
# variant with the best mean validation accuracy (docs/methods.md, "DWA: what lifelong implements", lists every
# variant's numbers and what was chosen).
set -euo pipefail
JOBS=${1:-2}
PY=${PYTHON:-python}
if [ "$JOBS" -gt 1 ]; then export OMP_NUM_THREADS=1; fi  # parallel jobs on few cores: one thread each
HELD=(method=dwa_paper method.curriculum=false method.mask_form=factored method.context=task method.protection=hard
  method.gate=sigmoid method.stem_layers=0 method.lambda_emb=0)
run() {
  local name=$1; shift
  $PY train.py -m hydra/launcher=joblib hydra.launcher.n_jobs="$JOBS" experiment=dwa_split_mnist logger=none \
    ${RESUME:+resume=true} dataset.val_fraction=0.1 'seed=range(0,3)' "${HELD[@]}" "$@" \
    hydra.sweep.dir=multirun/select_dwa/"$name"
}
run held
run no_sparsity method.lambda_sparsity=0
run no_attention method.lambda_attention=0
run code_sparsity method.sparsity=code
run stem_1 method.stem_layers=1
run triplet method.lambda_emb=20
run soft_protection method.protection=soft
run shared_context method.context=shared
run full_masks method.mask_form=full
run no_regularisers method.lambda_sparsity=0 method.lambda_attention=0   # after the first nine: both best alone
$PY scripts/summarize.py multirun/select_dwa --select
