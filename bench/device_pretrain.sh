#!/usr/bin/env bash
# The GPU runs recorded in BENCHMARKS.md / RESULTS.md, from the repo root, with the shards copied to shards/
# (cifar10/, imagenet-sample/). Each run is capped in wall time; its log and outputs stay in runs/NAME, its
# metrics and last reconstruction grid are copied to ${OUT:-outputs}.
#   bench/device_pretrain.sh run NAME SECONDS SCRIPT ARGS...     e.g. run mae_cifar 230 run_pretrain.py --objective mae ...
set -uo pipefail
out=${OUT:-outputs}
export PYTHONUNBUFFERED=1
run() {
  local name=$1 secs=$2 script=$3 start=$SECONDS; shift 3
  timeout "$secs" python "$script" "$@" output_dir="runs/$name" > "runs/$name.log" 2>&1
  echo "== $name (exit $?, $((SECONDS - start)) s)"; grep -v '^\[20' "runs/$name.log" | grep -E "global batch|Error|error" | tail -3
  tail -n 2 "runs/$name/metrics.jsonl"
  cp "$(ls runs/$name/reconstruction_step*.png 2>/dev/null | tail -1)" "$out/${name}_recon.png" 2>/dev/null
  cp "runs/$name/metrics.jsonl" "$out/${name}_metrics.jsonl" 2>/dev/null
}
mkdir -p runs "$out"
"$@"
