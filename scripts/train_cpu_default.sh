#!/usr/bin/env bash
# The CPU recipe behind artifacts/default (robust, label-free) and artifacts/ssl (its clean teacher), on
# ../shared/data/cifar10 materialised into data/ (`make data`). Issue 10's measurements chose it
# (benchmarks/results/recipes.md):
#   1. SimCLR teacher: plain 8-layer CNN (cnn8, width 16), the fastest encoder per CPU-minute here, NT-Xent
#      temperature 0.2, 100 epochs in bf16 autocast (where the CPU runs bf16 natively) + channels_last (PRECISION);
#   2. robust encoder (RECIPE=pseudo_at, the default): the teacher widened to width 40 (Net2WiderNet), then
#      label-free adversarial training (N-FGSM at 8/255, with a catastrophic-overfitting guard, and adversarial weight
#      perturbation, AWP gamma 0.01) on the frozen teacher's soft assignment (T = 0.02) to 100 k-means clusters of
#      its embedding, weight average (EMA), 40 epochs (r29); then a finishing stage of 6 epochs of TRADES-AWP at
#      beta 3 (PGD-3 on the KL, lr 0.01) on the same targets, whose EMA weights are served (r34); bf16 as the
#      teacher (PRECISION); RECIPE=distill: an earlier default, DeACL-style distillation (beta 2). No labels anywhere
#      in encoder training (labels only in the bank);
#   3. bank + export with the manifest/card (the default's 320-d embedding served as its 48-d PCA, baked into the
#      encoder: the artifact stays under 15 MB), calibration (credibility), then the adaptive robustness suite.
#   BASELINES=1 also trains the labelled PGD-AT reference (artifacts/pgd_at) on the same encoder and budget:
#   PGD_AT_EPOCHS (default 63: the robust stage's 40 epochs plus the teacher's ~40 min at ~1.75 min per w32 PGD-3
#   epoch on this CPU), and the supervised cross-entropy baseline (artifacts/supervised, the suite's transfer
#   source) on the same encoder: SUPERVISED_EPOCHS (default 100; one forward-backward per image instead of PGD-3's
#   four, so it stays inside the same budget).
# Every step is resumable (rerun the script after an interruption: finished steps are skipped, a stopped run
# continues from its checkpoint). Env: RUNS, RECIPE, TEACHER_EPOCHS, ROBUST_EPOCHS, TEACHER_T, BASELINES,
# TEACHER (an existing teacher, a checkpoint or an artifact dir such as artifacts/ssl: the teacher stage and the
# ssl export are skipped, the robust stage starts from it, widened to WIDTH when it is narrower),
# NO_EXPORT, TEACHER_WIDTH (cnn8 width of the teacher, default 16), WIDTH (of the robust student, default 40),
# CLUSTERS (pseudo_at's k-means clusters, default 100), SOFT_TARGETS (pseudo_at on the teacher's soft cluster
# assignment at this temperature, default 0.02; empty: the hard ids), AWP_GAMMA (pseudo_at with adversarial weight
# perturbation of this relative size, default 0.01; empty: off), TRADES_BETA (pseudo_at as TRADES with this beta;
# unset: PGD-AT), TRAIN_ATTACK (pseudo_at's adversary: nfgsm, the default, or pgd; pgd when TRADES_BETA is set) and
# CO_GUARD (with nfgsm: stop when the validation PGD-10 falls this far below its best, default 0.05),
# FINISH_TRADES_BETA (pseudo_at then a short finishing stage in RUNS/finish from the robust stage's EMA weights:
# TRADES at this beta with PGD-3 on the KL, the same targets and AWP, FINISH_EPOCHS (default 6) at FINISH_LR (default
# 0.01, cosine, no warm-up); the export serves it; default 3, empty: no finishing stage), FINISH_MIX (with
# FINISH_TRADES_BETA: serve (1 - t) * the finishing stage's start + t * its end at t = FINISH_MIX, `satml interpolate`
# into RUNS/mix; unset: its end), K (the default's k, default 75),
# REDUCE_DIM (the default's served embedding size, default 48; empty: the full embedding), PRECISION (every stage:
# auto, bf16 or fp32; default auto: bf16 where the CPU has AVX512-BF16 or AMX, fp32 elsewhere), DATA (default data),
# ART (artifact root, default artifacts); and
# TRAIN_ARGS / EXPORT_ARGS / SUITE_ARGS, appended to every `satml train` / `satml export` / `satml robustness`
# (later flags win: small runs such as tests/scripts/test_train_cpu_default.py, or `--precision bf16`).
set -euo pipefail
# `make install-dev` puts satml in .venv: use it when the caller has not activated an environment
command -v satml > /dev/null || { [ -x .venv/bin/satml ] && export PATH="$PWD/.venv/bin:$PATH"; }
RUNS=${RUNS:-runs/cpu}
DATA=${DATA:-data}
ART=${ART:-artifacts}
read -r -a EXTRA <<< "${TRAIN_ARGS:-}"
read -r -a EXPORT_EXTRA <<< "${EXPORT_ARGS:-}"
read -r -a SUITE_EXTRA <<< "${SUITE_ARGS:-}"
RECIPE=${RECIPE:-pseudo_at}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-100}  # validation k-NN 60.2 % after 15, 65.5 % after 30, 69.8 % after 100 (recipes.md)
TEACHER_T=${TEACHER_T:-0.2}  # 0.5 made the distill default; 0.2 is +3 points of validation k-NN (recipes.md)
TEACHER_WIDTH=${TEACHER_WIDTH:-16}
WIDTH=${WIDTH:-40}  # w32 for 20 epochs beat w16 for 40 (29.2 % worst case against 27.7); w40 with N-FGSM: r27-r29
K=${K:-75}  # k of the default's vote (the ssl and pgd_at exports keep 75)
REDUCE_DIM=${REDUCE_DIM-48}  # 48-d PCA of the w32 bank: validation k-NN 61.3 % against 61.7 % at 256-d (r16)
ARCH=(--arch cnn8 --width "$WIDTH")
REDUCE=()
[ -n "$REDUCE_DIM" ] && REDUCE=(--reduce-dim "$REDUCE_DIM")
COMMON=(--data "$DATA" --batch-size 256 --workers-threads 2 --no-progress)
ADV=(--eps 0.0313725 --attack-steps 3 --ema-decay 0.995 --eval-every 4 --eval-robust 500)
# bf16 autocast + channels_last: ~3x the images/s on a CPU with AMX / AVX512-BF16; an AVX2-only CPU emulates bf16
# at ~0.1x, so auto (the default) trains in float32 there (benchmarks/encoder_speed.py --bf16; evaluation and
# export stay float32; the shipped default was trained in bf16 on an AVX512-BF16 CPU)
PRECISION=${PRECISION:-auto}
FAST=(--precision "$PRECISION" --memory-format channels_last)
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # sleep, not spin, when a core is shared
done_() { [ -f "$1/metrics.jsonl" ] && grep -q '"final": true' "$1/metrics.jsonl"; }
if [ -n "${TEACHER:-}" ]; then
  TEACHER_DESC="the given teacher ($TEACHER)"
else
  TEACHER=$RUNS/teacher/checkpoint.pt
  TEACHER_DESC="SimCLR teacher (cnn8 w$TEACHER_WIDTH, T=$TEACHER_T, $TEACHER_EPOCHS ep)"
  done_ "$RUNS/teacher" || satml train --method ssl --run-dir "$RUNS/teacher" --epochs "$TEACHER_EPOCHS" --lr 0.1 \
    --temperature "$TEACHER_T" --warmup-epochs 0.5 --eval-every 5 "${FAST[@]}" --arch cnn8 --width "$TEACHER_WIDTH" \
    "${COMMON[@]}" "${EXTRA[@]}"
  OWN_TEACHER=1
fi
SERVED=$RUNS/robust  # the stage the default is exported from
case "$RECIPE" in
  pseudo_at)
    ROBUST_EPOCHS=${ROBUST_EPOCHS:-40}  # w32: 40 epochs 66.5 / 31.4 % (r19) against 20 epochs 65.3 / 29.2 (r18)
    SOFT_TARGETS=${SOFT_TARGETS-0.02} AWP_GAMMA=${AWP_GAMMA-0.01}  # r29's (recipes.md: r23, r25, r29)
    FINISH_TRADES_BETA=${FINISH_TRADES_BETA-3}  # r34: the TRADES-AWP dose that passed the gate (beta 2 / 4 / 6 did not)
    TRAIN_ATTACK=${TRAIN_ATTACK:-$([ -n "${TRADES_BETA:-}" ] && echo pgd || echo nfgsm)}  # TRADES: PGD-3 on the KL
    CLUSTERS=${CLUSTERS:-100}  # k-means clusters of the teacher's embedding (the pseudo-labels)
    TARGETS=()  # SOFT_TARGETS=T: the teacher's soft cluster assignment at temperature T as targets (unset: hard ids)
    [ -n "${SOFT_TARGETS:-}" ] && TARGETS=(--soft-targets "$SOFT_TARGETS")
    [ -n "${AWP_GAMMA:-}" ] && TARGETS+=(--awp-gamma "$AWP_GAMMA")  # adversarial weight perturbation (unset: off)
    OPTS=("${TARGETS[@]}")  # the robust stage's; TARGETS alone carries over to the finishing stage
    TRAINING="PGD-AT"  # TRADES_BETA=B: TRADES (clean CE + B * KL to the adversarial view; PGD-3 on the KL)
    [ -n "${TRADES_BETA:-}" ] && { OPTS+=(--trades-beta "$TRADES_BETA"); TRAINING="TRADES at beta $TRADES_BETA"; }
    ADVERSARY="PGD-3"  # TRAIN_ATTACK=nfgsm: N-FGSM, one forward-backward per image instead of PGD-3's three, with the
    if [ "$TRAIN_ATTACK" = nfgsm ]; then  # catastrophic-overfitting guard at CO_GUARD (default 0.05)
      OPTS+=(--train-attack nfgsm --co-guard "${CO_GUARD:-0.05}")
      ADVERSARY="N-FGSM"
    fi
    done_ "$RUNS/robust" || satml train --method pseudo_at --run-dir "$RUNS/robust" --epochs "$ROBUST_EPOCHS" \
      --clusters "$CLUSTERS" --teacher "$TEACHER" --init "$TEACHER" --lr 0.1 "${OPTS[@]}" \
      --warmup-epochs 0.5 --alpha 0.0261438 "${ADV[@]}" "${FAST[@]}" "${ARCH[@]}" "${COMMON[@]}" "${EXTRA[@]}"
    WHAT="label-free $TRAINING ($ADVERSARY at 8/255, EMA${AWP_GAMMA:+, AWP gamma $AWP_GAMMA}) on $CLUSTERS k-means clusters of the teacher's embedding${SOFT_TARGETS:+ (soft assignment at T=$SOFT_TARGETS)}, $ROBUST_EPOCHS ep"
    if [ -n "$FINISH_TRADES_BETA" ]; then  # r31-r34 (recipes.md): 6 epochs from r29's weights; the recipe then
      FINISH_EPOCHS=${FINISH_EPOCHS:-6}     # serves this stage
      done_ "$RUNS/finish" || satml train --method pseudo_at --run-dir "$RUNS/finish" --epochs "$FINISH_EPOCHS" \
        --clusters "$CLUSTERS" --teacher "$TEACHER" --init "$RUNS/robust/checkpoint.pt" --lr "${FINISH_LR:-0.01}" \
        "${TARGETS[@]}" --trades-beta "$FINISH_TRADES_BETA" --warmup-epochs 0 --alpha 0.0261438 "${ADV[@]}" \
        --eval-every 2 "${FAST[@]}" "${ARCH[@]}" "${COMMON[@]}" "${EXTRA[@]}"
      SERVED=$RUNS/finish
      WHAT="$WHAT, then $FINISH_EPOCHS ep of TRADES${AWP_GAMMA:+-AWP} (beta $FINISH_TRADES_BETA, PGD-3) on the same targets"
      if [ -n "${FINISH_MIX:-}" ]; then  # r35 (recipes.md): the finishing stage's start and end mixed (WiSE-FT)
        done_ "$RUNS/mix" || satml interpolate "$RUNS/robust/checkpoint.pt" "$RUNS/finish/checkpoint.pt" \
          --t "$FINISH_MIX" --run-dir "$RUNS/mix" --data "$DATA" --no-progress
        SERVED=$RUNS/mix
        WHAT="$WHAT; served weights: the average of that last stage's start and end, (1 - t) * start + t * end at t = $FINISH_MIX (WiSE-FT style)"
      fi
    fi ;;
  distill)
    ROBUST_EPOCHS=${ROBUST_EPOCHS:-14}
    done_ "$RUNS/robust" || satml train --method distill --run-dir "$RUNS/robust" --epochs "$ROBUST_EPOCHS" \
      --teacher "$TEACHER" --init "$TEACHER" --lr 0.05 --warmup-epochs 0.5 \
      --alpha 0.0156863 --adv-weight 2.0 "${ADV[@]}" "${FAST[@]}" "${ARCH[@]}" "${COMMON[@]}" "${EXTRA[@]}"
    WHAT="DeACL-style robust distillation (PGD-3 at 8/255, beta 2, EMA), $ROBUST_EPOCHS ep" ;;
  *) echo "RECIPE must be pseudo_at or distill, got '$RECIPE'" >&2; exit 2 ;;
esac
if [ -n "${BASELINES:-}" ]; then
  PGD_AT_EPOCHS=${PGD_AT_EPOCHS:-63}
  done_ "$RUNS/pgd_at" || satml train --method pgd_at --run-dir "$RUNS/pgd_at" --epochs "$PGD_AT_EPOCHS" --lr 0.1 \
    --warmup-epochs 0.5 --alpha 0.0261438 "${ADV[@]}" "${FAST[@]}" "${ARCH[@]}" "${COMMON[@]}" "${EXTRA[@]}"
  SUPERVISED_EPOCHS=${SUPERVISED_EPOCHS:-100}
  done_ "$RUNS/supervised" || satml train --method supervised --run-dir "$RUNS/supervised" \
    --epochs "$SUPERVISED_EPOCHS" --lr 0.1 --warmup-epochs 0.5 --ema-decay 0.995 --eval-every 10 "${FAST[@]}" \
    "${ARCH[@]}" "${COMMON[@]}" "${EXTRA[@]}"
fi
[ -n "${NO_EXPORT:-}" ] && exit 0
EXPORT=(--data "$DATA" --trained-on "2-core CPU")
satml export --checkpoint "$SERVED/checkpoint.pt" --out "$ART/default" --name default "${EXPORT[@]}" --k "$K" \
  --description "Robust self-supervised cnn8 width $WIDTH + k-NN (k=$K), CPU-trained: $TEACHER_DESC, then $WHAT (precision $PRECISION)${REDUCE_DIM:+; served embedding: ${REDUCE_DIM}-d PCA of the bank baked into the encoder}; no labels in encoder training" \
  "${REDUCE[@]}" "${EXPORT_EXTRA[@]}"
SUITE=("$ART/default")
if [ -n "${OWN_TEACHER:-}" ]; then
  satml export --checkpoint "$TEACHER" --out "$ART/ssl" --name ssl "${EXPORT[@]}" \
    --description "SimCLR cnn8 width $TEACHER_WIDTH (T=$TEACHER_T, $TEACHER_EPOCHS ep) + k-NN (k=75), CPU-trained: the clean teacher of the default model" \
    "${EXPORT_EXTRA[@]}"
  SUITE+=("$ART/ssl")
fi
if [ -n "${BASELINES:-}" ]; then
  satml export --checkpoint "$RUNS/pgd_at/checkpoint.pt" --out "$ART/pgd_at" --name pgd_at "${EXPORT[@]}" \
    --description "Supervised PGD-AT cnn8 width $WIDTH + k-NN (k=75), CPU-trained (PGD-3 at 8/255, EMA, $PGD_AT_EPOCHS epochs): the labelled robust reference, uses labels in encoder training" \
    "${REDUCE[@]}" "${EXPORT_EXTRA[@]}"
  SUITE+=("$ART/pgd_at")
  satml export --checkpoint "$RUNS/supervised/checkpoint.pt" --out "$ART/supervised" --name supervised "${EXPORT[@]}" \
    --description "Supervised cross-entropy cnn8 width $WIDTH + k-NN (k=75), CPU-trained ($SUPERVISED_EPOCHS epochs, precision $PRECISION): the non-robust labelled baseline and the suite's transfer source" \
    "${REDUCE[@]}" "${EXPORT_EXTRA[@]}"
  satml calibrate "$ART/supervised" --data "$DATA"  # its credibility too (the suite adds it as the transfer source)
fi
for a in "${SUITE[@]}"; do satml calibrate "$a" --data "$DATA"; done  # credibility
# the supervised baseline (trained apart: it is the transfer source and the ordering's first row) when present
TRANSFER=(--transfer-source none)
[ -d "$ART/supervised" ] && { SUITE+=("$ART/supervised"); TRANSFER=(); }
satml robustness "${SUITE[@]}" --data "$DATA" "${TRANSFER[@]}" --update-cards "${SUITE_EXTRA[@]}"
