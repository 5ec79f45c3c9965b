#!/usr/bin/env bash
# The several-GPU checks of BENCHMARKS.md / RESULTS.md on one 4-GPU host, from the repo root with the CIFAR-10
# shards in shards/cifar10. Vim-T at 32x32, global batch 256 on 1, 2 and 4 GPUs (per-GPU batch 256 / 128 / 64),
# 60 steps of MAE, CLIP and supervised fine-tuning under ZeRO-1/2/3; then a 4-GPU checkpoint resumed on 2 and 1.
# Runs of a phase share the GPUs (these runs compare losses, not speed).
#   bench/device_multi_gpu.sh curves | resume | scaling         results in runs/mgpu/, summaries in ${OUT:-outputs}
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${OUT:-outputs}; root=runs/mgpu; mkdir -p "$root" "$out"
port=29700
STEPS="train.epochs=2 train.max_steps=60 train.log_every=5 optim.warmup_epochs=0.2 data.num_workers=3"
declare -A TASK=(
  [mae]="run_pretrain.py --objective mae --config configs/experiments/cifar10_mae_vim_tiny.yaml"
  [clip]="run_pretrain.py --objective clip --config configs/experiments/cifar10_clip_vim_tiny.yaml train.eval_every=0"
  [ft]="run_finetune.py --task classification --config configs/experiments/cifar10_supervised_vim_tiny.yaml finetune.ema=false"
)
# launch NAME GPU_LIST TASK ZERO ARGS...: one deepspeed launch in the background
launch() {
  local name=$1 gpus=$2 task=$3 zero=$4; shift 4
  local n=$(( $(tr -cd , <<< "$gpus" | wc -c) + 1 ))
  port=$((port + 1))
  deepspeed --include "localhost:$gpus" --master_port $port ${TASK[$task]} $STEPS \
    data.batch_size=$((256 / n)) deepspeed=configs/deepspeed/zero$zero.json output_dir=$root/$name "$@" \
    > $root/$name.log 2>&1 &
}
report() {
  for f in $root/*.log; do grep -q -E "Traceback|Error" "$f" && { echo "== FAILED $f"; grep -E "Error" "$f" | tail -3; }; done
  python -m bench.compare_runs "$@" --plot "$out/multi_gpu_curves.png" | tee -a "$out/multi_gpu.md"
}
curves() {
  local start=$SECONDS
  for t in mae clip ft; do
    launch ${t}_1gpu_z1_s0 0 $t 1
    launch ${t}_1gpu_z1_s1 1 $t 1 seed=1
    launch ${t}_2gpu_z1 2,3 $t 1
    launch ${t}_2gpu_z2 0,1 $t 2
    launch ${t}_2gpu_z3 2,3 $t 3
  done
  wait; echo "phase 1 (1 and 2 GPUs): $((SECONDS - start)) s"
  for t in mae clip ft; do for z in 1 2 3; do launch ${t}_4gpu_z$z 0,1,2,3 $t $z; done; done
  wait; echo "phase 2 (4 GPUs): $((SECONDS - start)) s"
  report $(ls -d $root/*/ | sort)
}
resume() {
  # a 4-GPU checkpoint (step 60) exported again on 2 and 1 GPUs without training: the encoders must be identical;
  # then trained on: 4 GPUs -> 2 GPUs (to step 80) -> 1 GPU (to step 100)
  local start=$SECONDS
  for z in 2 3; do for n in 2 1; do
    rm -rf $root/resume_z${z}_on$n; cp -r $root/mae_4gpu_z$z $root/resume_z${z}_on$n
    launch resume_z${z}_on$n $( [ $n = 2 ] && echo 0,1 || echo 2 ) mae $z data.batch_size=$((256 / n))
  done; done
  wait
  rm -rf $root/chain; cp -r $root/mae_4gpu_z2 $root/chain
  deepspeed --include localhost:0,1 --master_port 29801 ${TASK[mae]} $STEPS train.max_steps=80 data.batch_size=128 \
    deepspeed=configs/deepspeed/zero2.json output_dir=$root/chain > $root/chain_2gpu.log 2>&1
  deepspeed --include localhost:0 --master_port 29802 ${TASK[mae]} $STEPS train.max_steps=100 data.batch_size=256 \
    deepspeed=configs/deepspeed/zero2.json output_dir=$root/chain > $root/chain_1gpu.log 2>&1
  echo "resume phase: $((SECONDS - start)) s"
  python - "$root" <<'PY' | tee -a "$out/multi_gpu.md"
import sys, torch
from pathlib import Path
from safetensors.torch import load_file
root = Path(sys.argv[1])
for z in (2, 3):
    ref = load_file(root / f"mae_4gpu_z{z}" / "encoder.safetensors")
    for n in (2, 1):
        other = load_file(root / f"resume_z{z}_on{n}" / "encoder.safetensors")
        same = ref.keys() == other.keys() and all(torch.equal(ref[k], other[k]) for k in ref)
        print(f"ZeRO-{z}: encoder exported from the 4-GPU checkpoint on {n} GPU(s) identical to the 4-GPU export: {same}")
PY
  grep -h "resumed from\|global batch" $root/chain_2gpu.log $root/chain_1gpu.log | grep -v "^\[20" | tee -a "$out/multi_gpu.md"
  python -m bench.compare_runs $root/mae_4gpu_z2 $root/chain --windows 20 | tee -a "$out/multi_gpu.md"
}
scaling() {
  # images/s of MAE and CLIP Vim-S, batch 128 per GPU, synthetic inputs: 1-GPU runs four at a time and 2-GPU
  # runs two at a time, on disjoint GPUs; then the 4-GPU runs alone
  local bs="bench/bench_scaling.py --model vim_small_patch16_224 --batch 128 --out $out/scaling.jsonl"
  deepspeed --include localhost:0 --master_port 29901 $bs --objectives mae --stages 1 2 > $root/scale_1a.log 2>&1 &
  deepspeed --include localhost:1 --master_port 29902 $bs --objectives mae --stages 3 > $root/scale_1b.log 2>&1 &
  deepspeed --include localhost:2 --master_port 29903 $bs --objectives clip --stages 1 2 > $root/scale_1c.log 2>&1 &
  deepspeed --include localhost:3 --master_port 29904 $bs --objectives clip --stages 3 > $root/scale_1d.log 2>&1 &
  wait
  deepspeed --include localhost:0,1 --master_port 29905 $bs --objectives mae > $root/scale_2a.log 2>&1 &
  deepspeed --include localhost:2,3 --master_port 29906 $bs --objectives clip > $root/scale_2b.log 2>&1 &
  wait
  deepspeed --include localhost:0,1,2,3 --master_port 29907 $bs --objectives mae clip > $root/scale_4.log 2>&1
  grep -h "^| " $root/scale_*.log | sort
  grep -h -E "Error" $root/scale_*.log | tail -5
}
"$@"
