#!/usr/bin/env bash
# r35 (r29 and r31 mixed at t = 0.5) from its mix to its pre-set verdicts (benchmarks/results/recipes.md,
# twenty-third session): gate on the 1,000 validation images worst case >= 29.6 % and clean >= 68.6 %; ship rules on
# the full test suite, either the issue's goal (exact >= 70 %, worst case >= 30 %, clean (10,000) >= 66.5 %) or
# better than r19 on both axes (clean (10,000) >= 67.0 %, worst case >= 31.4 %). Ships nothing
# (scripts/ship_candidate.sh does, on a pass).
#   GATE_BESIDE= nice -n 5 bash checkpoints/r35/chain.sh
# At a session's end: scripts/candidate_state.sh save runs/r35 checkpoints/r35/state (and commit it).
set -euo pipefail
cd "$(dirname "$0")/../.."
exec scripts/candidate_chain.sh checkpoints/r35/run.sh runs/r35 worst=0.296,clean=0.686 \
  exact=0.70,worst=0.30,clean=0.665 clean=0.670,worst=0.314
