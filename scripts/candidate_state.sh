#!/usr/bin/env bash
# Carry a candidate's unfinished chain (scripts/candidate_chain.sh) from one machine to the next: the CPU VMs lose
# runs/ between sessions, and a candidate's training, gate and suite take longer than one session on them.
#   scripts/candidate_state.sh save RUN DIR      what the chain needs to go on from where RUN stands, into DIR (to commit)
#   scripts/candidate_state.sh restore DIR RUN   put it back where the chain looks, never over a file that is there
#   scripts/candidate_state.sh from-git REV PATH DEST
#                                                the files of a state committed at REV (PATH: a folder in that commit)
#                                                into DEST, never over a file that is there: how a candidate starts
#                                                from an earlier one's weights or artifact once those left main
# e.g. `save runs/r28 checkpoints/r28/state` at a session's end, `restore checkpoints/r28/state runs/r28` before the
# chain (the candidate's chain.sh does). What is saved, by where the chain stands:
#   robust/      config.json, metrics.jsonl, pseudo_labels.npy (the cluster record the resume checks), and
#                checkpoint.pt (~22 MB at w40) unless the training is final and the gate has finished (the suite then
#                reads the exported artifact only)
#   art/default  the exported, calibrated artifact, once exported (~10 MB)
#   val_gate/    the gate's report once finished; between the export and that, runs/val1000_cache (the gate's
#                per-attack results, shared by every candidate's gate on this machine)
#   suite_cache/ RUN/suite/cache: the suite's per-attack results, so it resumes at the attack it had reached
# Cache files over MAX_KB (default 2048; the transfer attack's stored images) are left out: they are recomputed.
set -euo pipefail
MAX_KB=${MAX_KB:-2048}
usage() { echo "usage: $0 save RUN DIR | restore DIR RUN | from-git REV PATH DEST" >&2; exit 2; }
[ $# -ge 1 ] || usage
case "$1" in from-git) [ $# -eq 4 ] || usage ;; *) [ $# -eq 3 ] || usage ;; esac

# copy_tree SRC DEST [MAX_KB]: SRC's files into DEST (same relative paths), keeping any file DEST has; with MAX_KB,
# only files of at most that size (the others are named on stderr)
copy_tree() {
  local src=$1 dest=$2 max=${3:-} f
  [ -d "$src" ] || return 0
  while IFS= read -r -d '' f; do
    f=${f#./}
    if [ -n "$max" ] && [ "$(stat -c %s "$src/$f")" -gt $((max * 1024)) ]; then
      echo "candidate_state: left out $src/$f (over $max KB; recomputed on resume)" >&2
      continue
    fi
    [ -e "$dest/$f" ] && continue
    mkdir -p "$(dirname "$dest/$f")"
    cp -p "$src/$f" "$dest/$f"
  done < <(cd "$src" && find . -type f -print0 | sort -z)
}

case "$1" in
save)
  RUN=${2%/} DIR=${3%/}
  [ -d "$RUN/robust" ] || { echo "candidate_state: $RUN/robust does not exist: nothing to save" >&2; exit 1; }
  rm -rf "$DIR"
  mkdir -p "$DIR/robust"
  for f in config.json metrics.jsonl pseudo_labels.npy; do
    [ -f "$RUN/robust/$f" ] && cp -p "$RUN/robust/$f" "$DIR/robust/"
  done
  final=0
  [ -f "$RUN/robust/metrics.jsonl" ] && grep -q '"final": true' "$RUN/robust/metrics.jsonl" && final=1
  gated=0  # the gate's report, or its stop record (a fail-fast gate that stopped)
  { [ -f "$RUN/val_gate/robustness.json" ] || [ -f "$RUN/val_gate/stopped.json" ]; } && gated=1
  if [ "$final" = 1 ] && [ "$gated" = 1 ]; then
    echo "candidate_state: training final and gate finished: the weights travel in the artifact only" >&2
  elif [ -f "$RUN/robust/checkpoint.pt" ]; then
    cp -p "$RUN/robust/checkpoint.pt" "$DIR/robust/"
  fi
  [ -f "$RUN/art/default/manifest.json" ] && copy_tree "$RUN/art/default" "$DIR/art/default"
  if [ "$gated" = 1 ]; then
    copy_tree "$RUN/val_gate" "$DIR/val_gate"
  elif [ -f "$RUN/art/default/manifest.json" ]; then  # the gate may have begun (before the export it has not)
    copy_tree runs/val1000_cache "$DIR/val1000_cache" "$MAX_KB"
  fi
  copy_tree "$RUN/suite/cache" "$DIR/suite_cache" "$MAX_KB"
  du -sh "$DIR" | sed 's/^/candidate_state: saved /' >&2
  ;;
restore)
  DIR=${2%/} RUN=${3%/}
  [ -d "$DIR" ] || { echo "candidate_state: $DIR does not exist: nothing to restore" >&2; exit 1; }
  copy_tree "$DIR/robust" "$RUN/robust"
  copy_tree "$DIR/art/default" "$RUN/art/default"
  copy_tree "$DIR/val_gate" "$RUN/val_gate"
  copy_tree "$DIR/val1000_cache" runs/val1000_cache
  copy_tree "$DIR/suite_cache" "$RUN/suite/cache"
  ;;
from-git)
  REV=$2 SRC=${3%/} DEST=${4%/}
  git rev-parse --verify --quiet "$REV^{commit}" > /dev/null \
    || { echo "candidate_state: $REV is not a commit of this repository" >&2; exit 1; }
  listed=$(git ls-tree -r --name-only "$REV" -- "$SRC/")
  [ -n "$listed" ] || { echo "candidate_state: $REV has no files under $SRC" >&2; exit 1; }
  while IFS= read -r f; do
    rel=${f#"$SRC"/}
    [ -e "$DEST/$rel" ] && continue
    mkdir -p "$(dirname "$DEST/$rel")"
    git show "$REV:$f" > "$DEST/$rel.part"  # written whole, then named: a stopped copy is never taken for the file
    mv "$DEST/$rel.part" "$DEST/$rel"
  done <<< "$listed"
  ;;
*) usage ;;
esac
