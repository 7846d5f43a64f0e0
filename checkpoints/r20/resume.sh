#!/usr/bin/env bash
# Resume issue 10's run r20 (sessions end mid-run): a 200-epoch SimCLR teacher (cnn8 width 16, T = 0.2, bf16 +
# channels_last; r17 had 100), then the shipped robust recipe from it (widened to w32, pseudo_at 40 epochs), export to
# runs/r20/art (never over artifacts/; the default's 48-d PCA), calibration and the full suite with the supervised
# transfer source. This folder holds what the sessions left: teacher/ (finished: validation k-NN 70.4 % on the
# 5,000 held-out images; r17's 100-epoch teacher 69.8 %) and robust/ (the student, finished or mid-run). Each is copied
# to runs/r20/ only where that run folder does not have it yet, and train_cpu_default.sh skips finished stages and
# continues a stopped one from its checkpoint. From the repository root after `make install-dev data`.
# Ship only under the pre-set rule (benchmarks/results/recipes.md): one of full-suite worst case and clean (10,000)
# >= 0.5 points better than r19's (31.4 / 66.5 %), the other at most 0.5 worse, worst case >= 30 %; then copy
# runs/r20/art/{default,ssl} to artifacts/.
set -euo pipefail
here=checkpoints/r20
for stage in teacher robust; do
  if [ -d "$here/$stage" ] && [ ! -f "runs/r20/$stage/checkpoint.pt" ]; then
    mkdir -p "runs/r20/$stage" && cp "$here/$stage"/* "runs/r20/$stage/"
  fi
done
RUNS=runs/r20 ART=runs/r20/art TEACHER_EPOCHS=200 \
  SUITE_ARGS="--transfer-source artifacts/supervised --out runs/r20/suite" scripts/train_cpu_default.sh
