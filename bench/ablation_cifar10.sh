#!/usr/bin/env bash
# The design-space ablation on CIFAR-10 (configs/experiments/cifar10_ablation_*.yaml), from the repo root with the
# shards in shards/cifar10/. A row is one design override on the base configs; it writes outputs/ablation/ARM/ROW/
# (results.json: top-1 after the last epoch and the best one).
#   bench/ablation_cifar10.sh scratch [ROW...]   train from scratch (default: every row)
#   bench/ablation_cifar10.sh mae [ROW...]       MAE pretraining, then fine-tuning from its encoder
#   bench/ablation_cifar10.sh table              the finished rows as a markdown table
# Extra overrides for every run go in $EXTRA, e.g. EXTRA="train.epochs=2" bench/ablation_cifar10.sh scratch base
set -euo pipefail
declare -A ROWS=(
  [base]=""                                     # the reference: middle class token, v2, row + row_reverse
  [cls_head]="model.cls_mode=head"
  [cls_double]="model.cls_mode=double"
  [cls_mean]="model.cls_mode=mean"
  [cls_max]="model.cls_mode=max"
  [bidir_none]="model.bidir_mode=none"
  [bidir_sequence]="model.bidir_mode=sequence"
  [bidir_block]="model.bidir_mode=block"
  [bidir_ssm]="model.bidir_mode=ssm"
  [scan_4dir]="model.scan_orders=[row,row_reverse,col,col_reverse]"
)
ORDER=(base cls_head cls_double cls_mean cls_max bidir_none bidir_sequence bidir_block bidir_ssm scan_4dir)
out=outputs/ablation
arm=${1:?usage: $0 scratch|mae|table [ROW...]}
shift
if [ $# -gt 0 ]; then rows=("$@"); else rows=("${ORDER[@]}"); fi
extra=(${EXTRA:-})
for row in "${rows[@]}"; do
  [ -v "ROWS[$row]" ] || { echo "unknown row $row (rows: ${ORDER[*]})"; exit 1; }
done

case $arm in
  scratch)
    for row in "${rows[@]}"; do
      python run_finetune.py --task classification --config configs/experiments/cifar10_ablation_vim_tiny.yaml \
        output_dir=$out/scratch/$row ${ROWS[$row]} "${extra[@]}"
    done ;;
  mae)
    for row in "${rows[@]}"; do
      python run_pretrain.py --objective mae --config configs/experiments/cifar10_ablation_mae_vim_tiny.yaml \
        output_dir=$out/mae/$row ${ROWS[$row]} "${extra[@]}"
      python run_finetune.py --task classification \
        --config configs/experiments/cifar10_ablation_finetune_mae_vim_tiny.yaml \
        --pretrained $out/mae/$row/encoder.safetensors output_dir=$out/mae_ft/$row "${extra[@]}"
    done ;;
  table)
    echo "| row | override | from scratch top-1 (best) | MAE + fine-tune top-1 (best) |"
    echo "|---|---|---|---|"
    for row in "${ORDER[@]}"; do
      cells=()
      for dir in scratch mae_ft; do
        cells+=("$(python -c "import json, sys; r = json.load(open(sys.argv[1])); print(f\"{r['top1']:.2f} ({r['best']:.2f})\")" \
                   $out/$dir/$row/results.json 2>/dev/null || echo -)")
      done
      echo "| $row | ${ROWS[$row]:-(none)} | ${cells[0]} | ${cells[1]} |"
    done ;;
  *) echo "usage: $0 scratch|mae|table [ROW...]"; exit 1 ;;
esac
