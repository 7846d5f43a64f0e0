#!/usr/bin/env bash
# r31's second route (benchmarks/results/recipes.md, "TRADES-AWP after r29", amended 20:46 UTC before any robust
# figure of r31): when its gate fails the goal's clean threshold, its validation gate against the shipped r19's
# (28.9 % worst case, 66.8 % clean: robustness_default_val1000_headline.md) + 1.0 / + 0.5; on a pass, the full test
# suite (resumes from its cache) and the both-axes rule against r19 (clean (10,000) >= 67.0 %, worst case >= 31.4 %).
#   nice -n 5 bash checkpoints/r31/route2.sh          after checkpoints/r31/chain.sh has run the gate
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x .venv/bin/satml ] && export PATH="$PWD/.venv/bin:$PATH"
export OMP_WAIT_POLICY=PASSIVE
[ -d checkpoints/r31/state ] && scripts/candidate_state.sh restore checkpoints/r31/state runs/r31
satml robustness-verdict runs/r31/val_gate/robustness.json --model r31/art/default --rule worst=0.299,clean=0.673 \
  || { echo "r31/art/default: second-route gate failed, no test suite"; exit 0; }
satml robustness runs/r31/art/default --data data --transfer-source artifacts/supervised --out runs/r31/suite \
  --no-progress
satml robustness-verdict runs/r31/suite/robustness.json --model r31/art/default --rule clean=0.670,worst=0.314 \
  || echo "r31/art/default: the both-axes rule against r19 failed, not shipped"
