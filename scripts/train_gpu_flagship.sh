#!/usr/bin/env bash
# GPU flagship recipe (issue 6): ResNet-18 (width 64) SSL pre-training, then SAT, plus the baselines,
# on one H100/H200. NOT YET RUN: no GPU was available to the session that wrote it; the epochs are
# sized from CPU throughput ratios and must be re-tuned on the validation split (never the test set).
# Every call stops cleanly after MAX_MINUTES (the device tool allows 10 minutes per command) and
# resumes from run_dir/checkpoint.pt when run again: rerun the script until it prints "all done".
set -euo pipefail
DATA=${DATA:-/root/data}
RUNS=${RUNS:-runs/gpu}
MAX_MINUTES=${MAX_MINUTES:-8}
COMMON=(--data "$DATA" --arch resnet18 --width 64 --device cuda --eval-every 10 --max-minutes "$MAX_MINUTES"
        --checkpoint-minutes 2)

finished() { [ -f "$1/metrics.jsonl" ] && grep -q '"final": true' "$1/metrics.jsonl"; }

finished "$RUNS/ssl" || { satml train --method ssl --run-dir "$RUNS/ssl" --epochs 100 --batch-size 512 --lr 0.06 \
  "${COMMON[@]}"; exit 0; }
finished "$RUNS/sat" || { satml train --method sat --run-dir "$RUNS/sat" --init "$RUNS/ssl/checkpoint.pt" \
  --epochs 15 --batch-size 512 --lr 0.03 --warmup-epochs 0.5 --attack guided --attack-steps 5 \
  --eps 0.0313725 --alpha 0.0078431 --keep all --clean-weight 1.0 --adv-weight 1.0 "${COMMON[@]}"; exit 0; }
finished "$RUNS/supervised" || { satml train --method supervised --run-dir "$RUNS/supervised" --epochs 30 \
  --batch-size 512 --lr 0.1 "${COMMON[@]}"; exit 0; }
finished "$RUNS/pgd_at" || { satml train --method pgd_at --run-dir "$RUNS/pgd_at" --epochs 30 --batch-size 512 \
  --lr 0.1 --attack-steps 10 --eps 0.0313725 --alpha 0.0078431 "${COMMON[@]}"; exit 0; }
echo "all done"
