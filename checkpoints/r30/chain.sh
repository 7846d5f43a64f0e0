#!/usr/bin/env bash
# r30 from where it stands to its pre-set verdicts (benchmarks/results/recipes.md, nineteenth session): gate on the
# 1,000 validation images worst case >= 29.6 % and clean >= 68.6 % (r29's gate figures 28.6 / 69.25: one point more
# worst case, since r29 missed the goal's worst case on test, and at most 0.65 less clean, since r29's 69.25 gave
# 70.1 % on the exact test images); ship rule on the full test suite: the issue's goal, exact >= 70 % and worst case
# >= 30 %, with clean (10,000) >= 66.5 % (r19's). Ships nothing (scripts/ship_candidate.sh does, on a pass).
#   GATE_BESIDE= nice -n 5 bash checkpoints/r30/chain.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
# at a session's end: scripts/candidate_state.sh save runs/r30 checkpoints/r30/state (and commit it); the chain
# restores it
exec scripts/candidate_chain.sh checkpoints/r30/run.sh runs/r30 worst=0.296,clean=0.686 \
  exact=0.70,worst=0.30,clean=0.665
