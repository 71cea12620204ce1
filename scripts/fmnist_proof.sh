#!/usr/bin/env bash
# Does FCMAE pretraining help? Fashion-MNIST, convnextv2_atto at 96x96, CPU. Every step resumes or
# skips what is done, so the script can be re-run after an interruption. About 2.5 h on 2 cores.
#   1. pretrain on the 60k training images (labels unused), with GRN and without
#   2. linear probe (10k training images, all 10k test images) and finetune (10 % of the labels),
#      pretrained vs random init, seeds 0 and 1
#   3. feature-collapse curves, GRN vs no GRN; summary tables in runs/fmnist/summary.md
#   4. the linear probe again after a 5-epoch pretraining (does a longer run help more?)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${OUT:-runs/fmnist}
SEEDS=${SEEDS:-"0 1"}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$OUT"

pretrain() {  # name, extra overrides...
  local name=$1; shift
  $PY tools/pretrain.py --config configs/fmnist_atto.yaml --backend packed --resume auto --no-progress \
      train.output_dir="$OUT/$name" "$@"
}
pretrain pretrain-grn
pretrain pretrain-nogrn model.use_grn=false
CKPT=$(ls "$OUT"/pretrain-grn/checkpoint-[0-9]*.pth | tail -n 1)
CKPT_NOGRN=$(ls "$OUT"/pretrain-nogrn/checkpoint-[0-9]*.pth | tail -n 1)

for seed in $SEEDS; do
  for init in pre rand; do
    if [ $init = pre ]; then W=(--checkpoint "$CKPT"); else W=(--checkpoint random --model convnextv2_atto); fi
    [ -f "$OUT/probe-$init-s$seed/results.json" ] || $PY tools/linear_probe.py "${W[@]}" --data fashion-mnist \
        --img-size 96 --train-limit 10000 --epochs 30 --seed "$seed" --no-progress --overwrite --output-dir "$OUT/probe-$init-s$seed"
    [ -f "$OUT/finetune-$init-s$seed/results.json" ] || $PY tools/finetune.py "${W[@]}" --data fashion-mnist \
        --img-size 96 --label-fraction 0.1 --epochs 5 --warmup-epochs 1 --batch-size 64 --eval-limit 2000 \
        --seed "$seed" --no-progress --resume auto --output-dir "$OUT/finetune-$init-s$seed"
  done
done

for where in mlp grn block; do
  $PY tools/feature_collapse.py "$CKPT" "$CKPT_NOGRN" --label "FCMAE with GRN" --label "FCMAE without GRN" \
      --where $where --images fashion-mnist --num-images 100 --img-size 96 \
      -o "$OUT/collapse-$where.png" --csv "$OUT/collapse-$where.csv" > "$OUT/collapse-$where.txt"
done

pretrain pretrain-grn-5ep train.epochs=5
CKPT_5EP=$(ls "$OUT"/pretrain-grn-5ep/checkpoint-[0-9]*.pth | tail -n 1)
for seed in $SEEDS; do
  [ -f "$OUT/probe-pre5ep-s$seed/results.json" ] || $PY tools/linear_probe.py --checkpoint "$CKPT_5EP" --data fashion-mnist \
      --img-size 96 --train-limit 10000 --epochs 30 --seed "$seed" --no-progress --overwrite --output-dir "$OUT/probe-pre5ep-s$seed"
done

$PY tools/compare_results.py -o "$OUT/summary.md" \
    "linear probe, FCMAE-pretrained=$OUT/probe-pre-s*" "linear probe, random init=$OUT/probe-rand-s*" \
    "finetune 10 % labels, FCMAE-pretrained=$OUT/finetune-pre-s*" "finetune 10 % labels, random init=$OUT/finetune-rand-s*" \
    "linear probe, FCMAE-pretrained 5 epochs=$OUT/probe-pre5ep-s*"
