#!/usr/bin/env bash
# Run, or resume, the quick grid of docs/benchmarks.md in N worker processes that share its cells
# (`ddkit bench` claims each cell before running it), one thread each, at nice 19 in the background.
#
# Usage: bash benchmarks/quick_grid.sh [N]      (default N: one worker per core)
#   SRC=/path/to/worktree/src bash benchmarks/quick_grid.sh
#     runs the ddkit of another checkout (e.g. a `git worktree` at a fixed commit), so that editing
#     this checkout meanwhile cannot change code the workers have not imported yet.
#   GRID=scores-quick IPCS=1,10 EXTRA=--scores bash benchmarks/quick_grid.sh
#     another grid of the same kind: its progress in benchmarks/results/$GRID, its run directory
#     runs/bench-$GRID, the bench's --ipc and further flags (DD-Ranking's scores, docs/bench.md).
# Logs: runs/bench-$GRID-w<K>.log (default GRID: quick-grid, logs runs/bench-grid-quick-w<K>.log) (progress bars end in carriage returns: read them with
#   tail -c 300 runs/bench-grid-quick-w1.log | tr '\r' '\n'). Progress: the same bench command with --plan.
# Stop: pkill -f "ddkit bench --tier quick"; a stopped grid loses at most about a minute per worker.
#
# The grid's progress lives in git, in benchmarks/results/$GRID/ (runs/ is not tracked, and a
# fresh checkout starts without it): results.jsonl, and sets/ with the sets of cells not finished
# yet. A run directory without results.jsonl starts from a copy of both, and the workers run with
# --trust-results, so cells finished on another machine (their sets are not kept) stay finished.
# Save the progress by copying OUT/results.jsonl (and the sets of unfinished cells) there and committing it.
# The full-data references that --scores measures (ddkit.evaluate.references, 10-30 minutes each on
# a CPU) travel the same way: benchmarks/results/$GRID/references/ holds their cache files, copied
# into the data directory's references/ where it lacks them; save new ones from there.
set -euo pipefail
cd "$(dirname "$0")/.."
workers=${1:-$(nproc)}
src=${SRC:-$PWD/src}
commit=$(git -C "$src" rev-parse --short HEAD 2>/dev/null || echo unknown)
grid=${GRID:-quick-grid}
ipcs=${IPCS:-1,10,50}
if [ "$grid" = quick-grid ]; then run=runs/bench-grid-quick; else run=runs/bench-$grid; fi
mkdir -p "$run/sets"
if [ ! -f "$run/results.jsonl" ] && [ -f "benchmarks/results/$grid/results.jsonl" ]; then
  cp "benchmarks/results/$grid/results.jsonl" "$run/"
  if [ -d "benchmarks/results/$grid/sets" ]; then
    cp -r "benchmarks/results/$grid/sets/." "$run/sets/"
  fi
fi
if [ -d "benchmarks/results/$grid/references" ]; then
  cache="${DDKIT_DATA:-$HOME/.cache/ddkit}/references"
  mkdir -p "$cache"
  cp -rn "benchmarks/results/$grid/references/." "$cache/"
fi
for worker in $(seq 1 "$workers"); do
  log=$run-w$worker.log
  echo "=== start $(date -u +%FT%TZ) on $commit ($src), worker $worker of $workers" >> "$log"
  # shellcheck disable=SC2086  # EXTRA is a list of flags
  PYTHONPATH="$src" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nohup nice -n 19 .venv/bin/python -m ddkit bench \
    --tier quick --datasets fashion-mnist,mnist --ipc "$ipcs" --runs 3 --out "$run" --compile --trust-results ${EXTRA:-} \
    >> "$log" 2>&1 &
  sleep 20  # the first worker claims its cell before the next one starts looking
done
echo "started $workers workers on $commit; logs: $run-w*.log"
