#!/usr/bin/env bash
# r28 from where it stands to its pre-set verdicts (benchmarks/results/recipes.md, fourteenth session): gate on the
# 1,000 validation images worst case >= 28.4 % and clean >= 67.8 % (r19's gate figures 28.9 / 66.8: -0.5 / +1.0);
# ship rule on the full test suite: the issue's goal, exact >= 70 % and worst case >= 30 %, with clean (10,000)
# >= 66.5 % (r19's); it then replaces the default only where the default does not meet the goal. Ships nothing.
# FINISHED (seventeenth session): the gate failed (validation worst case <= 28.2 %; benchmarks/results/recipes.md); its
# committed state left the tree (git show 13ff6c7:checkpoints/r28/state/robust/checkpoint.pt restores it).
# On a machine without runs/r28, the state committed at a session's end (checkpoints/r28/state/, written by
# `scripts/candidate_state.sh save runs/r28 checkpoints/r28/state`: the mid-training checkpoint with its cluster
# record, or later the exported artifact and the gate's and suite's per-attack results) is where scripts/candidate_chain.sh
# resumes.
# A resumed training recomputes the teacher's clusters (seeded) and refuses to go on unless they agree with the
# recorded ones on >= 99.9 % of the images (training.pseudo_labels.check_or_record; first start: purity 0.561, top
# share 0.720).
#   nice -n 5 bash checkpoints/r28/chain.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
exec scripts/candidate_chain.sh checkpoints/r28/run.sh runs/r28 worst=0.284,clean=0.678 \
  exact=0.70,worst=0.30,clean=0.665
