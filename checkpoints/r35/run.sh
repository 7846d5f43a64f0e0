#!/usr/bin/env bash
# Issue 10's candidate r35 (pre-set in benchmarks/results/recipes.md, "Interpolating the finishing stage's weights
# with its start (r35 ...)", twenty-third session, before any of its figures): r29's and r31's served weights mixed at
# t = 0.5. scripts/mix_candidate.sh says what it does; it needs runs/r31 (its final checkpoint and its r29 init).
#   checkpoints/r35/run.sh            the mix and its validation k-NN figure (the pre-set's clean screen)
#   STAGE=2 checkpoints/r35/run.sh    export + calibrate, then the validation gate (1,000 images)
#   checkpoints/r35/chain.sh          both, then the pre-set verdicts (and the test suite if the gate passes)
set -euo pipefail
cd "$(dirname "$0")/../.."
# the gate's description is r31's (its exported manifest, committed in r31's state): put it back on a fresh machine
scripts/candidate_state.sh restore checkpoints/r31/state runs/r31
exec scripts/mix_candidate.sh runs/r35 runs/r31 0.5
