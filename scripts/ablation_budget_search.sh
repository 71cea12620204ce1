#!/usr/bin/env bash
# The budget search of docs/ablations.md: the smallest pretraining budget, in whole Fashion-MNIST epochs
# at batch 32 (1 875 steps each; the cosine then ends with the run), at which the baseline (sparse,
# r 0.6, GRN) beats random init by >= 5 linear-probe points with seeds 0-2 not overlapping; then every
# variant at that budget. Random init and the baseline run first for every seed; a budget that does
# not clear the margin stops there (tools/ablate.py --require-floor, exit status 3) and the next one
# starts. Every step resumes, so after a kill run the same command again.
#
# The first start copies the committed code (git HEAD) to $OUT/code and every run uses that copy, so
# later commits or merges in the checkout do not change a running search; $OUT/code/COMMIT names it.
#   setsid nohup nice -n 19 env OMP_NUM_THREADS=1 scripts/ablation_budget_search.sh > runs/ablation-search.log 2>&1 &
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$PWD/.venv/bin/python}
OUT=${OUT:-runs/ablation-search}
EPOCHS=${EPOCHS:-"1 2 4"}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [ ! -f "$OUT/code/COMMIT" ]; then
  mkdir -p "$OUT/code.tmp" && git archive HEAD | tar -x -C "$OUT/code.tmp" && git rev-parse HEAD > "$OUT/code.tmp/COMMIT" \
    && rm -rf "$OUT/code" && mv "$OUT/code.tmp" "$OUT/code" || { echo "cannot copy the code to $OUT/code" >&2; exit 1; }
fi
CODE=$(cd "$OUT/code" && pwd)
echo "[search] $(date -u +%FT%TZ) code $(cat "$CODE/COMMIT") ($CODE), epochs to try: $EPOCHS"

for e in $EPOCHS; do
  echo "[search] $(date -u +%FT%TZ) budget: $e epoch(s) = $((e * 1875)) steps; load $(cut -d' ' -f1-3 /proc/loadavg)"
  PYTHONPATH="$CODE" "$PY" "$CODE/tools/ablate.py" --out "$OUT/e$e" --steps $((e * 1875)) --seeds 0 1 2 \
    --probe-train 1000 --eval-limit 2000 --finetune-fraction 0.01 --finetune-epochs 5 --collapse-images 100 \
    --require-floor 5
  rc=$?
  echo "[search] $(date -u +%FT%TZ) budget $e epoch(s): exit status $rc"
  [ $rc -eq 3 ] && continue  # the baseline did not clear random init: try the next budget
  exit $rc
done
echo "[search] no budget in ($EPOCHS) cleared the margin"
exit 3
