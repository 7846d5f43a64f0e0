#!/usr/bin/env bash
# GPU flagship recipe (issue 11): ResNet-18 (width 64) SimCLR teacher, then the CPU default's robust stage
# (DeACL-style distillation: match the frozen teacher's clean embedding + beta * 1 - cos(s(x'), s(x)) with
# PGD at 8/255, EMA weights), plus the baselines, on one H100/H200. The same code as scripts/train_cpu_default.sh;
# only sizes change. NOT YET RUN: no GPU was available to the session that wrote it; the epochs are
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
finished "$RUNS/student" || { satml train --method distill --run-dir "$RUNS/student" \
  --teacher "$RUNS/ssl/checkpoint.pt" --init "$RUNS/ssl/checkpoint.pt" --epochs 30 --batch-size 512 --lr 0.05 \
  --warmup-epochs 0.5 --attack-steps 5 --eps 0.0313725 --alpha 0.0078431 --adv-weight 2.0 --ema-decay 0.998 \
  --eval-robust 1000 "${COMMON[@]}"; exit 0; }
finished "$RUNS/supervised" || { satml train --method supervised --run-dir "$RUNS/supervised" --epochs 30 \
  --batch-size 512 --lr 0.1 "${COMMON[@]}"; exit 0; }
finished "$RUNS/pgd_at" || { satml train --method pgd_at --run-dir "$RUNS/pgd_at" --epochs 30 --batch-size 512 \
  --lr 0.1 --attack-steps 10 --eps 0.0313725 --alpha 0.0078431 "${COMMON[@]}"; exit 0; }
echo "all done"
