#!/usr/bin/env bash
# Accuracy of --precision bf16 against fp32 on the quick grid's Fashion-MNIST IPC 10 cells for DM and
# SRe2L: each set is distilled with the given precision and evaluated with it (the option's whole
# effect), 3 runs, the protocol the bench uses (hard labels for DM, soft labels with a ConvNet
# student for SRe2L). The fp32 numbers are the bench's own cells (docs/benchmarks.md). Resumable: a
# finished set is not distilled again, and stored evaluations are reused.
#
# Usage: bash benchmarks/precision_accuracy.sh OUT [PRECISION]   (default bf16)
set -euo pipefail
cd "$(dirname "$0")/.."
out=$1
precision=${2:-bf16}
ddkit() { OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} nice -n ${NICE:-19} .venv/bin/python -m ddkit "$@"; }
for method in dm sre2l; do
  set_dir=$out/$method-fmnist-ipc10-$precision
  protocol=hard; [ "$method" = sre2l ] && protocol=soft
  [ -f "$set_dir/manifest.json" ] || ddkit distill $method --dataset fashion-mnist --ipc 10 --preset quick --seed 0 \
      --precision "$precision" -q --out "$set_dir"
  ddkit eval "$set_dir" --protocol $protocol --preset quick --runs 3 --arch convnet --precision "$precision" --reuse -q
done
