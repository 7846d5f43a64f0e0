#!/usr/bin/env bash
# Issue 10's run r26 (pre-set in benchmarks/results/recipes.md): r19's recipe (w32 widened from the committed r17
# teacher, artifacts/ssl; 100 hard clusters; 40 pseudo_at epochs, EMA) with the N-FGSM adversary instead of PGD-3
# (one forward-backward per image for the attack instead of three) and the catastrophic-overfitting guard at 0.05.
# From the repository root after `make install-dev data`:
#   checkpoints/r26/run.sh            train (resumable: rerun after a stop). The tenth session screened it to epoch 7,
#                                     the eleventh trained the 40 epochs (float32, AVX2 CPU); the twelfth gated it
#   STAGE=2 checkpoints/r26/run.sh    export + calibrate, then the headline-only validation gate at 1,000 attacked
#                                     images beside the shipped default (the default's side cached in runs/val1000_cache)
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x .venv/bin/satml ] && export PATH="$PWD/.venv/bin:$PATH"
export OMP_WAIT_POLICY=PASSIVE
case "${STAGE:-1}" in
1) RUNS=runs/r26 ART=runs/r26/art TEACHER=artifacts/ssl TRAIN_ATTACK=nfgsm CO_GUARD=0.05 NO_EXPORT=1 \
     scripts/train_cpu_default.sh ;;
2) scripts/gate_candidate.sh runs/r26 \
     "Robust self-supervised cnn8 width 32 + k-NN (k=75), CPU-trained: the r17 SimCLR teacher (artifacts/ssl), then label-free PGD-AT (N-FGSM at 8/255, EMA) on 100 k-means clusters of the teacher's embedding, 40 ep; served embedding: 48-d PCA of the bank baked into the encoder; no labels in encoder training" ;;
*) echo "STAGE must be 1 or 2" >&2; exit 2 ;;
esac
