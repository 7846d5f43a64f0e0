#!/usr/bin/env bash
# The CPU recipe behind artifacts/default (SAT) and artifacts/supervised, on ../shared/data/cifar10
# materialised into data/ (`make data`). Every step is resumable: rerun the script after an interruption.
# Sized for ~1.5 h on a shared 2-core machine; more epochs help (see the model cards).
set -euo pipefail
RUNS=${RUNS:-runs/cpu}
COMMON=(--data data --arch resnet10 --width 16 --batch-size 256 --workers-threads 2 --eval-every 5)
done_() { [ -f "$1/metrics.jsonl" ] && grep -q '"final": true' "$1/metrics.jsonl"; }
done_ "$RUNS/ssl" || satml train --method ssl --run-dir "$RUNS/ssl" --epochs 10 --lr 0.06 "${COMMON[@]}"
satml train --method sat --run-dir "$RUNS/sat" --epochs 6 --lr 0.03 --warmup-epochs 0.2 \
  --init "$RUNS/ssl/checkpoint.pt" --attack guided --attack-steps 5 --eps 0.0313725 --alpha 0.0078431 \
  --keep all --clean-weight 1.0 --adv-weight 1.0 --eval-every 1 "${COMMON[@]:0:10}"
satml train --method supervised --run-dir "$RUNS/supervised" --epochs 8 --lr 0.1 "${COMMON[@]}"
