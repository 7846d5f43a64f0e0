#!/usr/bin/env bash
# Issue 10's validation gate for a candidate default (benchmarks/results/recipes.md): export a robust stage's
# checkpoint as RUN/art/default (k = 75, the 48-d PCA of the bank baked into the encoder, as the shipped default),
# calibrate it, then run the headline-only suite on the validation split, 1,000 attacked images, beside the shipped
# default (whose side is cached in runs/val1000_cache, so only the candidate is attacked when the cache is kept).
# GATE_BESIDE= (empty) attacks the candidate alone: a gate whose rule is absolute thresholds does not need the
# default's row, which costs as much again on a machine without the cache (the default's own figures are in
# benchmarks/results/robustness_default_val1000_headline.md).
# From the repository root after `make install-dev data`:
#   scripts/gate_candidate.sh RUN DESCRIPTION     e.g. scripts/gate_candidate.sh runs/r26 "Robust self-supervised ..."
# GATE_K=K exports the vote at k = K instead (a candidate that differs from another only in its vote);
# GATE_MIRROR=1 exports with --mirror-average (the embedding averaged over the image and its mirror image).
# Writes RUN/art/default and RUN/val_gate/robustness.{md,json} (or RUN/val_gate/stopped.json, GATE_STOP_BELOW).
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 RUN DESCRIPTION" >&2; exit 2; }
command -v satml > /dev/null || { [ -x .venv/bin/satml ] && export PATH="$PWD/.venv/bin:$PATH"; }
RUN=$1
# an artifact already exported and calibrated (a gate resumed on another machine, from scripts/candidate_state.sh) is
# attacked as it is: exporting again could change its bytes (float rounding differs between CPUs), and with them the
# model's identity that the per-attack cache is keyed by. Delete RUN/art to export again.
if [ -f "$RUN/art/default/calibration.safetensors" ]; then
  echo "gate: $RUN/art/default is exported and calibrated; attacking it as it is"
else
  satml export --checkpoint "$RUN/robust/checkpoint.pt" --out "$RUN/art/default" --name default --data data \
    --trained-on "2-core CPU" --k "${GATE_K:-75}" --reduce-dim 48 ${GATE_MIRROR:+--mirror-average} \
    --description "$2"
  satml calibrate "$RUN/art/default" --data data
fi
BESIDE=${GATE_BESIDE-artifacts/default}
# GATE_STOP_BELOW=RULE (the gate's rule; scripts/candidate_chain.sh sets it) fails fast: the candidate alone stops at
# the first figure under its minimum and leaves RUN/val_gate/stopped.json instead of the report (exit 3, not an
# error here); beside the shipped default the gate runs whole
STOP=()
if [ -n "${GATE_STOP_BELOW:-}" ]; then
  if [ -z "$BESIDE" ]; then STOP=(--stop-below "$GATE_STOP_BELOW")
  else echo "gate: GATE_STOP_BELOW applies to a candidate gated alone (GATE_BESIDE=): the gate runs whole"; fi
fi
rc=0
satml robustness $BESIDE "$RUN/art/default" --data data --split validation --n-robust 1000 \
  --headline-only --transfer-source none --out "$RUN/val_gate" --cache-dir runs/val1000_cache --no-progress \
  "${STOP[@]}" || rc=$?
[ "$rc" = 0 ] || [ "$rc" = 3 ] || exit "$rc"
