#!/usr/bin/env bash
# The budget search of docs/ablations.md: the smallest pretraining budget, in whole Fashion-MNIST epochs
# at batch 32 (1 875 steps each; the cosine then ends with the run), at which the baseline (sparse,
# r 0.6, GRN) beats random init by >= 5 linear-probe points with seeds 0-2 not overlapping; then every
# variant at that budget. Random init and the baseline run first for every seed; a budget that does
# not clear the margin stops there (tools/ablate.py --require-floor, exit status 3) and the next one
# starts (1, 2, 4, 8 epochs). Every step resumes, so after a kill run the same command again.
#
# JOBS worker processes (default 1) share the (variant, seed) runs of a budget: each takes the next run
# nobody has claimed, so two cores finish a budget in about half the time; results do not depend on it.
#
# The first start copies the committed code (git HEAD) to $OUT/code and every run uses that copy, so
# later commits or merges in the checkout do not change a running search; $OUT/code/COMMIT names it.
#   setsid nohup nice -n 19 env OMP_NUM_THREADS=1 JOBS=2 scripts/ablation_budget_search.sh > runs/ablation-search.log 2>&1 &
set -uo pipefail
ROOT=${ABLATION_SEARCH_ROOT:-$(cd "$(dirname "$0")/.." && pwd)}
cd "$ROOT" || exit 1
PY=${PY:-$PWD/.venv/bin/python}
OUT=${OUT:-runs/ablation-search}
# bash reads a script while it runs it: run from a private copy, so that editing this file (or a
# checkout changing it) cannot change a running search.
if [ -z "${ABLATION_SEARCH_ROOT:-}" ]; then
  mkdir -p "$OUT" && cp "$0" "$OUT/.search.sh" || exit 1
  ABLATION_SEARCH_ROOT=$ROOT exec bash "$OUT/.search.sh"
fi
EPOCHS=${EPOCHS:-"1 2 4 8"}
JOBS=${JOBS:-1}
# The search of docs/ablations.md; tests shrink these (tests/test_ablation.py).
STEPS_PER_EPOCH=${STEPS_PER_EPOCH:-1875}
BUDGET=${BUDGET:-"--probe-train 1000 --eval-limit 2000 --finetune-fraction 0.01 --finetune-epochs 5 --collapse-images 100"}
FLOOR=${FLOOR:-5}
read -r -a SEEDS <<< "${SEEDS:-0 1 2}"
OTHERS=(leaky-r0.6-grn sparse-r0.4-grn sparse-r0.75-grn sparse-r0.9-grn sparse-r0.6-nogrn)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# With sched_autogroup (the default of most Linux kernels) nice only ranks processes inside their
# session's group, and a setsid'd job's group competes with the shell's as an equal: measured here, a
# "nice 19" search took half of both cores from the test suite. So the group gets this job's niceness too.
if [ -w /proc/self/autogroup ]; then echo "$(nice)" > /proc/self/autogroup 2>/dev/null || true; fi

mkdir -p "$OUT"
exec 9>"$OUT/.search.lock"
flock -n 9 || { echo "another budget search is running on $OUT (it holds $OUT/.search.lock); wait for it or stop it" >&2; exit 1; }

if [ ! -f "$OUT/code/COMMIT" ]; then
  mkdir -p "$OUT/code.tmp" && git archive HEAD | tar -x -C "$OUT/code.tmp" && git rev-parse HEAD > "$OUT/code.tmp/COMMIT" \
    && rm -rf "$OUT/code" && mv "$OUT/code.tmp" "$OUT/code" || { echo "cannot copy the code to $OUT/code" >&2; exit 1; }
fi
CODE=$(cd "$OUT/code" && pwd)
echo "[search] $(date -u +%FT%TZ) code $(cat "$CODE/COMMIT") ($CODE), epochs to try: $EPOCHS, $JOBS job(s)"

ablate() {  # $1 = budget folder, $2 = steps, the rest = tools/ablate.py options
  local out=$1 steps=$2; shift 2
  # shellcheck disable=SC2086
  PYTHONPATH="$CODE" "$PY" "$CODE/tools/ablate.py" --out "$out" --steps "$steps" $BUDGET "$@"
}

worker() {  # $1 = budget folder, $2 = steps, $3 = extra option, the rest = variant:seed runs in order
  local out=$1 steps=$2 extra=$3 run rc; shift 3
  for run in "$@"; do
    mkdir "$out/.claims/$run" 2>/dev/null || continue  # another worker has it
    ablate "$out" "$steps" --variants "${run%:*}" --seeds "${run#*:}" $extra
    rc=$?
    [ $rc -ne 0 ] && return $rc
  done
  return 0
}

in_parallel() {  # the runs shared by $JOBS workers; exit status 3 if any says the floor is not cleared
  local out=$1 pids=() rc worst=0
  rm -rf "$out/.claims" && mkdir -p "$out/.claims"
  for ((j = 0; j < JOBS; j++)); do worker "$@" & pids+=($!); sleep 5; done
  for p in "${pids[@]}"; do
    wait "$p"; rc=$?
    if [ $rc -eq 3 ] && [ $worst -eq 0 ]; then worst=3; elif [ $rc -ne 0 ] && [ $rc -ne 3 ]; then worst=$rc; fi
  done
  return $worst
}

for e in $EPOCHS; do
  out="$OUT/e$e" steps=$((e * STEPS_PER_EPOCH))
  echo "[search] $(date -u +%FT%TZ) budget: $e epoch(s) = $steps steps; load $(cut -d' ' -f1-3 /proc/loadavg)"
  floor=() rest=()
  for s in "${SEEDS[@]}"; do floor+=("random-init:$s" "sparse-r0.6-grn:$s"); done
  for s in "${SEEDS[@]}"; do for v in "${OTHERS[@]}"; do rest+=("$v:$s"); done; done
  in_parallel "$out" "$steps" "" "${floor[@]}"
  rc=$?
  [ $rc -eq 0 ] && { in_parallel "$out" "$steps" "--require-floor $FLOOR" "${rest[@]}"; rc=$?; }
  ablate "$out" "$steps" --summary-only --seeds "${SEEDS[@]}" > /dev/null
  echo "[search] $(date -u +%FT%TZ) budget $e epoch(s): exit status $rc"
  [ $rc -eq 3 ] && continue  # the baseline did not clear random init: try the next budget
  exit $rc
done
echo "[search] no budget in ($EPOCHS) cleared the margin"
exit 3
