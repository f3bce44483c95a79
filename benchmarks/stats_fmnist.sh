#!/usr/bin/env bash
# Issue-4 numbers of docs/benchmarks.md: Fashion-MNIST IPC 10, quick tier.
# SRe2L, CDA, G-VBSM end to end (teachers squeezed once and cached), the random real subset relabelled
# by the same teachers, soft-label evaluation (3 runs) of all five sets and hard-label evaluation
# (3 runs) of the three recovered sets. Resumable: finished sets and stored evaluations are reused.
# Two workers with one torch thread each.
# Usage: bash benchmarks/stats_fmnist.sh [OUT_DIR] [RANDOM_SET]
#   RANDOM_SET: the random IPC-10 baseline of benchmarks/quick_all.sh (made here if absent)
set -euo pipefail
out=${1:-runs/bench-stats}
random=${2:-runs/bench-quick/random-fashion-mnist-ipc10}
export DDKIT=${DDKIT:-.venv/bin/ddkit} OUT=$out OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$out/logs"
[ -f "$random/manifest.json" ] || $DDKIT baseline random --dataset fashion-mnist --ipc 10 --out "$random"

# stage 1 (two workers): the teacher pools, then the sets
stage1() {
  case $1 in
    random-sre2l) [ -f "$OUT/$1/manifest.json" ] || $DDKIT relabel "$2" --like sre2l --preset quick --out "$OUT/$1" -q ;;
    random-gvbsm) [ -f "$OUT/$1/manifest.json" ] || $DDKIT relabel "$2" --like gvbsm --preset quick --out "$OUT/$1" -q ;;
    *) [ -f "$OUT/$1/manifest.json" ] || $DDKIT distill "$1" --dataset fashion-mnist --ipc 10 --preset quick --out "$OUT/$1" -q ;;
  esac
}
export -f stage1
# gvbsm squeezes the 4-teacher pool; sre2l and cda share one teacher, so cda waits for sre2l's
printf '%s\n' "gvbsm" "sre2l" | xargs -P 2 -I{} bash -c 'stage1 {} '"$random"' > "$OUT/logs/{}.log" 2>&1 && echo "done {}" || echo "FAILED {}"'
printf '%s\n' "cda" "random-sre2l" "random-gvbsm" | xargs -P 2 -I{} bash -c 'stage1 {} '"$random"' > "$OUT/logs/{}.log" 2>&1 && echo "done {}" || echo "FAILED {}"'

# stage 2 (two workers): the evaluations. (The recorded run of 2026-11-21 evaluated random-gvbsm soft
# and the three hard rows with --runs 1 to fit the session; docs/benchmarks.md says so.)
evaluate() { $DDKIT eval "$OUT/$1" --protocol "$2" --preset quick --runs 3 --reuse -q; }
export -f evaluate
printf '%s\n' "sre2l soft" "cda soft" "gvbsm soft" "random-sre2l soft" "random-gvbsm soft" \
  "sre2l hard" "cda hard" "gvbsm hard" |
  xargs -P 2 -L 1 bash -c 'evaluate "$0" "$1" > "$OUT/logs/eval-$0-$1.log" 2>&1 && echo "done eval $0 $1" || echo "FAILED eval $0 $1"'
.venv/bin/python benchmarks/collect.py $(dirname "$out"/*/manifest.json) > "$out/table.md"
cat "$out/table.md"
