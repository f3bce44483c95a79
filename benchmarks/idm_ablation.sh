#!/usr/bin/env bash
# IDM at the quick tier, Fashion-MNIST IPC 10: which part of the reference algorithm moves the
# accuracy? Each variant changes one option of the quick IDM preset; every set is evaluated with the
# quick hard-label protocol, 3 runs. Resumable: a finished set is not distilled again, and stored
# evaluations are reused.
#
# Usage: bash benchmarks/idm_ablation.sh OUT VARIANT...   (variants: see the case below)
set -euo pipefail
cd "$(dirname "$0")/.."
out=$1; shift
ddkit() { OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} nice -n ${NICE:-19} .venv/bin/python -m ddkit "$@"; }
for variant in "$@"; do
  case $variant in
    reference) options=() ;;                                        # the quick preset as it is
    fraction-ce) options=(--set ce_accuracy_scale=1) ;;             # CE 100x weaker (ddkit before 2026-12-02)
    no-ce) options=(--weight ce=0) ;;                               # no class-aware CE at all
    per-iteration) options=(--set image_step=per_iteration) ;;      # DM's one step per iteration
    iterations-300) options=(--set iterations=300) ;;               # twice the quick iterations
    iterations-600) options=(--set iterations=600) ;;               # four times the quick iterations
    lr-1) options=(--set lr_img=1.0) ;;                             # DM's image lr
    *) echo "unknown variant $variant" >&2; exit 2 ;;
  esac
  set_dir=$out/idm-fmnist-ipc10-$variant
  [ -f "$set_dir/manifest.json" ] || ddkit distill idm --dataset fashion-mnist --ipc 10 --preset quick --seed 0 \
      --compile -q --out "$set_dir" "${options[@]}"
  ddkit eval "$set_dir" --protocol hard --preset quick --runs 3 --compile --reuse -q
done
