#!/usr/bin/env bash
# Issue 10's run r27 (pre-set in benchmarks/results/recipes.md, twelfth session): the time N-FGSM frees spent on
# width. r24's student (w40, widened from the committed r17 teacher, artifacts/ssl; 100 hard clusters; 40 pseudo_at
# epochs, EMA) trained with r26's adversary (N-FGSM, catastrophic-overfitting guard 0.05): ~1.56x the cost per
# image of w32 and ~0.6x the attack's cost, so about r19's robust-stage time (on an AVX2-only CPU in float32 ~4.7 h;
# on a bf16 CPU ~70 min). From the repository root after `make install-dev data`:
#   checkpoints/r27/run.sh            train (resumable: rerun after a stop; its checkpoint stays in runs/r27/robust)
#   STAGE=2 checkpoints/r27/run.sh    export + calibrate, then the headline-only validation gate at 1,000 attacked
#                                     images beside the shipped default (the default's side cached in runs/val1000_cache)
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x .venv/bin/satml ] && export PATH="$PWD/.venv/bin:$PATH"
export OMP_WAIT_POLICY=PASSIVE
case "${STAGE:-1}" in
1) RUNS=runs/r27 ART=runs/r27/art TEACHER=artifacts/ssl WIDTH=40 TRAIN_ATTACK=nfgsm CO_GUARD=0.05 NO_EXPORT=1 \
     scripts/train_cpu_default.sh ;;
2) scripts/gate_candidate.sh runs/r27 \
     "Robust self-supervised cnn8 width 40 + k-NN (k=75), CPU-trained: the r17 SimCLR teacher (artifacts/ssl) widened, then label-free PGD-AT (N-FGSM at 8/255, EMA) on 100 k-means clusters of the teacher's embedding, 40 ep; served embedding: 48-d PCA of the bank baked into the encoder; no labels in encoder training" ;;
*) echo "STAGE must be 1 or 2" >&2; exit 2 ;;
esac
