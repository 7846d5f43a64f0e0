#!/usr/bin/env bash
# r31's second route (benchmarks/results/recipes.md, "TRADES-AWP after r29", amended 20:46 UTC before any robust
# figure of r31): when its gate fails the goal's clean threshold, its validation gate against the shipped r19's
# (28.9 % worst case, 66.8 % clean: robustness_default_val1000_headline.md) + 1.0 / + 0.5; on a pass, the full test
# suite (resumes from its cache) and the both-axes rule against r19 (clean (10,000) >= 67.0 %, worst case >= 31.4 %).
# The same chain as checkpoints/r31/chain.sh with these rules (its training and gate are done, so skipped).
#   nice -n 5 bash checkpoints/r31/route2.sh          after checkpoints/r31/chain.sh has run the gate
set -euo pipefail
cd "$(dirname "$0")/../.."
exec scripts/candidate_chain.sh checkpoints/r31/run.sh runs/r31 worst=0.299,clean=0.673 clean=0.670,worst=0.314
