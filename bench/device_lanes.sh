#!/usr/bin/env bash
# Runs a plan of GPU jobs on one host, side by side in lanes, until a deadline; then packs what the jobs wrote.
#   bench/device_lanes.sh PLAN SECONDS
# PLAN: one job a line, "LANE COMMAND..." (blank lines and # comments skipped). LANE is a GPU index, or GPU.K for a
# K-th lane sharing that GPU, or * for the shared queue. A lane runs its own jobs in order, with
# CUDA_VISIBLE_DEVICES set to its GPU, then takes jobs from the shared queue, in plan order, until it is empty.
# A job is started only while MIN_LEFT seconds (default 60) remain before the deadline (SECONDS after the start)
# and is stopped with SIGTERM at the deadline (training runs save a checkpoint and export on it).
# Each job's output goes to runs/lanes/LANE-INDEX.log, one summary line (exit status, seconds, command) to
# runs/lanes/summary.txt; at the end runs/lanes, runs/evidence and outputs/ (logs, metrics, results, plots; no
# checkpoints or weights) are packed into ${OUT:-outputs}/lanes.tar.gz.
set -uo pipefail
plan=${1:?usage: $0 PLAN SECONDS}
seconds=${2:?usage: $0 PLAN SECONDS}
export PYTHONUNBUFFERED=1
deadline=$((SECONDS + seconds - 25))  # room to pack the results
log=runs/lanes
mkdir -p "$log" "${OUT:-outputs}"
grep -E '^\*[[:space:]]' "$plan" | sed -E 's/^\*[[:space:]]+//' > "$log/queue.txt"
echo 0 > "$log/queue.next"

next_shared() {  # prints the shared queue's next job (empty once it is drained)
  (
    flock 9
    local taken
    taken=$(cat "$log/queue.next")
    echo $((taken + 1)) > "$log/queue.next"
    sed -n "$((taken + 1))p" "$log/queue.txt"
  ) 9> "$log/queue.lock"
}

run_job() {  # LANE INDEX JOB
  local left=$((deadline - SECONDS)) start=$SECONDS
  if [ "$left" -lt "${MIN_LEFT:-60}" ]; then
    echo "lane $1 job $2: skipped (deadline) | $3" >> "$log/summary.txt"; return
  fi
  CUDA_VISIBLE_DEVICES=${1%%.*} timeout -k 60 "$left" bash -c "$3" < /dev/null > "$log/$1-$2.log" 2>&1
  echo "lane $1 job $2: exit $?, $((SECONDS - start)) s | $3" >> "$log/summary.txt"
}

lane() {  # LANE: its own jobs, then the shared queue
  local index=0 job
  while read -r job; do
    index=$((index + 1)); run_job "$1" $index "$job"
  done < <(grep -E "^$1[[:space:]]" "$plan" | sed -E 's/^[0-9.]+[[:space:]]+//')
  while job=$(next_shared) && [ -n "$job" ]; do
    index=$((index + 1)); run_job "$1" $index "$job"
  done
}

for name in $(grep -oE '^[0-9]+(\.[0-9]+)?' "$plan" | sort -u); do
  lane "$name" &
done
wait
cat "$log/summary.txt"
tar czf "${OUT:-outputs}/lanes.tar.gz" --exclude=checkpoints --exclude='*.safetensors' --exclude='*.tar.gz' \
  runs/lanes runs/evidence outputs 2>/dev/null
ls -la "${OUT:-outputs}/lanes.tar.gz"
