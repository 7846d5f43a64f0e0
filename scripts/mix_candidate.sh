#!/usr/bin/env bash
# Issue 10's weight-interpolation candidates (r35 in benchmarks/results/recipes.md): a finished fine-tune's start and
# end mixed, (1 - T) * start + T * end (`satml interpolate`; the start is the --init its config names), in a candidate's
# layout (RUN/robust holds the mix, as scripts/gate_candidate.sh and scripts/candidate_state.sh expect). Trains
# nothing; the mix's final record is its validation k-NN accuracy (5,000 images), the pre-set's clean screen.
#   scripts/mix_candidate.sh RUN FINE_TUNE_RUN T            the mix (e.g. runs/r35 runs/r31 0.5)
#   STAGE=2 scripts/mix_candidate.sh RUN FINE_TUNE_RUN T    export + calibrate, then the validation gate (1,000 images)
# Stage 1 needs the fine-tune's final checkpoint and its init on this machine (neither is committed whole); stage 2
# only the fine-tune's exported manifest (its description).
set -euo pipefail
[ $# -eq 3 ] || { echo "usage: $0 RUN FINE_TUNE_RUN T" >&2; exit 2; }
RUN=${1%/} FT=${2%/} T=$3
[ -x .venv/bin/satml ] && export PATH="$PWD/.venv/bin:$PATH"
export OMP_WAIT_POLICY=PASSIVE
case "${STAGE:-1}" in
1) END=$FT/robust/checkpoint.pt
   grep -qs '"final": true' "$FT/robust/metrics.jsonl" || { echo "$FT: no finished fine-tune there" >&2; exit 2; }
   START=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["init"] or "")' "$FT/robust/config.json")
   [ -f "$START" ] || { echo "$FT's start (its --init) '$START' is not on this machine" >&2; exit 2; }
   satml interpolate "$START" "$END" --t "$T" --run-dir "$RUN/robust" --data data --no-progress ;;
2) WHAT=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["description"])' \
     "$FT/art/default/manifest.json")
   "$(dirname "$0")/gate_candidate.sh" "$RUN" "${WHAT%; served embedding*}; served weights: the average of that last stage's start and end, (1 - t) * start + t * end at t = $T (WiSE-FT style)${WHAT#"${WHAT%; served embedding*}"}" ;;
*) echo "STAGE must be 1 or 2" >&2; exit 2 ;;
esac
