#!/usr/bin/env bash
# r29k100 (benchmarks/results/recipes.md, "A larger vote for the w40 students", twentieth session): r29's final
# weights, untouched, voting with k = 100 instead of 75 (K* of the pre-set clean rule on the validation split).
# Nothing trains: stage 1 puts r29's final checkpoint (committed at d0ffc72, left the tree at 5434f38) into
# runs/r29k100/robust from git history; stage 2 exports it at k = 100 and runs the same validation gate as r29's.
#   checkpoints/r29k100/run.sh            restore the checkpoint (a no-op once there)
#   STAGE=2 checkpoints/r29k100/run.sh    export at k = 100 + calibrate, then the headline-only validation gate
#   checkpoints/r29k100/chain.sh          both, then the pre-set verdicts (and the test suite if the gate passes)
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x .venv/bin/satml ] && export PATH="$PWD/.venv/bin:$PATH"
export OMP_WAIT_POLICY=PASSIVE
case "${STAGE:-1}" in
1) R=runs/r29k100/robust
   scripts/candidate_state.sh from-git d0ffc72 checkpoints/r29/state/robust "$R" ;;
2) GATE_K=100 scripts/gate_candidate.sh runs/r29k100 \
     "Robust self-supervised cnn8 width 40 + k-NN (k=100), CPU-trained: the r17 SimCLR teacher (artifacts/ssl) widened, then label-free PGD-AT (N-FGSM at 8/255, EMA, AWP gamma 0.01) on the teacher's soft assignment (T=0.02) to 100 k-means clusters of its embedding, 40 ep; served embedding: 48-d PCA of the bank baked into the encoder; no labels in encoder training" ;;
*) echo "STAGE must be 1 or 2" >&2; exit 2 ;;
esac
