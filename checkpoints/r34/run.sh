#!/usr/bin/env bash
# Issue 10's run r34 (pre-set in benchmarks/results/recipes.md, "TRADES-AWP at beta 3 after r29 (r34 ...)",
# twenty-third session, before any of its figures): r32 / r33 with TRADES beta 3. scripts/trades_finish_candidate.sh
# says what it trains.
#   checkpoints/r34/run.sh            restore r29's checkpoint, train (resumable: rerun after a stop)
#   STAGE=2 checkpoints/r34/run.sh    export + calibrate, then the validation gate (1,000 images)
#   checkpoints/r34/chain.sh          both, then the pre-set verdicts (and the test suite if the gate passes)
set -euo pipefail
cd "$(dirname "$0")/../.."
exec scripts/trades_finish_candidate.sh runs/r34 3
