#!/usr/bin/env bash
# r33's second route (benchmarks/results/recipes.md, amended 23:41 UTC during its training, before any export or
# gate figure; r31's): when its gate fails the goal's thresholds, its validation gate against the shipped r19's
# (28.9 % worst case, 66.8 % clean) + 1.0 / + 0.5; on a pass, the full test suite (resumes from its cache) and the
# both-axes rule against r19 (clean (10,000) >= 67.0 %, worst case >= 31.4 %).
#   nice -n 5 bash checkpoints/r33/route2.sh          after checkpoints/r33/chain.sh has run the gate
set -euo pipefail
cd "$(dirname "$0")/../.."
exec scripts/candidate_chain.sh checkpoints/r33/run.sh runs/r33 worst=0.299,clean=0.673 clean=0.670,worst=0.314
