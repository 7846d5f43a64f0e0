#!/usr/bin/env bash
# Issue 10's run r32 (pre-set in benchmarks/results/recipes.md, "A smaller TRADES-AWP dose", twenty-first session, before
# any r32 figure): r29's final EMA weights + 6 epochs of TRADES-AWP at beta 2. scripts/trades_finish_candidate.sh says
# what it trains.
#   checkpoints/r32/run.sh            restore r29's checkpoint, train (resumable: rerun after a stop)
#   STAGE=2 checkpoints/r32/run.sh    export + calibrate, then the headline-only validation gate (1,000 images)
#   checkpoints/r32/chain.sh          both, then the pre-set verdicts (and the test suite if the gate passes)
set -euo pipefail
cd "$(dirname "$0")/../.."
exec scripts/trades_finish_candidate.sh runs/r32 2
