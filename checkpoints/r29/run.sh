#!/usr/bin/env bash
# Issue 10's run r29 (pre-set in benchmarks/results/recipes.md, seventeenth session, before any r29 figure and before
# r28's gate): r28's recipe (the r17 teacher, artifacts/ssl, widened to w40; 40 pseudo_at epochs with N-FGSM, EMA;
# the teacher's soft cluster assignment at T = 0.02 as targets) with adversarial weight perturbation (AWP, gamma 0.01,
# Wu et al.'s PGD-AT setting; one more forward-backward per step): the robust generalisation soft targets cost r23.
# From the repository root after `make install-dev data`:
#   checkpoints/r29/run.sh            train (resumable: rerun after a stop; its checkpoint stays in runs/r29/robust)
#   STAGE=2 checkpoints/r29/run.sh    export + calibrate, then the headline-only validation gate at 1,000 attacked
#                                     images (beside the shipped default unless GATE_BESIDE= is set)
#   checkpoints/r29/chain.sh          both, then the pre-set verdicts (and the test suite if the gate passes)
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x .venv/bin/satml ] && export PATH="$PWD/.venv/bin:$PATH"
export OMP_WAIT_POLICY=PASSIVE
case "${STAGE:-1}" in
1) RUNS=runs/r29 ART=runs/r29/art TEACHER=artifacts/ssl WIDTH=40 TRAIN_ATTACK=nfgsm CO_GUARD=0.05 SOFT_TARGETS=0.02 \
     AWP_GAMMA=0.01 NO_EXPORT=1 scripts/train_cpu_default.sh ;;
2) scripts/gate_candidate.sh runs/r29 \
     "Robust self-supervised cnn8 width 40 + k-NN (k=75), CPU-trained: the r17 SimCLR teacher (artifacts/ssl) widened, then label-free PGD-AT (N-FGSM at 8/255, EMA, AWP gamma 0.01) on the teacher's soft assignment (T=0.02) to 100 k-means clusters of its embedding, 40 ep; served embedding: 48-d PCA of the bank baked into the encoder; no labels in encoder training" ;;
*) echo "STAGE must be 1 or 2" >&2; exit 2 ;;
esac
