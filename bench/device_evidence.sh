#!/usr/bin/env bash
# The CIFAR-10 evidence runs of RESULTS.md ("Does pretraining pay off?") on one GPU, from the repo root with the
# shards in shards/cifar10. Arms that must get equal GPU time run side by side on the GPU for the same wall time.
#   bench/device_evidence.sh equal_time SUP_EPOCHS MAE_EPOCHS FT_EPOCHS [seed]
#   bench/device_evidence.sh probes [seed]          linear probes of the MAE encoder and of a random one
#   bench/device_evidence.sh deit EPOCHS [seed]
#   bench/device_evidence.sh clip CLIP_EPOCHS FT_EPOCHS [seed]   CLIP -> zero-shot, fine-tune and linear probe
# Each run is capped (SIGTERM: checkpoint + export); metrics and results land in runs/evidence/, copies in ${OUT:-outputs}.
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-outputs}; root=runs/evidence; mkdir -p "$root" "$out"
CAP=${CAP:-600}
EX=configs/experiments
run() {  # NAME SCRIPT ARGS...: one capped run, a summary line, its metrics copied out
  local name=$1 start=$SECONDS; shift
  timeout "$CAP" python "$@" output_dir=$root/$name data.num_workers=4 > $root/$name.log 2>&1
  echo "== $name: exit $?, $((SECONDS - start)) s; results: $(cat $root/$name/results.json 2>/dev/null | tr -d '\n ')"
  grep -E "Error" $root/$name.log | tail -2
  cp $root/$name/metrics.jsonl "$out/${name}_metrics.jsonl" 2>/dev/null
}
equal_time() {
  local sup=$1 mae=$2 ft=$3 seed=${4:-0}
  run sup${sup}_s$seed run_finetune.py --task classification --config $EX/cifar10_supervised_vim_tiny.yaml \
    train.epochs=$sup optim.warmup_epochs=1 train.eval_every=1 seed=$seed &
  (
    run mae${mae}_s$seed run_pretrain.py --objective mae --config $EX/cifar10_mae_vim_tiny.yaml \
      train.epochs=$mae optim.warmup_epochs=1 seed=$seed
    run mae${mae}_ft${ft}_s$seed run_finetune.py --task classification --config $EX/cifar10_finetune_mae_vim_tiny.yaml \
      --pretrained $root/mae${mae}_s$seed/encoder.safetensors train.epochs=$ft train.eval_every=1 seed=$seed
    cp $root/mae${mae}_s$seed/encoder.safetensors $root/mae_encoder_s$seed.safetensors
  ) &
  wait
}
probes() {
  local seed=${1:-0} lp="run_finetune.py --task linprobe --config configs/finetune/cifar10_linprobe_vim_tiny.yaml"
  local common="train.epochs=30 data.batch_size=1024 seed=$seed"
  run lp_mae_s$seed $lp --pretrained $root/mae_encoder_s$seed.safetensors $common &
  run lp_random_s$seed $lp $common &
  wait
}
clip() {
  local ep=$1 ft=$2 seed=${3:-0}
  run clip${ep}_s$seed run_pretrain.py --objective clip --config $EX/cifar10_clip_vim_tiny.yaml \
    train.epochs=$ep optim.warmup_epochs=1 seed=$seed
  run clip${ep}_ft${ft}_s$seed run_finetune.py --task classification --config $EX/cifar10_finetune_clip_vim_tiny.yaml \
    --pretrained $root/clip${ep}_s$seed/encoder.safetensors train.epochs=$ft train.eval_every=1 seed=$seed &
  run lp_clip_s$seed run_finetune.py --task linprobe --config configs/finetune/cifar10_linprobe_vim_tiny.yaml \
    --pretrained $root/clip${ep}_s$seed/encoder.safetensors train.epochs=30 data.batch_size=1024 seed=$seed &
  wait
}
deit() {
  run deit${1}_s${2:-0} run_finetune.py --task classification --config $EX/cifar10_supervised_deit_tiny.yaml \
    train.epochs=$1 optim.warmup_epochs=1 train.eval_every=1 seed=${2:-0}
}
"$@"
