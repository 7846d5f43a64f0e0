#!/usr/bin/env bash
# The CPU recipe behind artifacts/default (SAT) and artifacts/supervised, on ../shared/data/cifar10
# materialised into data/ (`make data`). Every step is resumable: rerun the script after an interruption.
set -euo pipefail
RUNS=${RUNS:-runs/cpu}
COMMON=(--data data --arch resnet10 --width 16 --batch-size 256 --workers-threads 2 --eval-every 5)
satml train --method ssl --run-dir "$RUNS/ssl" --epochs 15 --lr 0.06 "${COMMON[@]}"
satml train --method sat --run-dir "$RUNS/sat" --epochs 6 --lr 0.03 --warmup-epochs 0.2 \
  --init "$RUNS/ssl/checkpoint.pt" --attack guided --attack-steps 5 --eps 0.0313725 --alpha 0.0078431 \
  --keep all --clean-weight 1.0 --adv-weight 1.0 "${COMMON[@]}"
satml train --method supervised --run-dir "$RUNS/supervised" --epochs 12 --lr 0.1 "${COMMON[@]}"
