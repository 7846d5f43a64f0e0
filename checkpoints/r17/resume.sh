#!/usr/bin/env bash
# Resume issue 10's run r17 (a session ended mid-run): a 100-epoch SimCLR teacher (cnn8 width 16, T = 0.2) in bf16 +
# channels_last, then the shipped robust recipe from it (pseudo_at 40 epochs), export to runs/r17/art (never over
# artifacts/), calibration and the full suite with the supervised transfer source. This folder holds the teacher's
# checkpoint as the session left it; the run continues from it in runs/r17/teacher. From the repository root after
# `make install-dev data`. Ship only under the pre-set rule: full-suite worst case >= 26.4 % and clean >= 61.0 % (r15,
# the default since 2026-12-05), one strictly better; then copy runs/r17/art/{default,ssl} to artifacts/.
set -euo pipefail
mkdir -p runs/r17/teacher
[ -f runs/r17/teacher/checkpoint.pt ] || cp checkpoints/r17/checkpoint.pt checkpoints/r17/config.json \
  checkpoints/r17/metrics.jsonl runs/r17/teacher/
RUNS=runs/r17 ART=runs/r17/art TEACHER_EPOCHS=100 TRAIN_ARGS="--precision bf16" \
  SUITE_ARGS="--transfer-source artifacts/supervised --out runs/r17/suite" scripts/train_cpu_default.sh
