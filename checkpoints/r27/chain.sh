#!/usr/bin/env bash
# r27 from where it stands to its pre-set verdicts (benchmarks/results/recipes.md), unattended and resumable at each
# step (scripts/candidate_chain.sh): the training (runs/r27/robust; skipped once final), the validation gate (STAGE=2
# of run.sh; skipped once its report exists), the gate's rule (worst case >= 29.9 % and clean >= 66.3 % on the 1,000
# validation images), and only if it passes the full test suite and the ship rule (worst case >= 31.9 % and clean
# (10,000) >= 66.0 %, or the goal: exact >= 70 %, worst case >= 30 % and clean >= 66.5 %). It ships nothing.
# On a machine without runs/r27, the committed final weights (checkpoints/r27/checkpoint.pt, EMA only, once they are
# there) stand in for the training. From the repository root:
#   nice -n 5 bash checkpoints/r27/chain.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ ! -f runs/r27/robust/metrics.jsonl ] && [ -f checkpoints/r27/checkpoint.pt ]; then
  mkdir -p runs/r27/robust
  cp checkpoints/r27/checkpoint.pt checkpoints/r27/config.json checkpoints/r27/metrics.jsonl runs/r27/robust/
fi
exec scripts/candidate_chain.sh checkpoints/r27/run.sh runs/r27 worst=0.299,clean=0.663 worst=0.319,clean=0.660 \
  exact=0.70,worst=0.30,clean=0.665
