#!/usr/bin/env bash
# Issue 10: a candidate default from wherever it stands to its pre-set verdicts, unattended and resumable at each
# step (benchmarks/results/recipes.md holds each candidate's rules, written before any of its figures):
#   0. the state saved beside SCRIPT (`dirname SCRIPT`/state, scripts/candidate_state.sh) is restored into RUN,
#   1. SCRIPT trains (resumes from its checkpoint; skipped once final),
#   2. STAGE=2 SCRIPT exports, calibrates and runs the validation gate (skipped once RUN/val_gate/robustness.json
#      or stopped.json exists; GATE_BESIDE= in the environment gates the candidate alone and then stops it at the
#      first figure under GATE_RULE, GATE_STOP_BELOW= (empty) runs it whole: see scripts/gate_candidate.sh),
#   3. the gate's rule, read from its JSON (`satml robustness-verdict`); only on a pass:
#   4. the full test suite (first 1,000 test images, transfer from artifacts/supervised; resumes from its cache),
#   5. the ship rules (any one passing is a pass).
# It ships nothing: a pass is printed; scripts/ship_candidate.sh then ships it (artifact, card, reports), and the README
# and recipes.md are changed by hand. From the repository root after `make install-dev data`:
#   scripts/candidate_chain.sh SCRIPT RUN GATE_RULE SHIP_RULE [SHIP_RULE ...]
#   e.g. scripts/candidate_chain.sh checkpoints/r28/run.sh runs/r28 worst=0.284,clean=0.678 exact=0.70,worst=0.30
set -euo pipefail
[ $# -ge 4 ] || { echo "usage: $0 SCRIPT RUN GATE_RULE SHIP_RULE [SHIP_RULE ...]" >&2; exit 2; }
command -v satml > /dev/null || { [ -x .venv/bin/satml ] && export PATH="$PWD/.venv/bin:$PATH"; }
SCRIPT=$1 RUN=${2%/} GATE=$3
shift 3
MODEL="$(basename "$RUN")/art/default"  # the candidate's row: the last folders of its artifact path
export OMP_WAIT_POLICY=PASSIVE
# a state committed at an earlier session's end beside the run script (scripts/candidate_state.sh save RUN DIR) is put
# back first, never over what this machine has
STATE="$(dirname "$SCRIPT")/state"
[ -d "$STATE" ] && "$(dirname "$0")/candidate_state.sh" restore "$STATE" "$RUN"
# a final training is not run again (satml train would only re-evaluate it and append a second final record)
grep -qs '"final": true' "$RUN/robust/metrics.jsonl" || bash "$SCRIPT"
# the gate fails fast on its own rule (scripts/gate_candidate.sh, GATE_STOP_BELOW): a stopped gate leaves
# stopped.json, which the verdict reads as a fail; delete it to run that gate whole
[ -f "$RUN/val_gate/robustness.json" ] || [ -f "$RUN/val_gate/stopped.json" ] \
  || GATE_STOP_BELOW=${GATE_STOP_BELOW-$GATE} STAGE=2 bash "$SCRIPT"
satml robustness-verdict "$RUN/val_gate/robustness.json" --model "$MODEL" --rule "$GATE" \
  || { echo "$MODEL: gate failed, no test suite"; exit 0; }
satml robustness "$RUN/art/default" --data data --transfer-source artifacts/supervised --out "$RUN/suite" \
  --no-progress
rules=()
for rule in "$@"; do rules+=(--rule "$rule"); done
satml robustness-verdict "$RUN/suite/robustness.json" --model "$MODEL" "${rules[@]}" \
  || echo "$MODEL: ship rules failed, not shipped"
