#!/usr/bin/env bash
# Issue 10's run r31 (pre-set in benchmarks/results/recipes.md, "TRADES-AWP after r29", twenty-first session, before
# any r31 figure): r29's final EMA weights + 6 epochs of TRADES-AWP at beta 6, without the in-training PGD-10 column
# (EVAL_ROBUST=0). scripts/trades_finish_candidate.sh says what it trains.
#   checkpoints/r31/run.sh            restore r29's checkpoint, train (resumable: rerun after a stop)
#   STAGE=2 checkpoints/r31/run.sh    export + calibrate, then the headline-only validation gate (1,000 images)
#   checkpoints/r31/chain.sh          both, then the pre-set verdicts (and the test suite if the gate passes)
set -euo pipefail
cd "$(dirname "$0")/../.."
EVAL_ROBUST=0 exec scripts/trades_finish_candidate.sh runs/r31 6
