#!/usr/bin/env bash
# Issue 10: ship a candidate default whose chain (scripts/candidate_chain.sh) ended in a pass, so that the files
# change the same way every time (the r18 -> r19 ship was done by hand). From the repository root:
#   scripts/ship_candidate.sh RUN PREVIOUS SHIP_RULE [SHIP_RULE ...]
#   e.g. scripts/ship_candidate.sh runs/r28 r19 exact=0.70,worst=0.30,clean=0.665
# 1. checks, changing nothing: the candidate's test suite passes the pre-set rules again (`satml
#    robustness-verdict`, any one rule), its artifact is at most 15 MB, robustness_PREVIOUS.* does not exist yet;
# 2. keeps the shipped default's report as benchmarks/results/robustness_PREVIOUS.* (git mv);
# 3. copies the candidate's suite report (RUN/suite/robustness.*) to benchmarks/results/robustness_default.* and
#    RUN/art/default to artifacts/default, and writes that report into its card (`satml robustness-card`: what
#    --update-cards writes, the card's plot and the manifest's records and hashes, matched by the model's sha256);
# 4. merges the shipped models' table (benchmarks/results/robustness.{json,md}) from the same runs as before
#    (`merged_from`), the default's row now the new one, checked against the files in artifacts/.
# The README table, recipes.md and scripts/train_cpu_default.sh's defaults are left to the person shipping (it
# prints what to edit). On an error midway, `git checkout -- artifacts benchmarks/results` undoes it.
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 RUN PREVIOUS SHIP_RULE [SHIP_RULE ...]" >&2; exit 2; }
command -v satml > /dev/null || { [ -x .venv/bin/satml ] && export PATH="$PWD/.venv/bin:$PATH"; }
RUN=${1%/} PREV=$2
shift 2
R=benchmarks/results
ART="$RUN/art/default"
MODEL="$(basename "$RUN")/art/default"
MAX_BYTES=15000000
rules=()
for rule in "$@"; do rules+=(--rule "$rule"); done

[[ "$PREV" =~ ^[A-Za-z0-9_-]+$ ]] || { echo "PREVIOUS must be a plain name (e.g. r19), got '$PREV'" >&2; exit 2; }
[ -f "$RUN/suite/robustness.json" ] || { echo "$RUN/suite/robustness.json: no test suite for this candidate" >&2; exit 1; }
satml robustness-verdict "$RUN/suite/robustness.json" --model "$MODEL" "${rules[@]}" \
  || { echo "$MODEL: the ship rules fail: not shipped" >&2; exit 1; }
bytes=$(du -sb "$ART" | cut -f1)
[ "$bytes" -le "$MAX_BYTES" ] || { echo "$ART: $bytes bytes, over the $MAX_BYTES-byte artifact limit" >&2; exit 1; }
for f in "$R"/robustness_"$PREV".*; do
  [ -e "$f" ] && { echo "$f exists: pick another PREVIOUS name" >&2; exit 1; }
done
[ -z "$(git status --porcelain -- artifacts/default "$R")" ] \
  || { echo "artifacts/default or $R has uncommitted changes: commit or discard them first" >&2; exit 1; }

for suffix in .json .md _eps.png _temperature.png _coverage.png; do
  [ -e "$R/robustness_default$suffix" ] && git mv "$R/robustness_default$suffix" "$R/robustness_$PREV$suffix"
done
for suffix in .json .md _eps.png _temperature.png _coverage.png; do
  [ -e "$RUN/suite/robustness$suffix" ] && cp "$RUN/suite/robustness$suffix" "$R/robustness_default$suffix"
done
rm -rf artifacts/default
cp -r "$ART" artifacts/default
satml robustness-card artifacts/default "$R/robustness_default.json"
mapfile -t sources < <(python -c "
import json, sys
for run in json.load(open(sys.argv[1]))['merged_from']:
    print(run['file'] + ':' + ','.join(run['models']))" "$R/robustness.json")
satml robustness-report "${sources[@]}" --artifacts artifacts --out "$R"
git add artifacts/default "$R"
cat <<EOF
Shipped $ART as artifacts/default (staged, not committed); the previous default's report is $R/robustness_$PREV.*.
Still by hand: the README's model table, artifacts/default/card.md (read it), benchmarks/results/recipes.md, and
scripts/train_cpu_default.sh's defaults if the recipe changed; then commit.
EOF
