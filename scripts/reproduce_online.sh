#!/usr/bin/env bash
# Published online / task-free / continual-evaluation comparisons on MNIST (docs/experiments.md, "Online and
# task-free"), each with the protocol of ../shared/reference/continual_eval.md; nothing here was tuned on test.
#   bash scripts/reproduce_online.sh [SEEDS] [JOBS]       # default: 3 seeds, 2 parallel jobs (OMP_NUM_THREADS=1)
#   PARTS="gdumb" bash scripts/reproduce_online.sh      # one part: gdumb | blurry | gap
# Results: multirun/online/<part>/<run>/..., then `python scripts/summarize.py multirun/online/<part>`.
#
# * gdumb: GDumb (Prabhu et al. 2020) on class-incremental split MNIST, k = 500, MLP-400 and MLP-100 with
#   batch normalisation, 128 passes (their Tables 3 and 4: 91.9 +- 0.5 and 90.2 +- 0.4). The stream is task-free
#   (boundaries=hidden); GDumb trains on its memory at each task end and the last row is the comparable number.
# * blurry: Rainbow Memory's Blurry10-Online MNIST (Bang et al. 2021: EWC 90.98 +- 0.61, GDumb 88.51 +- 0.52):
#   a tenth of each task spread into the others, one pass in batches of 16, memory 500. Their EWC replays its
#   memory (every method of their code does): here method=ewc replay=reservoir, SGD lr 0.05 (their rate, without
#   the cosine decay), EWC's default strength; their 5 epochs on the memory after the stream are not done.
# * gap: De Lange et al.'s split MNIST (ICLR 2023): class-incremental, MLP 400-400, SGD momentum 0.9, batch 256,
#   10 epochs a task, evaluated after every step on 1,000 test samples a task (fixed subsets). ER: memory 2,000
#   (class-balanced, filled at task ends), loss 0.3 new + 0.7 replayed = lr 0.01 x 0.3 with replay_weight 7/3.
#   The reference gives no split-MNIST protocol for EWC: it runs with the same training and its default strength.
set -euo pipefail
SEEDS=${1:-3}
JOBS=${2:-2}
PARTS=${PARTS:-"gdumb blurry gap"}
PY=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
FAILED=()
run() {  # one setting's seeds; a failed sweep is reported at the end, the others still run
  local part=$1 name=$2; shift 2
  $PY train.py -m hydra/launcher=joblib hydra.launcher.n_jobs="$JOBS" logger=none ${RESUME:+resume=true} \
    "seed=range(0,$SEEDS)" hydra.sweep.dir=multirun/online/$part/$name "$@" || FAILED+=("$part/$name")
}
CLASS=(dataset=split_mnist dataset.scenario=class class_outputs=all)
for part in $PARTS; do
  case $part in
    gdumb)
      for width in 400 100; do
        run gdumb mlp$width "${CLASS[@]}" boundaries=hidden method=gdumb method.buffer_size=500 model.norm=batch \
          "model.hidden_sizes=[$width,$width]"
      done ;;
    blurry)
      BLURRY=("${CLASS[@]}" dataset.boundary=blurry dataset.blur=0.1 dataset.online=true dataset.batch_size=16)
      run blurry gdumb "${BLURRY[@]}" boundaries=hidden method=gdumb method.buffer_size=500 model.norm=batch
      run blurry ewc "${BLURRY[@]}" method=ewc replay=reservoir replay.buffer_size=500 optimizer=sgd optimizer.lr=0.05
      run blurry finetune "${BLURRY[@]}" method=finetune optimizer=sgd optimizer.lr=0.05 ;;
    gap)
      GAP=(dataset=split_mnist dataset.scenario=class epochs_per_task=10 dataset.batch_size=256 optimizer=sgd
           optimizer.momentum=0.9 eval_every=1 eval_subset=1000)
      run gap er "${GAP[@]}" method=er method.buffer_size=2000 method.policy=class_balanced \
        method.replay_weight=2.3333333 optimizer.lr=0.003
      run gap ewc "${GAP[@]}" method=ewc optimizer.lr=0.01 ;;
    *) echo "unknown part $part (gdumb, blurry, gap)" >&2; exit 2 ;;
  esac
done
if [ ${#FAILED[@]} -gt 0 ]; then echo "failed: ${FAILED[*]}" >&2; exit 1; fi
