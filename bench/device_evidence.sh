#!/usr/bin/env bash
# The CIFAR-10 evidence arms of RESULTS.md ("Does pretraining pay off?"), from the repo root with the shards in
# shards/cifar10. One arm runs on the GPUs it is given; bench/device_lanes.sh runs several arms side by side, one
# GPU each, and caps them. Outputs in runs/evidence/NAME (metrics.jsonl, results.json, encoder.safetensors).
#   bench/device_evidence.sh sup EPOCHS [seed]            supervised Vim-T from scratch
#   bench/device_evidence.sh mae_ft MAE_EPOCHS FT_EPOCHS [seed [override...]]   MAE pretraining (with the mae.*
#                                                         overrides given), then fine-tuning its encoder
#   bench/device_evidence.sh clip_ft CLIP_EPOCHS FT_EPOCHS [seed] CLIP pretraining (zero-shot), then fine-tuning
#   bench/device_evidence.sh probe NAME [seed]            linear probe of runs/evidence/NAME's encoder; NAME=random:
#                                                         of a randomly initialised Vim-T
#   bench/device_evidence.sh deit EPOCHS [seed]           supervised DeiT-T on the Vim-T arm's recipe
# $OVERRIDES go to every run of the arm (e.g. OVERRIDES=train.cuda_graph=true), $FT_OVERRIDES to the fine-tuning run
# of mae_ft / clip_ft only (FT_OVERRIDES=optim.layer_decay=0.8: the MAE arms' fine-tuning before the eighth
# session), $TAG is appended to every run's name
# (so a re-run with other overrides keeps the earlier runs), $WORKERS sets the loader workers of each run (default 12).
set -uo pipefail
export PYTHONUNBUFFERED=1
root=runs/evidence; mkdir -p "$root"
EX=configs/experiments
WORKERS=${WORKERS:-12}
run() {  # NAME SCRIPT ARGS...: one run, then a summary line with its results and wall time
  local name=$1${TAG:-} start=$SECONDS; shift
  python "$@" output_dir=$root/$name data.num_workers=$WORKERS ${OVERRIDES:-} > $root/$name.log 2>&1
  local status=$?
  echo "== $name: exit $status, $((SECONDS - start)) s; results: $(tr -d '\n ' < $root/$name/results.json 2>/dev/null)"
  grep -E "Error" $root/$name.log | tail -2
  return $status
}
sup() {
  run sup$1_s${2:-0} run_finetune.py --task classification --config $EX/cifar10_supervised_vim_tiny.yaml \
    train.epochs=$1 optim.warmup_epochs=2 train.eval_every=1 seed=${2:-0}
}
mae_ft() {  # MAE_EPOCHS FT_EPOCHS [SEED [MAE OVERRIDES...]]: overrides (e.g. mae.mask_ratio=0.5) name the run
  local epochs=$1 ft=$2 seed=${3:-0} tag
  shift $(( $# < 3 ? $# : 3 ))
  tag=$(printf "_%s" "$@" | sed -e 's/mae\.//g' -e 's/[=,]/-/g' -e 's/[^A-Za-z0-9_.-]//g')
  local name=mae${epochs}_s${seed}${tag%_}
  run $name run_pretrain.py --objective mae --config $EX/cifar10_mae_vim_tiny.yaml \
    train.epochs=$epochs optim.warmup_epochs=1 seed=$seed "$@" &&
  run ${name}_ft$ft run_finetune.py --task classification --config $EX/cifar10_finetune_mae_vim_tiny.yaml \
    --pretrained $root/$name${TAG:-}/encoder.safetensors train.epochs=$ft train.eval_every=1 seed=$seed \
    ${FT_OVERRIDES:-}
}
clip_ft() {
  local name=clip$1_s${3:-0}
  run $name run_pretrain.py --objective clip --config $EX/cifar10_clip_vim_tiny.yaml \
    train.epochs=$1 train.eval_every=$1 optim.warmup_epochs=1 seed=${3:-0} &&
  run ${name}_ft$2 run_finetune.py --task classification --config $EX/cifar10_finetune_clip_vim_tiny.yaml \
    --pretrained $root/$name${TAG:-}/encoder.safetensors train.epochs=$2 train.eval_every=1 seed=${3:-0} \
    ${FT_OVERRIDES:-}
}
probe() {
  local encoder=()
  [ "$1" = random ] || encoder=(--pretrained $root/$1/encoder.safetensors)
  run lp_$1_s${2:-0} run_finetune.py --task linprobe --config configs/finetune/cifar10_linprobe_vim_tiny.yaml \
    "${encoder[@]}" train.epochs=30 data.batch_size=1024 seed=${2:-0}
}
deit() {
  run deit$1_s${2:-0} run_finetune.py --task classification --config $EX/cifar10_supervised_deit_tiny.yaml \
    train.epochs=$1 optim.warmup_epochs=2 train.eval_every=1 seed=${2:-0}
}
"$@"
