#!/usr/bin/env bash
# Issue 10's run r31 (pre-set in benchmarks/results/recipes.md, "TRADES-AWP after r29", twenty-first session, before
# any r31 figure): r29's final EMA weights (its checkpoint from git history, d0ffc72) + 6 epochs of TRADES-AWP (beta 6,
# AWP gamma 0.01, PGD-3 on the KL at 8/255) on r29's soft targets (T = 0.02, the r17 teacher's 100 clusters), lr 0.01
# cosine, EMA 0.995, bf16 + channels_last (precision auto on a bf16 CPU).
#   checkpoints/r31/run.sh            restore r29's checkpoint, train (resumable: rerun after a stop)
#   STAGE=2 checkpoints/r31/run.sh    export + calibrate, then the headline-only validation gate (1,000 images)
#   checkpoints/r31/chain.sh          both, then the pre-set verdicts (and the test suite if the gate passes)
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x .venv/bin/satml ] && export PATH="$PWD/.venv/bin:$PATH"
export OMP_WAIT_POLICY=PASSIVE
case "${STAGE:-1}" in
1) I=runs/r31/r29_init
   scripts/candidate_state.sh from-git d0ffc72 checkpoints/r29/state/robust "$I"
   satml train --method pseudo_at --data data --run-dir runs/r31/robust --arch cnn8 --width 40 --proj-dim 128 \
     --init "$I/checkpoint.pt" --teacher artifacts/ssl --clusters 100 --soft-targets 0.02 --epochs 6 --lr 0.01 \
     --warmup-epochs 0 --ema-decay 0.995 --eps 0.0313725 --alpha 0.0261438 --attack-steps 3 --trades-beta 6 \
     --awp-gamma 0.01 --eval-every 2 --memory-format channels_last --workers-threads 2 --no-progress ;;
2) scripts/gate_candidate.sh runs/r31 \
     "Robust self-supervised cnn8 width 40 + k-NN (k=75), CPU-trained: the r17 SimCLR teacher (artifacts/ssl) widened, then label-free PGD-AT (N-FGSM at 8/255, EMA, AWP gamma 0.01) on the teacher's soft assignment (T=0.02) to 100 k-means clusters of its embedding, 40 ep, then 6 ep of TRADES-AWP (beta 6, PGD-3) on the same targets; served embedding: 48-d PCA of the bank baked into the encoder; no labels in encoder training" ;;
*) echo "STAGE must be 1 or 2" >&2; exit 2 ;;
esac
