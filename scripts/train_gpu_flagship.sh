#!/usr/bin/env bash
# GPU flagship recipe (issue 10 / DESIGN section 8): the CPU default's recipe (scripts/train_cpu_default.sh) at
# ResNet-18 scale on one H100/H200: a SimCLR teacher (NT-Xent T = 0.2), then label-free PGD adversarial training
# (pseudo_at) on k-means clusters of the teacher's embedding, EMA weights served; BASELINES=1 adds the labelled
# references on the same encoder (supervised PGD-AT, cross-entropy). Same code as the CPU default; only sizes
# change. NOT YET RUN on a GPU: no session that wrote it was lent one, so the epochs are sized from CPU throughput
# ratios (DESIGN: <= 9 minutes of training in one 15-minute lease) and must be re-tuned on the validation split.
# Every call runs one stage for at most MAX_MINUTES (the device tool allows 10 minutes per command), then stops
# cleanly and exits 0; rerun it until it prints "all done": a stage resumes from RUNS/<stage>/checkpoint.pt. Export and
# calibration need no GPU (`satml export --checkpoint RUNS/robust/checkpoint.pt ...` here, as the CPU script does).
# Env: DATA, RUNS, MAX_MINUTES, DEVICE (cuda), ARCH (resnet18), WIDTH (64), BATCH (512), TEACHER_EPOCHS (30),
# ROBUST_EPOCHS (15), CLUSTERS (100), ATTACK_STEPS (5), BASELINES, BASELINE_EPOCHS (15), TRAIN_ARGS (appended to
# every `satml train`; later flags win: tests/scripts/test_train_gpu_flagship.py runs it tiny on the CPU).
set -euo pipefail
command -v satml > /dev/null || { [ -x .venv/bin/satml ] && export PATH="$PWD/.venv/bin:$PATH"; }
DATA=${DATA:-data}
RUNS=${RUNS:-runs/gpu}
MAX_MINUTES=${MAX_MINUTES:-8}
BATCH=${BATCH:-512}
read -r -a EXTRA <<< "${TRAIN_ARGS:-}"
COMMON=(--data "$DATA" --arch "${ARCH:-resnet18}" --width "${WIDTH:-64}" --device "${DEVICE:-cuda}"
        --batch-size "$BATCH" --precision bf16 --memory-format channels_last --eval-every 5
        --max-minutes "$MAX_MINUTES" --checkpoint-minutes 2 --no-progress)
# PGD at 8/255 with step 2.5 * eps / steps (at most eps), EMA weights, as the CPU default (which uses 3 steps)
STEPS=${ATTACK_STEPS:-5}
ADV=(--eps 0.0313725 --attack-steps "$STEPS" --alpha "$(python3 -c "print(min(1, 2.5 / $STEPS) * 0.0313725)")"
     --ema-decay 0.998 --eval-robust 1000)

finished() { [ -f "$1/metrics.jsonl" ] && grep -q '"final": true' "$1/metrics.jsonl"; }

finished "$RUNS/teacher" || { satml train --method ssl --run-dir "$RUNS/teacher" --epochs "${TEACHER_EPOCHS:-30}" \
  --lr 0.1 --temperature 0.2 --warmup-epochs 0.5 "${COMMON[@]}" "${EXTRA[@]}"; exit 0; }
finished "$RUNS/robust" || { satml train --method pseudo_at --run-dir "$RUNS/robust" \
  --epochs "${ROBUST_EPOCHS:-15}" --clusters "${CLUSTERS:-100}" --teacher "$RUNS/teacher/checkpoint.pt" \
  --init "$RUNS/teacher/checkpoint.pt" --lr 0.1 --warmup-epochs 0.5 "${ADV[@]}" "${COMMON[@]}" "${EXTRA[@]}"
  exit 0; }
if [ -n "${BASELINES:-}" ]; then
  finished "$RUNS/pgd_at" || { satml train --method pgd_at --run-dir "$RUNS/pgd_at" \
    --epochs "${BASELINE_EPOCHS:-15}" --lr 0.1 --warmup-epochs 0.5 "${ADV[@]}" "${COMMON[@]}" "${EXTRA[@]}"
    exit 0; }
  finished "$RUNS/supervised" || { satml train --method supervised --run-dir "$RUNS/supervised" \
    --epochs "${BASELINE_EPOCHS:-15}" --lr 0.1 --warmup-epochs 0.5 --ema-decay 0.998 "${COMMON[@]}" "${EXTRA[@]}"
    exit 0; }
fi
echo "all done"
