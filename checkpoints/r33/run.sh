#!/usr/bin/env bash
# Issue 10's run r33 (pre-set in benchmarks/results/recipes.md, "A smaller TRADES-AWP dose (r32 ...)", twenty-second
# session, before r32's gate figures): r32 with TRADES beta 4. scripts/trades_finish_candidate.sh says what it trains.
#   checkpoints/r33/run.sh            restore r29's checkpoint, train (resumable: rerun after a stop)
#   STAGE=2 checkpoints/r33/run.sh    export + calibrate, then the headline-only validation gate (1,000 images)
#   checkpoints/r33/chain.sh          both, then the pre-set verdicts (and the test suite if the gate passes)
set -euo pipefail
cd "$(dirname "$0")/../.."
exec scripts/trades_finish_candidate.sh runs/r33 4
