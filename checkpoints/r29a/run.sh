#!/usr/bin/env bash
# r29a (benchmarks/results/recipes.md, "Adversarial rows in the bank", twenty-first session): r29's exported artifact,
# untouched but for its bank: `satml harden-bank` appends the embeddings of the bank images whose vote PGD-5 (T = 0.1
# whole-bank surrogate, 8/255) flipped, labelled with their own labels (the first 27,000 in bank order: the 15 MB
# limit), re-measures the manifest's metrics and
# recalibrates. Nothing trains: stage 1 puts r29's artifact (committed at d0ffc72) into runs/r29/art/default from git
# history and hardens a copy into runs/r29a/art/default; stage 2 runs the same validation gate as r29's.
#   checkpoints/r29a/run.sh            restore r29's artifact, harden its bank (a no-op once there)
#   STAGE=2 checkpoints/r29a/run.sh    the headline-only validation gate on the hardened artifact
#   checkpoints/r29a/chain.sh          both, then the pre-set verdicts (and the test suite if the gate passes)
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x .venv/bin/satml ] && export PATH="$PWD/.venv/bin:$PATH"
export OMP_WAIT_POLICY=PASSIVE
case "${STAGE:-1}" in
1) A=runs/r29/art/default
   scripts/candidate_state.sh from-git d0ffc72 checkpoints/r29/state/art/default "$A"
   [ -f runs/r29a/art/default/calibration.safetensors ] || {
     rm -rf runs/r29a/art/default
     mkdir -p runs/r29a/art
     satml harden-bank "$A" --out runs/r29a/art/default --data data --max-rows 27000 --no-progress
   } ;;
2) scripts/gate_candidate.sh runs/r29a "(hardened copy of r29's artifact: the gate attacks it as it is)" ;;
*) echo "STAGE must be 1 or 2" >&2; exit 2 ;;
esac
