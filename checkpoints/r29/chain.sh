#!/usr/bin/env bash
# r29 from where it stands to its pre-set verdicts (benchmarks/results/recipes.md, seventeenth session): gate on the
# 1,000 validation images worst case >= 29.4 % and clean >= 67.8 % (r19's gate figures 28.9 / 66.8: +0.5 / +1.0);
# ship rule on the full test suite: the issue's goal, exact >= 70 % and worst case >= 30 %, with clean (10,000)
# >= 66.5 % (r19's). Ships nothing (scripts/ship_candidate.sh does, on a pass).
#   nice -n 5 bash checkpoints/r29/chain.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
# at a session's end: scripts/candidate_state.sh save runs/r29 checkpoints/r29/state (and commit it); the chain
# restores it
exec scripts/candidate_chain.sh checkpoints/r29/run.sh runs/r29 worst=0.294,clean=0.678 \
  exact=0.70,worst=0.30,clean=0.665
