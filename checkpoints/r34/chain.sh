#!/usr/bin/env bash
# r34 (beta 3) from r29's checkpoint to its pre-set verdicts (benchmarks/results/recipes.md, twenty-third session): gate
# on the 1,000 validation images worst case >= 29.6 % and clean >= 68.6 %; ship rules on the full test suite, either the
# issue's goal (exact >= 70 %, worst case >= 30 %, clean (10,000) >= 66.5 %) or better than r19 on both axes (clean
# (10,000) >= 67.0 %, worst case >= 31.4 %). Ships nothing (scripts/ship_candidate.sh does, on a pass).
#   GATE_BESIDE= nice -n 5 bash checkpoints/r34/chain.sh
# At a session's end: scripts/candidate_state.sh save runs/r34 checkpoints/r34/state (and commit it).
set -euo pipefail
cd "$(dirname "$0")/../.."
exec scripts/candidate_chain.sh checkpoints/r34/run.sh runs/r34 worst=0.296,clean=0.686 \
  exact=0.70,worst=0.30,clean=0.665 clean=0.670,worst=0.314
