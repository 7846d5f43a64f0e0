#!/usr/bin/env bash
# Issue 10's TRADES-AWP finishing candidates (r31, r32, r33 in benchmarks/results/recipes.md): r29's final EMA weights
# (its checkpoint from git history, d0ffc72) + EPOCHS (default 6) of TRADES-AWP at beta BETA (AWP gamma 0.01, PGD-3 on
# the KL at 8/255) on r29's soft targets (T = 0.02, the r17 teacher's 100 clusters), lr 0.01 cosine, EMA 0.995, bf16 +
# channels_last (precision auto on a bf16 CPU): train_cpu_default.sh's FINISH_TRADES_BETA stage, in a candidate's
# layout (RUN/robust is this stage, as scripts/gate_candidate.sh and scripts/candidate_state.sh expect).
#   scripts/trades_finish_candidate.sh RUN BETA            restore r29's checkpoint, train (resumable: rerun it)
#   STAGE=2 scripts/trades_finish_candidate.sh RUN BETA    export + calibrate, then the validation gate (1,000 images)
# EVAL_ROBUST (default 500; r31 ran with 0): the in-training PGD-10 column's images.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 RUN BETA" >&2; exit 2; }
RUN=${1%/} BETA=$2 EPOCHS=${EPOCHS:-6}
[ -x .venv/bin/satml ] && export PATH="$PWD/.venv/bin:$PATH"
export OMP_WAIT_POLICY=PASSIVE
case "${STAGE:-1}" in
1) I=$RUN/r29_init
   "$(dirname "$0")/candidate_state.sh" from-git d0ffc72 checkpoints/r29/state/robust "$I"
   satml train --method pseudo_at --data data --run-dir "$RUN/robust" --arch cnn8 --width 40 --proj-dim 128 \
     --init "$I/checkpoint.pt" --teacher artifacts/ssl --clusters 100 --soft-targets 0.02 --epochs "$EPOCHS" \
     --lr 0.01 --warmup-epochs 0 --ema-decay 0.995 --eps 0.0313725 --alpha 0.0261438 --attack-steps 3 \
     --trades-beta "$BETA" --awp-gamma 0.01 --eval-every 2 --eval-robust "${EVAL_ROBUST:-500}" \
     --memory-format channels_last --workers-threads 2 --no-progress ;;
2) "$(dirname "$0")/gate_candidate.sh" "$RUN" \
     "Robust self-supervised cnn8 width 40 + k-NN (k=75), CPU-trained: the r17 SimCLR teacher (artifacts/ssl) widened, then label-free PGD-AT (N-FGSM at 8/255, EMA, AWP gamma 0.01) on the teacher's soft assignment (T=0.02) to 100 k-means clusters of its embedding, 40 ep, then $EPOCHS ep of TRADES-AWP (beta $BETA, PGD-3) on the same targets; served embedding: 48-d PCA of the bank baked into the encoder; no labels in encoder training" ;;
*) echo "STAGE must be 1 or 2" >&2; exit 2 ;;
esac
