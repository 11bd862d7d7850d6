#!/usr/bin/env bash
# Ritter, Botev & Barber (2018)'s permuted MNIST, 50 tasks: diagonal EWC against EWC with Kronecker-factored
# Fisher blocks (KFAC), each at the lambda selected on validation data (docs/experiments.md).
#   bash scripts/reproduce_ritter2018.sh select [JOBS]          # seed 0: each arm's lambda grid, chosen on val
#   bash scripts/reproduce_ritter2018.sh final [SEEDS] [JOBS]   # seeds 0.. at the preset's lambdas, and fine-tuning
# Arms: ewc (diagonal, separate), online_ewc (diagonal, online, gamma 1: Ritter et al.'s diagonal Laplace) and
# kfac (online_ewc with method.fisher_structure=kfac: one merged pair per layer at the latest anchor, their
# online Kronecker-factored Laplace). Results: multirun/ritter2018/{select,final}/<arm>/..., summarised at the end.
# Each job runs on one thread (OMP_NUM_THREADS=1): two jobs on two cores do not wait on each other. A run takes
# 8-15 minutes on one core; `select` is 12 runs, `final` 4 arms x SEEDS.
set -euo pipefail
STAGE=${1:-select}
PY=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
declare -A ARM=([ewc]="method=ewc" [online_ewc]="method=online_ewc" [kfac]="method=online_ewc method.fisher_structure=kfac")
declare -A GRID=([ewc]="3,10,30,100" [online_ewc]="3,10,30,100" [kfac]="1,3,10,30")
case $STAGE in
  select)
    JOBS=${2:-2}
    for arm in ewc online_ewc kfac; do
      # shellcheck disable=SC2086
      $PY train.py -m hydra/launcher=joblib hydra.launcher.n_jobs="$JOBS" logger=none ${RESUME:+resume=true} \
        experiment=ritter2018_permuted_mnist_50 ${ARM[$arm]} "method.ewc_lambda=${GRID[$arm]}" seed=0 \
        hydra.sweep.dir=multirun/ritter2018/select/$arm
      $PY scripts/summarize.py multirun/ritter2018/select/$arm --select
    done
    ;;
  final)
    SEEDS=${2:-3}
    JOBS=${3:-2}
    ARM[finetune]="method=finetune"
    # one queue of single runs (not a sweep per arm): JOBS of them at a time, none waiting for an arm to finish
    for arm in kfac online_ewc ewc finetune; do  # the preset's lambdas: those the selection chose
      for ((seed = 0; seed < SEEDS; seed++)); do
        echo "${ARM[$arm]} seed=$seed hydra.run.dir=multirun/ritter2018/final/$arm/seed$seed"
      done
    done | xargs -P "$JOBS" -I{} sh -c "$PY train.py logger=none ${RESUME:+resume=true} \
      experiment=ritter2018_permuted_mnist_50 {} > /dev/null"
    $PY scripts/summarize.py multirun/ritter2018/final --curves \
      --reference "90=Ritter et al. (2018): over 90 % after 50 tasks"
    ;;
  *) echo "usage: $0 select [JOBS] | final [SEEDS] [JOBS]" >&2; exit 2 ;;
esac
