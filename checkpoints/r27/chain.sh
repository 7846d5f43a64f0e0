#!/usr/bin/env bash
# r27 from where it stands to its verdicts, unattended (thirteenth session): the training (resumes from
# runs/r27/robust; skipped once final), the validation gate (STAGE=2 of run.sh; skipped once its report exists), the
# gate's pre-set rule (recipes.md: worst case >= 29.9 % and clean >= 66.3 % on the 1,000 validation images), and only
# if it passes the full test suite (resumes from its own cache) and the pre-set ship rule (worst case >= 31.9 % and
# clean (10,000) >= 66.0 %, or the goal: exact >= 70 %, worst case >= 30 % and clean >= 66.5 %). It ships nothing:
# a pass is reported, the artifact, card, README and recipes.md are updated by hand. From the repository root:
#   nice -n 5 bash checkpoints/r27/chain.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x .venv/bin/satml ] && export PATH="$PWD/.venv/bin:$PATH"
export OMP_WAIT_POLICY=PASSIVE
bash checkpoints/r27/run.sh
[ -f runs/r27/val_gate/robustness.json ] || STAGE=2 bash checkpoints/r27/run.sh

# verdict REPORT MIN_WORST MIN_CLEAN [GOAL]: the r27 row of a robustness report against the thresholds (exit 1: fails)
verdict() {
  python - "$@" <<'EOF'
import json, sys
report, min_worst, min_clean = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
goal = len(sys.argv) > 4
(m,) = [m for m in json.load(open(report))["models"] if m["path"].rstrip("/").endswith("r27/art/default")]
clean, exact, worst = m["clean"]["acc"], m["clean"]["exact_acc"], m["worst_case"]["acc"]
ok = worst >= min_worst and clean >= min_clean
if goal:
    ok = ok or (exact >= 0.70 and worst >= 0.30 and clean >= 0.665)
print(f"r27 {report}: clean {clean:.2%} ({m['clean']['n']}), exact {exact:.2%} ({m['clean']['exact_n']}), "
      f"worst case {worst:.2%} ({m['worst_case']['n']}): {'PASSES' if ok else 'fails'} (worst >= {min_worst:.1%}, "
      f"clean >= {min_clean:.1%}{', or the goal' if goal else ''})")
sys.exit(0 if ok else 1)
EOF
}

verdict runs/r27/val_gate/robustness.json 0.299 0.663 || { echo "r27: gate failed, no test suite"; exit 0; }
satml robustness runs/r27/art/default --data data --transfer-source artifacts/supervised --out runs/r27/suite \
  --no-progress
verdict runs/r27/suite/robustness.json 0.319 0.660 goal || echo "r27: test rule failed, not shipped"
