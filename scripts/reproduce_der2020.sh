#!/usr/bin/env bash
# Buzzega et al. (2020) MNIST table: Seq-MNIST (class scenario) and P-MNIST (domain scenario, 20 tasks), with
# each method's best hyperparameters from the official code (chosen there on validation data; see
# ../shared/reference/der2020.md and docs/experiments.md). Nothing here was tuned on test data.
#   bash scripts/reproduce_der2020.sh [SEEDS] [JOBS]        # default: 10 seeds, 2 parallel jobs
#   FIRST_SEED=5 bash scripts/reproduce_der2020.sh 10       # seeds 5..9 only: extends a finished 5-seed run
#   BENCHES="seq_mnist" BUFFERS="200 500" bash scripts/reproduce_der2020.sh 10
# Results: multirun/der2020/<bench>/<method>_<buffer>/..., then `python scripts/summarize.py multirun/der2020`.
#
# Conventions that differ from the official code, and how its settings are translated:
# * ER: the official ER is a reservoir over the stream, replayed every step, one cross-entropy over the
#   concatenated stream and replay batches. That is DER++ with alpha=0, beta=1 (method=derpp) at half the
#   learning rate: with equal batch sizes B = M, CE(concat) = (CE_stream + CE_replay) / 2, and plain SGD's step
#   only sees lr * loss. (method=er fills its memory at task ends instead.)
# * oEWC: the official penalty is lambda * sum F (theta - theta*)^2; ours is lambda/2 * ...: lambda doubled. Its
#   Fisher weights each sample's squared gradient by p(y|x) (method.fisher_type=weighted); with our default
#   (empirical) Fisher, lambda 180 at lr 0.03 diverged (NaN loss) on Seq-MNIST seed 7.
# * Seq-MNIST trains all 10 outputs from the first task (class_outputs=all, set by the preset), as the official
#   code does.
# Run again over existing results: RESUME=1 finishes what is missing and skips finished runs (a new run
# is refused in a folder that holds results).
set -euo pipefail
SEEDS=${1:-10}
JOBS=${2:-2}
FIRST_SEED=${FIRST_SEED:-0}
BENCHES=${BENCHES:-"seq_mnist perm_mnist"}
BUFFERS=${BUFFERS:-"200 500"}
PY=${PYTHON:-python}
FAILED=()
run() {  # one method's seeds; a failed sweep (e.g. a NaN loss) is reported at the end, the others still run
  local bench=$1 name=$2; shift 2
  $PY train.py -m hydra/launcher=joblib hydra.launcher.n_jobs="$JOBS" logger=none ${RESUME:+resume=true} "seed=range($FIRST_SEED,$SEEDS)" \
    experiment=der2020_$bench hydra.sweep.dir=multirun/der2020/$bench/$name "$@" || FAILED+=("$bench/$name")
}
for bench in $BENCHES; do
  if [ "$bench" = seq_mnist ]; then
    run $bench sgd method=finetune optimizer.lr=0.03
    run $bench oewc method=online_ewc method.ewc_lambda=180 method.decay=1.0 method.fisher_type=weighted optimizer.lr=0.03
    run $bench si method=si method.si_c=1.0 method.xi=0.9 optimizer.lr=0.1
    run $bench joint method=joint optimizer.lr=0.03
    for b in $BUFFERS; do
      case $b in
        200) er_lr=0.005 der="method.alpha=0.2 method.replay_batch_size=10"
             derpp="method.alpha=0.2 method.beta=1.0 method.replay_batch_size=128" ;;
        500) er_lr=0.05 der="method.alpha=1.0 method.replay_batch_size=128"
             derpp="method.alpha=1.0 method.beta=0.5 method.replay_batch_size=10" ;;
        5120) er_lr=0.05 der="method.alpha=0.5 method.replay_batch_size=128 optimizer.lr=0.1"
              derpp="method.alpha=0.2 method.beta=0.5 method.replay_batch_size=64 optimizer.lr=0.1" ;;
      esac
      run $bench er_$b method=derpp method.alpha=0 method.beta=1.0 method.buffer_size=$b method.replay_batch_size=10 \
        optimizer.lr=$er_lr
      run $bench agem_$b method=agem method.buffer_size=$b method.replay_batch_size=128 optimizer.lr=0.1
      run $bench icarl_$b method=icarl method.buffer_size=$b optimizer.lr=0.1
      # shellcheck disable=SC2086
      run $bench der_$b method=der method.buffer_size=$b $der
      # shellcheck disable=SC2086
      run $bench derpp_$b method=derpp method.buffer_size=$b $derpp
    done
  else
    run $bench sgd method=finetune optimizer.lr=0.2
    run $bench oewc method=online_ewc method.ewc_lambda=1.4 method.decay=1.0 method.fisher_type=weighted optimizer.lr=0.1
    # their lambda gives 17 points less than their table (docs/experiments.md); 14 was selected on validation data (10 % of
    # each task held out, seeds 0-2, of 1.4 / 4.2 / 14 / 42: see docs/experiments.md's P-MNIST section)
    run $bench oewc_selected method=online_ewc method.ewc_lambda=14 method.decay=1.0 method.fisher_type=weighted \
      optimizer.lr=0.1
    run $bench si method=si method.si_c=0.5 method.xi=1.0 optimizer.lr=0.1
    # joint (cumulative: task t trains on tasks 1..t, 210 task-epochs) takes ~10x a run: JOINT=1 to include it
    if [ "${JOINT:-0}" = 1 ]; then run $bench joint method=joint optimizer.lr=0.2; fi
    for b in $BUFFERS; do
      case $b in
        200) der="method.alpha=1.0" derpp="method.alpha=1.0 method.beta=1.0 optimizer.lr=0.1" ;;
        500) der="method.alpha=1.0" derpp="method.alpha=1.0 method.beta=0.5 optimizer.lr=0.2" ;;
        5120) der="method.alpha=0.5" derpp="method.alpha=0.5 method.beta=1.0 optimizer.lr=0.2" ;;
      esac
      run $bench er_$b method=derpp method.alpha=0 method.beta=1.0 method.buffer_size=$b method.replay_batch_size=128 \
        optimizer.lr=0.1
      run $bench agem_$b method=agem method.buffer_size=$b method.replay_batch_size=128 optimizer.lr=0.1
      # shellcheck disable=SC2086
      run $bench der_$b method=der method.buffer_size=$b method.replay_batch_size=128 optimizer.lr=0.2 $der
      # shellcheck disable=SC2086
      run $bench derpp_$b method=derpp method.buffer_size=$b method.replay_batch_size=128 $derpp
    done
  fi
done
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "failed: ${FAILED[*]} (see each run's train.log under multirun/der2020)" >&2
  exit 1
fi
