#!/usr/bin/env bash
# The pretraining runs recorded in BENCHMARKS.md / RESULTS.md, on one GPU, from the repo root, with the shards
# copied to shards/ (cifar10/, imagenet-sample/). Each run is capped in time; outputs go to ${OUT:-outputs}.
set -uo pipefail
out=${OUT:-outputs}
export PYTHONUNBUFFERED=1
run() {  # run NAME SECONDS ARGS...: one training run, its last metrics and its pictures kept
  local name=$1 secs=$2; shift 2
  timeout "$secs" python run_pretrain.py "$@" output_dir="runs/$name" > "runs/$name.log" 2>&1
  echo "== $name (exit $?)"; grep -v '^\[20' "runs/$name.log" | grep -E "global batch|Error|error" | tail -3
  tail -n 2 "runs/$name/metrics.jsonl"
  cp "runs/$name/loss_curve.png" "$out/${name}_loss.png" 2>/dev/null
  cp "$(ls runs/$name/reconstruction_step*.png 2>/dev/null | tail -1)" "$out/${name}_recon.png" 2>/dev/null
  cp "runs/$name/metrics.jsonl" "$out/${name}_metrics.jsonl" 2>/dev/null
}
mkdir -p runs "$out"
"$@"
