#!/bin/bash
# G-VBSM's quick preset: which recover options make 500 iterations on 28 px images work?
# Fashion-MNIST IPC 1, seed 0, the quick teacher pool (trained once, cached), one soft-protocol run each.
# Every variant starts from SPEC's published options (lr 0.05, r_bn = r_conv = 0.01, jitter 32) and
# changes only what its name says. The chosen set (now the quick preset) is then checked with 3 runs
# at IPC 1 and at IPC 10.
# Usage: OMP_NUM_THREADS=1 bash benchmarks/gvbsm_quick_preset.sh OUT
set -euo pipefail
out=${1:?usage: gvbsm_quick_preset.sh OUT}
mkdir -p "$out"
published=(--set lr=0.05 --set r_bn=0.01 --set r_conv=0.01 --set jitter=32)
run() {  # NAME IPC RUNS [--set ...]: distill, evaluate, print the accuracy line
  local name=$1 ipc=$2 runs=$3; shift 3
  [ -f "$out/$name/manifest.json" ] || ddkit distill gvbsm --dataset fashion-mnist --ipc "$ipc" --preset quick \
    --quiet "${published[@]}" "$@" --out "$out/$name" > "$out/$name.log" 2>&1
  ddkit eval "$out/$name" --protocol soft --recipe ddkit --arch convnet --preset quick --runs "$runs" --reuse --quiet \
    >> "$out/$name.log" 2>&1
  echo "$name ($*): $(grep '^convnet' "$out/$name.log" | tail -1)"
}
stats=(--set r_bn=1 --set r_conv=1)
run published 1 1
run jitter4 1 1 --set jitter=4
run stats-x100 1 1 "${stats[@]}"
run stats-x100-jitter4 1 1 "${stats[@]}" --set jitter=4
run stats-x100-jitter4-no-ema 1 1 "${stats[@]}" --set jitter=4 --set ema_alpha=null
run stats-x100-jitter4-no-drop 1 1 "${stats[@]}" --set jitter=4 --set conv_drop=0
run stats-x100-jitter4-2000it 1 1 "${stats[@]}" --set jitter=4 --set iterations=2000
run stats-x100-jitter4-lr0.1 1 3 "${stats[@]}" --set jitter=4 --set lr=0.1
run stats-x100-jitter4-lr0.1-ipc10 10 3 "${stats[@]}" --set jitter=4 --set lr=0.1
